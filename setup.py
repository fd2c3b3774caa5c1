"""Build script: the only thing it adds to pyproject.toml is the C++ CPU kernels (csrc/, pybind11 + OpenMP).

Environment variables:
  DIFFRL_FAST_NO_CPP=1     skip the extension; the package then falls back to the torch backend on CPU.
  DIFFRL_FAST_PORTABLE=1   compile for generic x86-64 instead of -march=native (for wheels that travel).
"""
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("DIFFRL_FAST_NO_CPP", "0") != "1":
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    compile_args = ["-O3", "-fopenmp"]
    if os.environ.get("DIFFRL_FAST_PORTABLE", "0") != "1" and sys.platform.startswith("linux"):
        compile_args.append("-march=native")
    ext_modules.append(
        Pybind11Extension(
            "diffrl_fast._C",
            sources=["csrc/bindings.cpp", "csrc/step_kernels.cpp"],
            include_dirs=["csrc"],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
