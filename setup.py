"""Builds our C++ kernels (src/minillm/kernels/csrc) at install, when torch is importable.

`pip install --no-build-isolation -e .` after `pip install torch==2.13.0`: the kernels are compiled
here against the torch you run. With build isolation pip's build environment has no torch (or would
fetch another one), so the kernels are skipped and compiled on first use instead (minillm.kernels).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if importlib.util.find_spec("torch") is not None:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # the flags live beside the loader so that first-use builds match
    spec = importlib.util.spec_from_file_location("_flags", Path("src/minillm/kernels/flags.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    ext_modules = [CppExtension(f"minillm.kernels._{name}", [f"src/minillm/kernels/csrc/{s}" for s in sources],
                                extra_compile_args=cflags, extra_link_args=["-fopenmp"])
                   for name, (sources, cflags) in flags.EXTENSIONS.items()]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
else:
    print("minillm: torch is not importable here, so the C++ kernels will be compiled on first use "
          "(install with --no-build-isolation after torch to build them now)", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
