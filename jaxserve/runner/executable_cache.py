"""Compiled step programs kept on disk as executables: a warm start loads them without
tracing, lowering or a compilation-cache lookup.

JAX's persistent compilation cache is keyed by the lowered program, so a warm start still
traces and lowers every program to find its entry (about 0.2 s per forward program of a
small model on a 2-core CPU). This cache is keyed before tracing, by what the program is
built from: `ExecutableCache.context` digests the jaxserve and kernel sources, the JAX
version, the devices and XLA flags, and the runner's description of the programs (model
config, attention backend, abstract params and pools with their shardings); each entry
adds the program's kind and buckets. A hit is `jax.experimental.serialize_executable`'s
executable, loaded as a `jax.stages.Compiled`; a miss, or an entry that fails to load,
compiles as before and writes the entry (a temporary file renamed into place, so a
reader never sees half of one) if XLA compiled it. An executable JAX read from its
persistent cache cannot be written (on the CPU it re-serializes without some of its
functions): such a program is remembered, and `store_unstored` compiles it again with JAX's
cache bypassed and writes that. So entries appear on a cold start, and after new sources
(an upgrade, whose programs JAX's cache mostly still holds) once the background pass ends.
Entries are pickles of executables: like the compilation cache's, the directory must be the
user's own, never one others can write.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

SUBDIR = "jaxserve-executables"
PERSISTENT_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # JAX's monitoring event
# Sources whose change may change a program: the engine's and its kernels'.
_SOURCE_SUFFIXES = (".py", ".cc", ".h")


def source_digest() -> str:
    """sha256 over the jaxserve and pallas_kernels sources (relative path and contents)."""
    import jaxserve
    import pallas_kernels

    digest = hashlib.sha256()
    for package in (jaxserve, pallas_kernels):
        root = Path(package.__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def environment_description() -> str:
    """What a compiled program depends on beyond its own inputs: versions, devices, flags."""
    import jaxlib

    devices = jax.devices()
    return repr((jax.__version__, jaxlib.__version__, jax.default_backend(),
                 [(d.id, d.device_kind) for d in devices], jax.process_count(),
                 os.environ.get("XLA_FLAGS", ""), jax.config.jax_enable_x64,
                 jax.config.jax_default_matmul_precision))


class ExecutableCache:
    def __init__(self, directory: str | os.PathLike, description: str):
        """`description`: the runner's account of its programs (model config, backend,
        abstract arguments); with the sources and environment it keys every entry."""
        self.directory = Path(directory) / SUBDIR
        self.context = hashlib.sha256(
            "\n".join((source_digest(), environment_description(), description)).encode()
        ).hexdigest()
        self.reading = True  # see use_for
        self._tracking = threading.local()  # JAX cache hits of this thread's compilation
        # program -> its lowering: compiled from JAX's persistent cache, no entry written yet
        self._unstored: dict[str, Callable[[], jax.stages.Lowered]] = {}
        self.hits = 0
        self.misses = 0

    def path(self, program: str) -> Path:
        name = hashlib.sha256(f"{self.context}\n{program}".encode()).hexdigest()
        return self.directory / f"{name}.exe"

    def use_for(self, programs: list[str]) -> None:
        """Reads entries only if every one of `programs` has one; else only writes them.

        All or nothing: a program traced in the background thread while a step runs a
        deserialized executable can come out corrupted (seen with jax 0.10.2 on the CPU:
        a lowering error or wrong shapes in the background's trace); with every entry on
        disk nothing is traced at all, and without them every program is traced and
        compiled as without this cache."""
        self.reading = all(self.path(p).exists() for p in programs)

    def get_or_compile(self, program: str,
                       lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
        """The executable of `program` (its kind and buckets, e.g. "forward 16 8"): from the
        cache when reading (`use_for`), else `lower().compile()`, stored when new."""
        path = self.path(program)
        loaded = self._load(path) if self.reading else None
        if loaded is not None:
            self.hits += 1
            return loaded
        self.misses += 1
        self._tracking.hits = 0
        self._tracking.on = True
        jax.monitoring.register_event_listener(self._on_event)
        try:
            compiled = lower().compile()
        finally:
            self._tracking.on = False
            jax.monitoring.unregister_event_listener(self._on_event)
        # Only a fresh compilation is stored: on the CPU, an executable JAX read from its
        # persistent cache serializes without some of its functions ("Function ... not
        # found" when a restart runs it).
        if not path.exists():
            if self._tracking.hits:
                self._unstored[program] = lower
            else:
                self._store(path, compiled)
        return compiled

    @property
    def num_unstored(self) -> int:
        """Programs JAX's persistent cache supplied that have no entry here yet."""
        return len(self._unstored)

    def store_unstored(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Compiles each program JAX's persistent cache supplied again, bypassing that
        cache, and writes its entry, so the next start loads every program; `stop()` is
        asked between programs. Returns how many entries were written. For a background
        thread: it costs a compilation per program, once after new sources."""
        stored = 0
        while self._unstored and not stop():
            program, lower = self._unstored.popitem()
            path = self.path(program)
            if path.exists():  # another process wrote it meanwhile
                continue
            try:
                with _without_persistent_cache():  # and JAX's in-memory cache missed:
                    compiled = lower().compile(compiler_options=_FRESH_OPTIONS)
            except Exception as e:  # as in `_store`: only the next start is slower
                logger.warning("could not compile %s again to store it: %s", program, e)
                continue
            self._store(path, compiled)
            stored += path.exists()
        return stored

    def _on_event(self, event: str, **kwargs) -> None:
        if event == PERSISTENT_CACHE_HIT and getattr(self._tracking, "on", False):
            self._tracking.hits += 1

    @staticmethod
    def _load(path: Path) -> jax.stages.Compiled | None:
        from jax.experimental import serialize_executable

        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree, device_ids = pickle.load(f)
            devices = {d.id: d for d in jax.devices()}
            # the devices it was compiled for (else it would expect a shard on every device)
            return serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree,
                execution_devices=[devices[i] for i in device_ids])
        except FileNotFoundError:
            return None
        except Exception as e:  # a stale or damaged entry: compile it again, rewrite it
            logger.warning("executable cache entry %s does not load (%s): compiling", path, e)
            path.unlink(missing_ok=True)
            return None

    def _store(self, path: Path, compiled: jax.stages.Compiled) -> None:
        from jax.experimental import serialize_executable

        try:
            device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
            entry = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(entry)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as e:  # the program works; only the next start is slower
            logger.warning("could not store executable %s: %s", path, e)


@contextlib.contextmanager
def _without_persistent_cache() -> Iterator[None]:
    """JAX's persistent compilation cache switched off for the compilations inside.

    The switch is process-wide (JAX decides once whether its cache is used; `reset_cache`
    makes it decide again): a compilation elsewhere at the same time only misses the cache.
    `_FRESH` keeps two of these from interleaving and restoring the wrong setting."""
    from jax.experimental.compilation_cache import compilation_cache

    with _FRESH:
        enabled = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            yield
        finally:
            jax.config.update("jax_enable_compilation_cache", enabled)
            compilation_cache.reset_cache()


# An XLA option at its default value: the same program, under another key of JAX's
# in-memory compilation cache (which would hand back the executable it read from disk).
_FRESH_OPTIONS = {"xla_dump_max_hlo_modules": -1}
_FRESH = threading.Lock()  # held by `_without_persistent_cache` (a lock, no state)
