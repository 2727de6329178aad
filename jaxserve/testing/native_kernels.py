"""Test helpers for the native CPU kernels: when a kernel test may skip, and which build
targets it runs on.

A kernel test skips only when no C++ compiler exists (`needs_compiler`); with a compiler a
failed build is a failure. `kernel_marches()` lists the -march targets worth running on this
CPU: "native" and each x86-64 level it can execute whose kernel code path differs.
"""

import pytest

from pallas_kernels.cpu import build

needs_compiler = pytest.mark.skipif(
    not build.has_compiler(), reason="no C++ compiler ($CXX, g++, c++ or clang++) on PATH")


def kernel_marches() -> list[str]:
    """"native", then each x86-64 level this CPU can execute whose kernel code path (the
    SIMD macros it enables, `build.code_path`) differs from native's and from the levels
    already taken: on an AVX-512 BF16 CPU native, x86-64-v4, -v3 and -v2; on an AVX2 CPU
    native and x86-64-v2."""
    if not build.has_compiler():
        return ["native"]
    marches, paths = ["native"], {build.code_path("native")}
    for level in reversed(build.X86_LEVELS):
        if build.can_execute(level) and build.code_path(level) not in paths:
            marches.append(level)
            paths.add(build.code_path(level))
    return marches
