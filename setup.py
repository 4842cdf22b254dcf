"""Build pykvm: the cffi extension (pykvm._native) and the tiny guests.

``cffi_modules`` compiles csrc/ against the kernel's <linux/kvm.h>; the
build_py step runs ``make -C guests`` so the flat guest binaries ship inside
the package (pykvm/guests/bin/).  Metadata lives in pyproject.toml.
"""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGuests(build_py):
    """build_py that also assembles the guests into the build tree."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        out = os.path.join(os.path.abspath(self.build_lib), "pykvm", "guests", "bin")
        os.makedirs(out, exist_ok=True)
        subprocess.check_call(["make", "-C", os.path.join(here, "guests"), f"OUT={out}",
                               f"BUILD={os.path.join(os.path.abspath(self.get_finalized_command('build').build_temp), 'guests')}"])


setup(
    cffi_modules=["pykvm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuests},
)
