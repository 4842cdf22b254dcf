"""The benchmarks: ``pykvm bench --quick`` runs and its JSON is complete and consistent.

Only the structure and the arithmetic are checked, never the times: every
kind x path of every guest is measured or explicitly n/a with a reason,
every number is positive, and every ratio is the row's own value divided by
the raw-C value of the same run.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"pio_out", "pio_in", "mmio_write", "mmio_read", "hlt", "cpuid",
         "coalesced_pio", "coalesced_mmio", "ioeventfd_pio", "ioeventfd_mmio"}
PATHS = ["raw_c", "c_loop", "machine", "bare", "qemu"]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


#: Numbers that are labels, not measurements (CPL 0, the guest's kind number).
LABELS = {"cpl", "guest_kind", "schema"}


def _numbers(value, where="$"):
    """Every measured number in a JSON document with its path (booleans and labels excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in LABELS:
                yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        # boot has its own quick run below (test_boot_*)
        [sys.executable, "-m", "pykvm.bench", "--quick", "--out", str(out), "--no-progress",
         "--only", "exits,lifecycle,memory,startup,io_models,disk_models"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, f"python -m pykvm.bench --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "bench-quick.json").read_text()), proc.stdout


@pytest.mark.kvm
def test_quick_run_prints_tables(quick_results):
    _, stdout = quick_results
    for heading in ("## Exit latency", "## VM lifecycle", "## Peak memory", "## Start-up: the whole process",
                    "## Targets"):
        assert heading in stdout


@pytest.mark.kvm
def test_every_kind_and_path_is_measured_or_explained(quick_results):
    results, _ = quick_results
    assert results["quick"] is True and not results["errors"]
    section = results["exit_latency"]
    assert [p["name"] for p in section["paths"]] == PATHS
    guests = {g["name"]: g for g in section["guests"]}
    assert {"bench64", "bench64u", "bench32"} <= set(guests)
    assert set(guests["bench64"]["kinds"]) == KINDS and set(guests["bench64u"]["kinds"]) == KINDS
    rows = {}
    for row in section["rows"]:
        key = (row["guest"], row["kind"], row["path"])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = row
    for guest in guests.values():
        for kind in guest["kinds"]:
            for path in PATHS:
                row = rows[(guest["name"], kind, path)]
                assert row["status"] in ("ok", "n/a"), row
                if row["status"] == "n/a":
                    assert row["reason"].strip(), f"n/a without a reason: {row}"
    # The rows the targets are read from are real measurements.
    for guest in ("bench64", "bench64u", "bench32"):
        for path in ("raw_c", "c_loop", "machine", "bare"):
            assert rows[(guest, "pio_out", path)]["status"] == "ok", rows[(guest, "pio_out", path)]
    assert rows[("bench64u", "hlt", "raw_c")]["status"] == "n/a"  # HLT is privileged
    if section["qemu"]["available"]:
        assert rows[("bench32", "pio_out", "qemu")]["status"] == "ok"
    else:
        assert "QEMU" in rows[("bench32", "pio_out", "qemu")]["reason"]


@pytest.mark.kvm
def test_per_exit_figures_and_ratios_come_from_the_same_run(quick_results):
    results, _ = quick_results
    rows = results["exit_latency"]["rows"]
    raw = {(r["guest"], r["kind"]): r for r in rows if r["path"] == "raw_c"}
    checked = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        assert row["runs"] >= 5 and len(row["kind_ns"]) == row["runs"] == len(row["empty_ns"])
        median_kind, median_empty = statistics.median(row["kind_ns"]), statistics.median(row["empty_ns"])
        assert _close(row["median_kind_ns"], median_kind) and _close(row["median_empty_ns"], median_empty)
        assert _close(row["per_exit_us"], (median_kind - median_empty) / row["n"] / 1000)
        reference = raw[(row["guest"], row["kind"])]
        if reference["status"] == "ok":
            assert _close(row["raw_c_us"], reference["per_exit_us"])
            assert _close(row["ratio"], row["per_exit_us"] / reference["per_exit_us"])
            checked += 1
        else:
            assert row["ratio"] is None
    assert checked >= 40


@pytest.mark.kvm
def test_lifecycle_memory_and_targets(quick_results):
    results, _ = quick_results
    life = results["lifecycle"]
    assert set(life["sizes"]) == {"2M", "64M", "1G", "2M-protected"}
    for size in life["sizes"].values():
        assert set(size["steps"]) == set(life["steps"])
        for step in [*size["steps"].values(), size["total"]]:
            assert _close(step["ratio"], step["pykvm_ms"] / step["raw_c_ms"])
        assert _close(size["total"]["raw_c_ms"] * 1e6,
                      statistics.median([sum(v) for v in zip(*size["samples_ns"]["raw_c"].values())]))
    assert {(r["impl"], r["workers"]) for r in life["rates"]} == {
        ("raw_c", 1), ("raw_c", 2), ("pykvm", 1), ("pykvm", 2)}
    programs = results["memory"]["programs"]
    assert {"pykvm_hello64", "pykvm_bench32", "raw_c_bench32", "python_baseline"} <= set(programs)
    if "qemu_bench32" in programs:
        assert _close(results["memory"]["ratio_hello64_to_qemu"],
                      programs["pykvm_hello64"]["peak_rss_kib"] / programs["qemu_bench32"]["peak_rss_kib"])
    assert len(results["targets"]) >= 10
    for target in results["targets"]:
        assert target["met"] is None or target["met"] == (target["value"] <= target["limit"])


@pytest.mark.kvm
def test_startup_phases_add_up_and_ratios_are_medians(quick_results):
    section = quick_results[0]["startup"]
    progs = section["programs"]
    assert {"pykvm_bench32", "pykvm_hello64", "pykvm_bench32_here", "pykvm_hello64_here", "python", "python_here",
            "python_nosite"} <= set(progs)
    for name in ("pykvm_bench32", "pykvm_hello64", "pykvm_bench32_here", "pykvm_hello64_here"):
        p = progs[name]
        assert len(p["runs_ms"]) == section["reps"] == len(p["runs_phases_ms"])
        for wall, phases in zip(p["runs_ms"], p["runs_phases_ms"]):
            # every phase of the process is accounted for: the marks, spawn to reaped
            assert set(phases) == {"interpreter", "parsed", "built", "loaded", "ran", "closed", "exit", "reaped"}
            assert _close(sum(phases.values()), wall)
        assert _close(p["median_ms"], statistics.median(p["runs_ms"]))
        if "qemu" in progs:
            assert _close(p["ratio"], p["median_ms"] / progs["qemu"]["median_ms"])
    assert section["imports"]["pykvm_modules"] > 10 and section["imports"]["pykvm_ms"] > 0


@pytest.mark.kvm
def test_every_number_is_positive(quick_results):
    results, _ = quick_results
    bad = [(where, value) for where, value in _numbers(results) if not value > 0]
    assert not bad, f"non-positive numbers: {bad[:10]}"


# -- boot: benchmarks/boot.py --quick ---------------------------------------------


def _boot_run(out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "boot.py"), "--quick", "--out", str(out), "--no-progress", *args],
        capture_output=True, text=True, timeout=3 * 3600, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, f"benchmarks/boot.py --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "boot-quick.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def boot_quick(tmp_path_factory) -> tuple[dict, str]:
    return _boot_run(tmp_path_factory.mktemp("boot"), "--no-linux")


def _check_summary(summary: dict, reps: int) -> None:
    assert len(summary["runs_ms"]) == reps
    assert _close(summary["median_ms"], statistics.median(summary["runs_ms"]))
    assert _close(summary["fastest_ms"], min(summary["runs_ms"]))


def _check_ratios(programs: dict, metrics: tuple[str, ...]) -> None:
    qemus = {n: p for n, p in programs.items() if p["vmm"] == "qemu" and p.get("status", "ok") == "ok"}
    for entry in programs.values():
        if entry["vmm"] == "pykvm" and entry.get("status", "ok") == "ok":
            for metric in metrics:
                assert set(entry["ratio"][metric]) == set(qemus)
                for name, q in qemus.items():
                    assert _close(entry["ratio"][metric][name], entry[metric]["median_ms"] / q[metric]["median_ms"])


@pytest.mark.kvm
def test_boot_quick_run_prints_its_tables(boot_quick):
    results, stdout = boot_quick
    assert results["quick"] is True and not results["errors"]
    for heading in ("## Boot (quick run)", "### Multiboot kernel `mbinfo`", "### Linux bzImage: to its banner",
                    "### IPI round trip between two vCPUs", "skipped: --no-linux"):
        assert heading in stdout
    assert results["boot"]["linux"] == {"skipped": "--no-linux"}


@pytest.mark.kvm
def test_boot_multiboot_first_byte_comes_before_the_exit(boot_quick):
    section = boot_quick[0]["boot"]
    part = section["multiboot"]
    expected = {"pykvm_pc", "pykvm_microvm"} | ({"qemu_pc", "qemu_microvm"} if section["qemu"]["available"] else set())
    assert set(part["programs"]) == expected
    for entry in part["programs"].values():
        for metric in ("first_byte", "exit"):
            _check_summary(entry[metric], part["reps"])
        assert all(0 < first < end for first, end in zip(entry["first_byte"]["runs_ms"], entry["exit"]["runs_ms"]))
    _check_ratios(part["programs"], ("first_byte", "exit"))


@pytest.mark.kvm
def test_boot_ipi_cases_and_ratios(boot_quick):
    section = boot_quick[0]["boot"]
    part = section["ipi"]
    assert list(part["cases"]) == ["smp2", "smp4_halt", "smp4_spin"]
    assert [(c["smp"], c["spin"]) for c in part["cases"].values()] == [(2, False), (4, False), (4, True)]
    for case in part["cases"].values():
        platforms = case["platforms"]
        assert set(platforms) == ({"pykvm", "qemu"} if section["qemu"]["available"] else {"pykvm"})
        for p in platforms.values():
            assert len(p["runs_us"]) == part["reps"] and _close(p["median_us"], statistics.median(p["runs_us"]))
        if "qemu" in platforms:
            assert _close(case["ratio"], platforms["pykvm"]["median_us"] / platforms["qemu"]["median_us"])


@pytest.mark.kvm
def test_boot_every_number_is_positive(boot_quick):
    bad = [(where, value) for where, value in _numbers(boot_quick[0]) if not value > 0]
    assert not bad, f"non-positive numbers: {bad[:10]}"


@pytest.mark.kvm
@pytest.mark.slow
def test_boot_linux_to_its_banner(tmp_path):
    from pykvm.bench.boot import linux_files

    kernel, initrd = linux_files()
    if not (kernel.is_file() and initrd.is_file()):
        pytest.skip(f"no Linux kernel at {kernel} with {initrd.name} (run make linux)")
    if not os.environ.get("PYKVM_BENCH_LINUX"):
        pytest.skip("set PYKVM_BENCH_LINUX=1 to run it: on a kvm_pvm host the kernel's decompressor is emulated, "
                    "minutes per VMM to the banner")
    results, stdout = _boot_run(tmp_path, "--only", "linux")
    part = results["boot"]["linux"]
    assert "### Linux bzImage: to its banner" in stdout and part["reps"] == 1
    assert {"pykvm_pc"} <= set(part["programs"])
    for entry in part["programs"].values():
        if entry["status"] == "n/a":
            assert entry["reason"].strip()
            continue
        assert entry["status"] == "ok"
        for metric in ("first_byte", "banner"):
            _check_summary(entry[metric], part["reps"])
        assert entry["first_byte"]["median_ms"] <= entry["banner"]["median_ms"]
    _check_ratios(part["programs"], ("first_byte", "banner"))


def test_boot_refuses_bad_options_in_one_line(tmp_path):
    for args in (["--only", "nope"], ["--reps", "1"], ["--iterations", "0"]):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "boot.py"), *args, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("boot: ") and not list(tmp_path.iterdir())


