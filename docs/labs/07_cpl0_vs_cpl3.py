"""Lab 7: on a nested host, the same loop at CPL 0 (emulated) and CPL 3 (native).

Run:  python docs/labs/07_cpl0_vs_cpl3.py

bench64 and bench64u are one source (guests/bench.S) built twice: kind 0 is
the loop ``1: dec rsi; jnz 1b`` with no exit at all.  bench64 runs it in long
mode at CPL 0, bench64u at CPL 3.  The vCPU stat ``insn_emulation``
(KVM_GET_STATS_FD) counts the instructions KVM's instruction emulator
executed in software.
"""

from __future__ import annotations

from pykvm import Machine
from pykvm.host import nested_kvm_module
from pykvm.guests import BENCH_KINDS

N_CPL0 = 3000          # ~1-2 us per iteration here: keep it small
N_CPL3 = 30_000_000    # native: a fraction of a nanosecond per iteration
N_PRIMES = 100_000


def run(guest: str, args: tuple[int, int]) -> dict:
    with Machine(memory="16M") as m:
        m.load_guest(guest, args=args)
        result = m.run(timeout=30)
        s = result.split
        return {"guest": guest, "ended": result.ended, "rax": result.regs["rax"],
                "emulated": s.insn_emulation, "kvm_exits": s.kvm_exits, "user": s.user_exits,
                "seconds": s.seconds_in_run, "text": result.serial_text}


def main() -> None:
    nested = nested_kvm_module()
    print("Lab 7: the same loop at CPL 0 and at CPL 3")
    print(f"host: {'nested KVM (' + nested + '): CPL-0 guest code is emulated' if nested else 'KVM, not nested'}\n")

    rows = [
        ("bench64 ", 0, N_CPL0, run("bench64", (BENCH_KINDS["empty"], N_CPL0))),
        ("bench64u", 3, N_CPL0, run("bench64u", (BENCH_KINDS["empty"], N_CPL0))),
        ("bench64u", 3, N_CPL3, run("bench64u", (BENCH_KINDS["empty"], N_CPL3))),
    ]
    print(f"{'guest':<9} {'CPL':>3} {'iterations':>11} {'insn_emulation':>15} {'per iter':>9}"
          f" {'KVM exits':>9} {'in KVM_RUN':>11} {'ns/iter':>9}")
    for guest, level, n, r in rows:
        print(f"{guest:<9} {level:>3} {n:>11,} {r['emulated']:>15,} {r['emulated'] / n:>9.3f}"
              f" {r['kvm_exits']:>9} {r['seconds'] * 1e3:>8.2f} ms {r['seconds'] / n * 1e9:>9.2f}")
    cpl0, _, cpl3 = (r for _, _, _, r in rows)
    ratio = (cpl0["seconds"] / N_CPL0) / (cpl3["seconds"] / N_CPL3)
    print(f"\none iteration at CPL 0 costs {ratio:,.0f}x one at CPL 3")

    primes = run("primes64u", (N_PRIMES, 0))
    print(f"primes64u (CPL 3): {primes['text'].strip()!r} in {primes['seconds'] * 1e3:.2f} ms,"
          f" insn_emulation {primes['emulated']}")

    ok = all(r["rax"] == n for _, _, n, r in rows) and primes["rax"] == 9592
    if nested == "kvm_pvm":
        # CPL 0: KVM emulates dec + jnz, two instructions per iteration (plus a few around the loop).
        # CPL 3: nothing of the loop is emulated; only the final reset write (outsb) is.
        ok = ok and cpl0["emulated"] >= 2 * N_CPL0 and cpl3["emulated"] < 100 and ratio > 100
        print(f"check: CPL 0 emulated >= 2 per iteration ({cpl0['emulated'] / N_CPL0:.2f}),"
              f" CPL 3 emulated < 100 ({cpl3['emulated']}), ratio > 100: {'ok' if ok else 'FAILED'}")
    else:
        print(f"check: results correct ({'ok' if ok else 'FAILED'}); on this host CPL 0 is not emulated,"
              " so both loops run at hardware speed")


if __name__ == "__main__":
    main()
