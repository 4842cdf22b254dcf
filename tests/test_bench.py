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
        [sys.executable, "-m", "pykvm.bench", "--quick", "--out", str(out), "--no-progress"],
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