def test_boot_markdown_of_a_skip_and_a_failed_vmm():
    from pykvm.bench import boot_report

    skipped = {"quick": True, "errors": {}, "boot": {
        "qemu": {"available": False, "reason": "not installed"},
        "linux": {"skipped": "run make linux", "missing": ["/c/linux/vmlinuz"]}}}
    assert "skipped: run make linux (/c/linux/vmlinuz missing)." in boot_report.markdown(skipped)
    ok = {"median_ms": 2000.0, "fastest_ms": 1900.0, "runs_ms": [2000.0]}
    failed = {"quick": True, "errors": {}, "boot": {
        "qemu": {"available": True, "version": "QEMU 7.2"},
        "linux": {"kernel": "/c/linux/vmlinuz", "initrd": "/c/linux/initrd.cpio.gz", "kernel_bytes": 8 << 20,
                  "payload": "xz", "append": "console=ttyS0", "reps": 1, "programs": {
                      "qemu_microvm": {"vmm": "qemu", "machine": "microvm", "status": "ok", "command": "q",
                                       "first_byte": ok, "banner": ok, "first_line": "Probing EDD"},
                      "pykvm_pc": {"vmm": "pykvm", "machine": "pc", "status": "n/a", "command": "p",
                                   "reason": "exit status 2: cannot boot this"}}}}}
    text = boot_report.markdown(failed)
    assert "| pykvm run -M pc | n/a [1] | – | – |  |" in text and "[1] exit status 2: cannot boot this" in text
    assert "| QEMU -M microvm | 2,000.0 (1,900.0) | 2,000.0 (1,900.0) | – | `Probing EDD` |" in text


