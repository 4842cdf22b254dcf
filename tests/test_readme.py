"""The README's Python examples run and print what the README says they print."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_example(index: int) -> str:
    """Run the README's ``index``-th Python example; its stdout (it must exit 0)."""
    out = subprocess.run([sys.executable, "-c", examples()[index]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.kvm
def test_raw_layer_example_prints_what_the_readme_says():
    stdout = run_example(0)
    assert stdout.splitlines() == [
        "IoOut(port=1016, size=1, count=1, data=b'A')",
        "IoIn(port=96, size=1, count=1)",
        "Hlt()",
        "0x2a",
    ]


@pytest.mark.kvm
def test_machine_example_counts_primes():
    stdout = run_example(1)
    assert stdout.startswith("primes below 1000000: 78498\n")
    assert "reset 78498" in stdout


@pytest.mark.kvm
def test_virtio_example_echoes_through_the_console():
    stdout = run_example(2)
    assert stdout.splitlines() == [
        "virtio_mmio.device=0x200@0xd0000000:5",
        "virtio64u: virtio-console ready at 0xd0000000, polling",
        "virtio64u: echo ok, 29 bytes",
        "reset 29",
    ]
