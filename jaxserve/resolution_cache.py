"""What transformers resolves from a checkpoint, kept on disk for the next start.

transformers' config classes and `AutoTokenizer` import torch wherever it is installed, and
its auto modules, only to fill defaults and pick a class: seconds of a start. The first start
with a cache directory (the compilation cache's) records both: the HF config as its
`to_dict()` and the tokenizer class `AutoTokenizer` chose. Later starts read the config back
as a `CachedHFConfig` and load the tokenizer through its own class, neither of which imports
torch.

Records live under `<cache_dir>/jaxserve-resolved/<key>.<kind>.json`. The key hashes the
transformers version and the checkpoint's own files (config, generation config, tokenizer
files; for a GGUF file, which may be gigabytes, its path, size and modification time), so an
edited checkpoint or another transformers version resolves afresh. A record that cannot be
read is ignored and written again. A GGUF file's tokenizer, which transformers builds from
the file's metadata, is kept whole: saved as an HF tokenizer directory beside the records
(`<key>.tokenizer/`) and loaded from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable

_SUBDIR = "jaxserve-resolved"
# The files of an HF directory whose bytes can change what transformers resolves.
_KEYED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
                "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


class CachedHFConfig:
    """A transformers config read back from its `to_dict()`: attribute reads (the class's
    `attribute_map` aliases included), `to_dict()` and `save_pretrained(dir)`."""

    def __init__(self, values: dict, attribute_map: dict[str, str]):
        self.__dict__.update(values)
        self.__dict__["_attribute_map"] = dict(attribute_map)

    def __getattr__(self, name: str):  # only for names not set: the aliases
        target = self.__dict__["_attribute_map"].get(name)
        if target is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self, target)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_attribute_map"}

    def save_pretrained(self, out_dir) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


def resolved_hf_config(path: str, cache_dir: str | None, resolve: Callable[[], object]):
    """`resolve()` (a transformers config), or its record from an earlier start."""
    record_path = _record_path(cache_dir, path, "config")
    record = _read(record_path)
    if record is not None:
        return CachedHFConfig(record["values"], record["attribute_map"])
    hf = resolve()
    _write(record_path, {"class": type(hf).__name__, "values": hf.to_dict(),
                         "attribute_map": dict(getattr(hf, "attribute_map", {}))})
    return hf


def resolved_tokenizer(path: str, cache_dir: str | None):
    """`AutoTokenizer.from_pretrained(path)`, through the class it chose last time if known."""
    import transformers

    record_path = _record_path(cache_dir, path, "tokenizer")
    record = _read(record_path)
    cls = getattr(transformers, record["class"], None) if record is not None else None
    if cls is not None:
        return cls.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if getattr(transformers, type(tokenizer).__name__, None) is type(tokenizer):
        _write(record_path, {"class": type(tokenizer).__name__})  # not remote or local code
    return tokenizer


def resolved_gguf_tokenizer(gguf_file: str, cache_dir: str | None, build: Callable[[], object]):
    """`build()` (a GGUF file's tokenizer, which transformers' converter assembles token by
    token from the file's metadata: seconds), or the HF tokenizer directory an earlier start
    saved from it, loaded as `resolved_tokenizer` loads one."""
    record_path = _record_path(cache_dir, gguf_file, "tokenizer")
    if record_path is None:
        return build()
    folder = record_path.removesuffix(".json")  # a directory: tokenizer.json, its config
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        with contextlib.suppress(OSError, ValueError):
            return resolved_tokenizer(folder, cache_dir)
    tokenizer = build()
    temporary = f"{folder}.{os.getpid()}.tmp"
    try:  # renamed into place whole: another start sees all of it or none
        tokenizer.save_pretrained(temporary)
        if os.path.isdir(folder):  # unreadable above: replaced
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    except (OSError, TypeError, ValueError):
        shutil.rmtree(temporary, ignore_errors=True)
    return tokenizer


def _record_path(cache_dir: str | None, path: str, kind: str) -> str | None:
    if cache_dir is None:
        return None
    digest = hashlib.sha256(importlib.metadata.version("transformers").encode())
    if os.path.isfile(path):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        for name in _KEYED_FILES:
            file = os.path.join(path, name)
            if os.path.isfile(file):
                digest.update(name.encode() + b"\0")
                with open(file, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
    return os.path.join(cache_dir, _SUBDIR, f"{digest.hexdigest()[:32]}.{kind}.json")


def _read(record_path: str | None) -> dict | None:
    if record_path is None:
        return None
    try:
        with open(record_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(record_path: str | None, record: dict) -> None:
    """Atomic (a temporary file renamed), and best effort: a read-only cache only costs time."""
    if record_path is None:
        return
    temporary = f"{record_path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        with open(temporary, "w") as f:
            json.dump(record, f)
        os.replace(temporary, record_path)
    except (OSError, TypeError, ValueError):  # unwritable, or a value JSON cannot hold
        with contextlib.suppress(OSError):
            os.remove(temporary)
