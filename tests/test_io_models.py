"""benchmarks/io_models.py: the emulated 16550 against virtio-console."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPLICABLE = {
    ("uart_python", "tx"), ("uart_python", "rx"), ("uart_c", "tx"), ("uart_coalesced", "tx"),
    ("virtio", "tx"), ("virtio", "rx"), ("virtio_c", "tx"), ("virtio_c", "rx"),
    ("virtio_python", "tx"), ("virtio_python", "rx"),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("io_models")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "io_models.py"), "--quick", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, f"io_models --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads((out / "io_models-quick.json").read_text())


@pytest.mark.kvm
def test_quick_run_finishes_in_under_a_minute(quick_run):
    _, data = quick_run
    assert data["quick"] is True
    assert data["duration_s"] < 60
    assert data["errors"] == {}


@pytest.mark.kvm
def test_every_model_and_direction_is_there(quick_run):
    _, data = quick_run
    section = data["io_models"]
    assert [m["key"] for m in section["models"]] == [
        "uart_python", "uart_c", "uart_coalesced", "virtio", "virtio_c", "virtio_python"]
    rows = {(r["model"], r["direction"]): r for r in section["rows"]}
    assert set(rows) == {(m, d) for m in [m["key"] for m in section["models"]] for d in ("tx", "rx")}
    for key, row in rows.items():
        if key in APPLICABLE:
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "n/a" and row["reason"], row


@pytest.mark.kvm
def test_numbers_are_positive_and_ratios_come_from_the_same_run(quick_run):
    _, data = quick_run
    rows = [r for r in data["io_models"]["rows"] if r["status"] == "ok"]
    baseline = {r["direction"]: r for r in rows if r["model"] == "uart_python"}
    for r in rows:
        for field in ("bytes", "guest_seconds", "wall_seconds", "mb_per_s", "wall_mb_per_s", "user_exits",
                      "user_exits_per_kb"):
            assert r[field] > 0, (r["model"], r["direction"], field)
        assert r["kvm_exits"] is None or r["kvm_exits"] >= r["user_exits"]
        assert r["runs"] == data["io_models"]["reps"] == len(r["samples_guest_seconds"])
        assert math.isclose(r["mb_per_s"], r["bytes"] / r["guest_seconds"] / 1e6)
        assert math.isclose(r["ratio_to_a"], r["mb_per_s"] / baseline[r["direction"]]["mb_per_s"])
    for r in baseline.values():
        assert r["ratio_to_a"] == pytest.approx(1.0)
    # What each model is about, in exits: one per byte out, two per byte in
    # for the emulated UART; one per ring for coalesced PIO; almost none for virtio.
    by = {(r["model"], r["direction"]): r for r in rows}
    assert by["uart_python", "tx"]["user_exits_per_kb"] == pytest.approx(1024, rel=0.01)
    assert by["uart_python", "rx"]["user_exits_per_kb"] == pytest.approx(2048, rel=0.01)
    assert by["uart_coalesced", "tx"]["user_exits_per_kb"] < 20
    assert by["virtio", "tx"]["user_exits_per_kb"] < 0.1
    assert by["virtio", "tx"]["doorbells"] > 0


@pytest.mark.kvm
def test_virtio_beats_the_emulated_uart_by_the_target(quick_run):
    proc, data = quick_run
    targets = data["io_models"]["targets"]
    assert [t["value"] is not None for t in targets] == [True, True]
    for t in targets:
        assert t["met"], t
    assert "| (d) virtio-console, ioeventfd + irqfd |" in proc.stdout
    assert "≥ 20×" in proc.stdout


def test_markdown_marks_missing_directions():
    from pykvm.bench.io_models import MODELS, markdown, targets

    rows = []
    for model in MODELS:
        for direction in ("tx", "rx"):
            if direction in model.not_applicable:
                rows.append({"model": model.key, "direction": direction, "status": "n/a",
                             "reason": model.not_applicable[direction]})
            else:
                rows.append({"model": model.key, "direction": direction, "status": "ok", "mb_per_s": 2.0,
                             "user_exits_per_kb": 1024.0, "exits_per_kb": None, "ratio_to_a": 50.0})
    section = {"guest": "iobench64u", "guest_mode": "long_user (CPL 3)", "reps": 3, "rows": rows,
               "models": [{"key": m.key, "label": m.label, "title": m.title} for m in MODELS],
               "targets": targets(rows)}
    text = "\n".join(markdown(section))
    assert "| (b) 16550, C loop | 2.0 | 1,024 / n/a | 50× | n/a [1] |" in text
    assert "[2] KVM coalesces writes only" in text
    assert text.count("| yes |") == 2
