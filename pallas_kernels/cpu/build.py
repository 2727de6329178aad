"""Builds and loads the native CPU kernels: C++ sources compiled at first use, then cached.

XLA:CPU has no Pallas lowering, so the CPU kernels are C++ XLA FFI handlers. `load(name)`
compiles `<name>.cc` beside this file with the system C++ compiler (`$CXX`, else `g++`,
else `c++`) for this machine's CPU (`-march=native`) into the cache directory, keyed by a
hash of the source, the shared headers (`*.h`), the flags, the compiler, jaxlib and the
CPU's features, then loads it.
`register(name, targets)` also registers its handlers with XLA once per process. A missing
compiler or a failed build raises `NativeKernelUnavailable`; callers fall back to jnp.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
          "-fno-math-errno", "-fno-trapping-math", "-pthread")


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


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(name: str, source: bytes, cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_bytes() for h in sorted(Path(__file__).parent.glob("*.h"))]
    key = hashlib.sha256(b"\0".join(
        [source, *headers, " ".join(_FLAGS).encode(), version.encode(), jax.__version__.encode(),
         platform.machine().encode(), _cpu_features().encode()])).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.so"


@functools.cache
def load(name: str) -> ctypes.CDLL:
    """The compiled `<name>.cc` of this directory, built on first use and cached on disk."""
    source_path = Path(__file__).with_name(f"{name}.cc")
    source = source_path.read_bytes()
    cxx = compiler()
    target = _library_path(name, source, cxx)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(source_path), "-o", tmp]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            os.unlink(tmp)
            raise NativeKernelUnavailable(f"building {source_path.name} failed:\n"
                                          f"{' '.join(command)}\n{built.stderr[-4000:]}")
        os.replace(tmp, target)
    try:
        return ctypes.cdll.LoadLibrary(str(target))
    except OSError as e:
        raise NativeKernelUnavailable(f"loading {target} failed: {e}") from e


@functools.cache
def register(name: str, targets: tuple[str, ...]) -> None:
    """Builds `<name>.cc` and registers each exported handler symbol as an XLA CPU target.

    A target's XLA name is the symbol name prefixed with "jaxserve_".
    """
    library = load(name)
    for symbol in targets:
        handler = getattr(library, symbol)
        jax.ffi.register_ffi_target(f"jaxserve_{symbol}", jax.ffi.pycapsule(handler),
                                    platform="cpu")


def available(name: str, targets: tuple[str, ...]) -> bool:
    """Whether `<name>.cc` builds and registers here (False instead of raising)."""
    try:
        register(name, targets)
    except NativeKernelUnavailable:
        return False
    return True
