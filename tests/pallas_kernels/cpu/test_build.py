"""The native CPU kernels compile for every x86-64 level (and aarch64 where a cross compiler
is installed); the build target comes from the argument or $JAXSERVE_CPU_MARCH; a failed
build is an error that carries the compiler's message, and `available` logs it.

A syntax check takes seconds per target. The default run checks sapphirerapids (the AVX-512
and AVX-512 BF16 paths), which an AVX2 machine never builds otherwise, and aarch64 (the
non-x86 branches); the other levels are slow: v2 and v3 (the portable and AVX2 paths)
because the kernel tests build and run them on every x86 machine with AVX2
(`kernel_marches`), v4 because it differs from sapphirerapids only where BF16 is missing.
"""

import logging
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import jax

from jaxserve.testing.native_kernels import kernel_marches, needs_compiler
from pallas_kernels.cpu import build

pytestmark = needs_compiler

SOURCES = sorted(Path(build.__file__).parent.glob("*.cc"))
X86 = platform.machine() in ("x86_64", "AMD64", "i686")


def _syntax_check(cxx: str, flags: list[str]) -> None:
    """Every .cc through `cxx -fsyntax-only` with `flags`, two at a time."""
    include = [f"-I{jax.ffi.include_dir()}", f"-I{SOURCES[0].parent}"]
    runs = [(src, subprocess.Popen([cxx, "-std=c++17", "-fsyntax-only", *flags, *include,
                                    str(src)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True))
            for src in SOURCES]
    failed = [f"{src.name}:\n{proc.communicate()[1][-3000:]}" for src, proc in runs
              if proc.wait() != 0]
    assert not failed, f"{' '.join(flags)}: " + "\n".join(failed)


@pytest.mark.skipif(not X86, reason="the x86-64 levels need an x86 compiler")
@pytest.mark.parametrize("level", [
    pytest.param(level, marks=() if level == "sapphirerapids" else pytest.mark.slow)
    for level in build.X86_LEVELS])
def test_every_kernel_compiles_for_every_x86_level(level):
    _syntax_check(build.compiler(), [f"-march={level}"])


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
def test_every_kernel_compiles_for_aarch64():
    _syntax_check(shutil.which("aarch64-linux-gnu-g++"), ["-march=armv8-a"])


def test_the_target_is_the_argument_else_the_environment_else_native(monkeypatch):
    monkeypatch.delenv(build.MARCH_ENV, raising=False)
    assert build.resolve_march() == "native"
    monkeypatch.setenv(build.MARCH_ENV, "x86-64-v3")
    assert build.resolve_march() == "x86-64-v3"
    assert build.resolve_march("x86-64-v2") == "x86-64-v2"
    with pytest.raises(ValueError, match="march"):
        build.resolve_march("native -O0")


def test_a_failed_build_carries_the_compilers_message(caplog):
    targets = ("set_rows_cpu",)
    with pytest.raises(build.NativeKernelUnavailable, match="no-such-cpu"):
        build.ffi_target("set_rows", targets, "set_rows_cpu", march="no-such-cpu")
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert not build.available("set_rows", targets, march="no-such-cpu")
    assert "falling back" in caplog.text and "no-such-cpu" in caplog.text
    assert "error" in caplog.text  # the compiler's own words


def test_each_target_registers_its_own_xla_names():
    first = build.ffi_target("set_rows", ("set_rows_cpu",), "set_rows_cpu", march="native")
    assert first == "jaxserve_set_rows_cpu__native"
    if X86 and build.can_execute("x86-64-v2"):
        other = build.ffi_target("set_rows", ("set_rows_cpu",), "set_rows_cpu",
                                 march="x86-64-v2")
        assert other == "jaxserve_set_rows_cpu__x86_64_v2"


@pytest.mark.skipif(not X86, reason="x86-64 levels")
def test_levels_this_cpu_runs_and_their_code_paths():
    assert build.can_execute("native")
    assert build.can_execute("x86-64-v2")  # every x86-64 CPU jax runs on has SSE4.2
    assert build.code_path("x86-64-v2") == frozenset()
    assert build.code_path("x86-64-v3") == {"__AVX2__", "__FMA__"}
    assert {"__AVX512F__", "__AVX512BF16__"} <= build.code_path("sapphirerapids")
    marches = kernel_marches()
    assert marches[0] == "native" and "x86-64-v2" in marches
    assert len({build.code_path(m) for m in marches}) == len(marches)  # no path twice
