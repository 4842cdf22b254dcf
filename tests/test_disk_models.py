"""benchmarks/disk_models.py: ATA PIO against virtio-blk and the host file -- the JSON's structure, no timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ["seq-read", "seq-write", "rand-read", "rand-write"]
OURS = ["host-file", "ata-pio", "ata-pio-word", "ata-pio-qemu", "ata-pio-word-qemu"]
KEYS = {"model", "workload", "mb_per_s", "exits_per_mb", "notes", "category", "pct_of_host"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("disk_models")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "disk_models.py"), "--quick", "--out", str(out),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, f"disk_models --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads((out / "disk_models-quick.json").read_text()), out


@pytest.mark.kvm
def test_every_model_and_workload_has_a_row(quick_run):
    proc, data, _ = quick_run
    assert data["quick"] is True and data["errors"] == {}
    section = data["disk_models"]
    assert section["workloads"] == WORKLOADS
    rows = {(r["model"], r["workload"]): r for r in section["rows"]}
    assert len(rows) == len(section["rows"])  # no duplicates
    models = list(dict.fromkeys(r["model"] for r in section["rows"]))
    assert models[:len(OURS)] == OURS and len(models) > len(OURS)  # then virtio-blk's rows
    for model in models:
        assert {w for m, w in rows if m == model} == set(WORKLOADS), model
    for r in section["rows"]:
        assert KEYS <= set(r), r
        assert r["category"] in ("full emulation", "paravirtual", "passthrough")
        if r["mb_per_s"] is None:
            assert r["notes"].startswith("not measured"), r  # virtio-blk missing, QEMU absent
    assert "## Disk models" in proc.stdout and "The notes' row" in proc.stdout


@pytest.mark.kvm
def test_pykvm_rows_are_measured_with_their_exits(quick_run):
    _, data, _ = quick_run
    rows = {(r["model"], r["workload"]): r for r in data["disk_models"]["rows"]}
    for model in ("host-file", "ata-pio", "ata-pio-word"):
        for w in WORKLOADS:
            r = rows[model, w]
            assert r["mb_per_s"] > 0 and r["pct_of_host"] > 0
            if model == "host-file":
                assert r["exits_per_mb"] is None and r["pct_of_host"] == pytest.approx(100)
            else:
                assert r["exits_per_mb"] > 0
    # Structure, not timing: word PIO exits about once per 16-bit word (2 bytes) whichever the direction.
    for w in WORKLOADS:
        assert rows["ata-pio-word", w]["exits_per_mb"] > 1e6 / 2


@pytest.mark.kvm
def test_summary_has_the_notes_three_categories(quick_run):
    _, data, out = quick_run
    summary = data["disk_models"]["summary"]
    assert [s["category"] for s in summary] == ["full emulation", "paravirtual", "passthrough"]
    assert [s["notes_pct"] for s in summary] == [45, 85, 95]
    assert summary[0]["model"] == "ata-pio" and summary[2]["model"] == "host-file"
    assert set(summary[0]["pct_by_workload"]) == set(WORKLOADS)
    if (out / "disk_models-quick.png").exists():
        assert (out / "disk_models-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_virtio_module_gives_not_measured_rows(monkeypatch):
    import builtins

    from pykvm.bench import disk_models

    real_import = builtins.__import__

    def no_disk_virtio(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "pykvm.bench" and fromlist and "disk_virtio" in fromlist:
            raise ImportError("no disk_virtio")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_disk_virtio)
    rows = disk_models.virtio_rows(True)
    assert [r["workload"] for r in rows] == WORKLOADS
    assert all(r["mb_per_s"] is None and r["notes"] == disk_models.MISSING_VIRTIO for r in rows)


def test_summary_and_markdown_from_rows_with_virtio():
    from pykvm.bench import disk_models

    rows = []
    for model, rate in (("host-file", 1000.0), ("ata-pio", 1.0), ("virtio-blk", 500.0)):
        for w in WORKLOADS:
            rows.append({"model": model, "workload": w, "mb_per_s": rate, "exits_per_mb": None, "notes": "",
                         "category": disk_models.category(model), "pct_of_host": 100 * rate / 1000})
    summary = disk_models.summary(rows)
    assert [(s["model"], s["mean_pct"]) for s in summary] == [("ata-pio", 0.1), ("virtio-blk", 50), ("host-file", 100)]
    section = {"region_bytes": 1 << 20, "reps": 1, "workloads": WORKLOADS, "rows": rows, "summary": summary}
    text = "\n".join(disk_models.markdown(section))
    assert "| paravirtual | 85 % | virtio-blk | 50 | 50 | 50 | 50 | 50 |" in text