# -- without KVM: the report code on a made-up result ---------------------------


def _fake_results() -> dict:
    rows = []
    for kind in ("pio_out",):
        for path, us in (("raw_c", 8.0), ("c_loop", 8.2), ("machine", 9.6), ("bare", 11.0), ("qemu", 9.0)):
            row = {"guest": "bench32", "mode": "protected", "cpl": 0, "kind": kind, "path": path,
                   "status": "ok", "per_exit_us": us, "raw_c_us": 8.0, "ratio": us / 8.0}
            rows.append(row)
    return {
        "quick": True, "host": {}, "errors": {},
        "exit_latency": {
            "reps": 5, "rows": rows, "qemu": {"available": True, "version": "QEMU x", "command": "qemu"},
            "guests": [{"name": "bench32", "mode": "protected", "cpl": 0, "kinds": ["pio_out"], "n": 10}],
        },
    }


def test_targets_and_markdown_from_a_result_set():
    from pykvm.bench import report

    results = _fake_results()
    results["targets"] = report.targets(results)
    by_text = {t["target"]: t for t in results["targets"]}
    assert by_text["PIO out, C loop / raw C, bench32"]["met"] is True  # 1.025
    machine = by_text["PIO out, Machine + Python handler / raw C, bench32"]
    assert machine["met"] is False and machine["limit"] == 1.15  # 1.2: the limit is 1.15
    qemu = by_text["PIO out, Machine + Python handler / QEMU, bench32"]
    assert qemu["met"] is False and _close(qemu["value"], 9.6 / 9.0)
    text = report.markdown(results)
    assert "| bench32 (CPL 0) | PIO out (port 0x700) | 8.00 | 8.20 (1.02×) |" in text


def test_progress_prints_deciles_when_not_a_tty():
    from pykvm.bench.report import Progress

    stream = io.StringIO()
    progress = Progress(20, stream=stream)
    for i in range(20):
        progress(f"step {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("pykvm bench: 100%")
