"""Builds and loads the native CPU kernels: C++ sources compiled at first use, then cached.

XLA:CPU has no Pallas lowering, so the CPU kernels are C++ XLA FFI handlers. `ffi_target`
compiles `<name>.cc` beside this file with the system C++ compiler (`$CXX`, else `g++`,
else `c++`, else `clang++`) for one `-march` target, loads it, registers its handlers with
XLA once per process and returns the XLA name of one of them. The target is the caller's
`march`, else `$JAXSERVE_CPU_MARCH`, else "native" (this machine's CPU); each target is
its own library and its own set of XLA names, so one process can run the AVX-512, AVX2 and
baseline builds side by side (the tests do). Libraries are cached on disk, keyed by a hash
of the source, the shared headers (`*.h`), the flags, the compiler, jaxlib and, for
"native", the CPU's features. A missing compiler or a failed build raises
`NativeKernelUnavailable` with the compiler's message; `available` logs it once and
returns False so callers can fall back to XLA's ops.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
          "-fno-math-errno", "-fno-trapping-math", "-pthread")
MARCH_ENV = "JAXSERVE_CPU_MARCH"
# The x86-64 levels the kernels are written for: baseline SSE4.2, AVX2 + FMA, AVX-512, and
# AVX-512 with BF16 dot products (g++ 12 has no znver4; sapphirerapids has AVX512_BF16).
X86_LEVELS = ("x86-64-v2", "x86-64-v3", "x86-64-v4", "sapphirerapids")
_MARCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class NativeKernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here (no compiler, or it failed)."""


def cache_dir() -> Path:
    """`$JAXSERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/jaxserve/kernels`, else ~/.cache/..."""
    explicit = os.environ.get("JAXSERVE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxserve" / "kernels"


def compiler() -> str:
    """Path of the C++ compiler to use; raises NativeKernelUnavailable when there is none."""
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise NativeKernelUnavailable("no C++ compiler found ($CXX, g++, c++ or clang++): the "
                                  "native CPU kernels need one (apt install g++)")


def has_compiler() -> bool:
    """Whether a C++ compiler exists here (the only reason a kernel test may skip)."""
    try:
        compiler()
    except NativeKernelUnavailable:
        return False
    return True


def resolve_march(march: str | None = None) -> str:
    """The `-march` value to build for: `march`, else $JAXSERVE_CPU_MARCH, else "native"."""
    march = march or os.environ.get(MARCH_ENV) or "native"
    if not _MARCH_RE.fullmatch(march):
        raise ValueError(f"march must be a -march value such as native or x86-64-v3, got "
                         f"{march!r} (from the argument or ${MARCH_ENV})")
    return march


def _tag(march: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", march)


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(name: str, source: bytes, cxx: str, march: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h"))]
    machine = _cpu_features() if march == "native" else ""  # a named target is portable
    key = hashlib.sha256(b"\0".join(
        [source, *headers, " ".join(_FLAGS).encode(), march.encode(), version.encode(),
         jax.__version__.encode(), platform.machine().encode(), machine.encode()]
    )).hexdigest()[:16]
    return cache_dir() / f"{name}-{_tag(march)}-{key}.so"


@functools.cache
def load(name: str, march: str) -> ctypes.CDLL:
    """The compiled `<name>.cc` of this directory for `-march=<march>`, built on first use
    and cached on disk."""
    source_path = Path(__file__).with_name(f"{name}.cc")
    source = source_path.read_bytes()
    cxx = compiler()
    target = _library_path(name, source, cxx, march)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [cxx, *_FLAGS, f"-march={march}", f"-I{jax.ffi.include_dir()}",
                   str(source_path), "-o", tmp]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            os.unlink(tmp)
            errors = [line for line in built.stderr.splitlines() if "error" in line]
            raise NativeKernelUnavailable(
                f"building {source_path.name} for -march={march} failed:\n"
                f"{' '.join(command)}\n" + "\n".join(errors[:20] or [built.stderr[-4000:]]))
        os.replace(tmp, target)
    try:
        return ctypes.cdll.LoadLibrary(str(target))
    except OSError as e:
        raise NativeKernelUnavailable(f"loading {target} failed: {e}") from e


@functools.cache
def _register(name: str, targets: tuple[str, ...], march: str) -> None:
    library = load(name, march)
    for symbol in targets:
        handler = getattr(library, symbol)
        jax.ffi.register_ffi_target(f"jaxserve_{symbol}__{_tag(march)}",
                                    jax.ffi.pycapsule(handler), platform="cpu")


def ffi_target(name: str, targets: tuple[str, ...], symbol: str,
               march: str | None = None) -> str:
    """The XLA name of handler `symbol` of `<name>.cc` built for `march` (see
    `resolve_march`); builds and registers every handler in `targets` on first use."""
    march = resolve_march(march)
    _register(name, targets, march)
    return f"jaxserve_{symbol}__{_tag(march)}"


@functools.cache
def _available(name: str, targets: tuple[str, ...], march: str) -> bool:
    try:
        _register(name, targets, march)
    except NativeKernelUnavailable as e:
        logger.warning("native CPU kernel %s.cc unavailable, falling back to XLA's ops: %s",
                       name, e)
        return False
    return True


def available(name: str, targets: tuple[str, ...], march: str | None = None) -> bool:
    """Whether `<name>.cc` builds and registers here for `march` (False instead of raising;
    the reason, the compiler's errors included, is logged once as a warning)."""
    return _available(name, targets, resolve_march(march))


@functools.cache
def _feature_macros(march: str) -> frozenset[str]:
    """The upper-case predefined macros (__AVX2__, __AVX512F__, ...) of `-march=<march>`."""
    out = subprocess.run([compiler(), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise NativeKernelUnavailable(f"{compiler()} does not know -march={march}: "
                                      f"{out.stderr.strip()[-500:]}")
    return frozenset(re.findall(r"#define (__[A-Z0-9_]+__) ", out.stdout))


def can_execute(march: str) -> bool:
    """Whether code built for `march` runs on this CPU: every instruction-set macro the
    compiler defines for it is also defined for "native"."""
    try:
        return _feature_macros(resolve_march(march)) <= _feature_macros("native")
    except NativeKernelUnavailable:
        return False


# The macros that select the kernels' code paths (see matmul_common.h and common.h).
PATH_MACROS = ("__AVX2__", "__FMA__", "__AVX512F__", "__AVX512BW__", "__AVX512VL__",
               "__AVX512BF16__")


def code_path(march: str) -> frozenset[str]:
    """Which of PATH_MACROS `march` enables: two targets with the same set run the same
    kernel code."""
    return _feature_macros(resolve_march(march)) & frozenset(PATH_MACROS)


def describe(march: str | None = None) -> str:
    """One line for benchmark tables: the CPU model and SIMD flags, and the build target
    with the kernel code path it selects, e.g. "AMD EPYC (avx2 fma); kernels -march=native:
    AVX2 + FMA"."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info:
        model += f" family {info['cpu family']} model {info.get('model', '?')}"
    flags = set((info.get("flags") or info.get("Features") or "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    march = resolve_march(march)
    try:
        path = code_path(march)
        selected = ("AVX-512 BF16" if "__AVX512BF16__" in path and "__AVX512F__" in path
                    else "AVX-512 (bf16 via AVX2)" if "__AVX512F__" in path
                    else "AVX2 + FMA" if "__AVX2__" in path else "portable C++ (no SIMD path)")
    except NativeKernelUnavailable as e:
        selected = f"unavailable ({e})"
    return f"{model} ({' '.join(simd) or 'no AVX2'}); kernels -march={march}: {selected}"
