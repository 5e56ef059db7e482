"""Builds every csrc/*.cpp into one pybind11 extension, engine._C, with OpenMP and -O3.

The AVX2+FMA+F16C and AVX-512F kernels (csrc/avx2.cpp, csrc/avx512.cpp) are compiled with
function-level target options (`#pragma GCC target`), not -mavx2, and chosen at run time from the
CPU's features, so the module imports and runs on CPUs without them (portable C++ fallback; on
non-x86 hosts the intrinsic files compile to nothing). The same holds for the AMX / AVX512-BF16
kernels (csrc/bf16.cpp): target pragmas, run-time cpuid/XGETBV checks and the Linux AMX permission
request; compilers older than GCC 11 / clang 12 build the module without them. SPARSE_ENGINE_CFLAGS replaces the default compile
flags (e.g. SPARSE_ENGINE_CFLAGS="-O0 -g" for debugging); SPARSE_ENGINE_NO_OPENMP=1 drops OpenMP.
"""
import glob
import os
import shlex

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

cflags = shlex.split(os.environ.get("SPARSE_ENGINE_CFLAGS", "-O3 -fno-math-errno"))
ldflags = []
if os.environ.get("SPARSE_ENGINE_NO_OPENMP") != "1":
    cflags.append("-fopenmp")
    ldflags.append("-fopenmp")

ext = Pybind11Extension(
    "engine._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
