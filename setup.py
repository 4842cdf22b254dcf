"""Build pykvm: the cffi extension (pykvm._native) and the tiny guests.

``cffi_modules`` compiles csrc/ against the kernel's <linux/kvm.h>; the
build_py step runs ``make -C guests`` so the flat guest binaries ship inside
the package (pykvm/guests/bin/).  Metadata lives in pyproject.toml.
"""

import os
import pathlib
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext
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


class BuildExtOneCopy(build_ext):
    """build_ext that, building in place (``pip install -e .``), leaves one ``_native*.so``.

    ``make`` builds the same extension under the interpreter's own suffix; the
    two must never sit side by side, where the stale one may be imported.
    """

    def run(self):
        super().run()
        if self.inplace:
            for ext in self.extensions:
                built = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
                for other in built.parent.glob(built.name.split(".")[0] + "*.so"):
                    if other != built:
                        other.unlink()


setup(
    cffi_modules=["pykvm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuests, "build_ext": BuildExtOneCopy},
)
