"""Where decoded images are kept between epochs: `data.cache` = auto | memory | disk | none.

- memory: tf.data's in-memory cache, filled in the first epoch (a decoded CelebA face is 116 KB).
- disk: a tf.data cache file in `data.cache_dir`, named by what it holds (the source, the partition,
  the chosen examples and the preprocessing), so a later run on the same data reads it instead of
  decoding again. It is written under a name of this process's own and published under the shared
  name only when complete: a writer that dies leaves nothing that blocks a rerun or a parallel job.
- none: decode every epoch (reading and decoding are parallel and prefetched either way).
- auto: memory when it fits `data.cache_memory` (a fraction of the RAM available now), else disk when
  it fits in half the free space of `data.cache_dir`, else none. Pixels already in memory (MNIST)
  are not cached again.

Training and validation images are cached (read every epoch); test images are read once.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHED_ROLES = ("train", "valid")
_PARTIAL = ".partial."  # <key>.partial.<host>.<pid>.<random>: a cache file still being written


@dataclass(frozen=True)
class Need:
    """What caching one role would take: how many examples of how many bytes each."""

    examples: int
    bytes_each: int
    encoded: bool  # decoded from JPEG/PNG (worth caching) or pixels already in memory

    @property
    def bytes(self) -> int:
        return self.examples * self.bytes_each


def cache_dir(data: dict[str, Any]) -> Path:
    if data.get("cache_dir"):
        return Path(data["cache_dir"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnflow" / "tf.data"


def plan(data: dict[str, Any], needs: dict[str, Need]) -> dict[str, str]:
    """role -> memory | disk | none, as `data.cache` asks; `auto` shares one memory budget and one
    disk budget between the roles, training first."""
    mode = data.get("cache") or "none"
    if mode != "auto":
        return {role: mode if role in CACHED_ROLES else "none" for role in needs}
    memory, disk = budgets(data)
    chosen = {}
    for role, need in needs.items():
        if role not in CACHED_ROLES or not need.encoded:
            chosen[role] = "none"
        elif need.bytes <= memory:
            chosen[role], memory = "memory", memory - need.bytes
        elif need.bytes <= disk:
            chosen[role], disk = "disk", disk - need.bytes
        else:
            chosen[role] = "none"
    return chosen


def budgets(data: dict[str, Any]) -> tuple[float, float]:
    """Bytes `auto` may cache in memory (data.cache_memory of the RAM available now) and on disk
    (half the free space where data.cache_dir is)."""
    import shutil

    import psutil

    folder = cache_dir(data)
    while not folder.exists():  # the cache folder is made on first use: ask its nearest existing parent
        folder = folder.parent
    return data["cache_memory"] * psutil.virtual_memory().available, shutil.disk_usage(folder).free / 2


def describe(choices: dict[str, str], needs: dict[str, Need], data: dict[str, Any]) -> str:
    """One line for the log: where each role's decoded images are kept and how big that is."""
    parts = []
    for role, where in choices.items():
        need = needs[role]
        if role not in CACHED_ROLES:
            continue
        if not need.encoded and where == "none":
            parts.append(f"{role} pixels in memory already ({need.examples:,} images)")
            continue
        size = f"{need.bytes / 2**30:.2f} GiB" if need.bytes >= 2**30 else f"{need.bytes / 2**20:.0f} MiB"
        kept = {"memory": "kept in memory", "disk": f"kept on disk in {cache_dir(data)}", "none": "decoded every epoch"}
        parts.append(f"{role} {kept[where]} ({need.examples:,} images, {size})")
    return f"data.cache={data.get('cache')}: " + "; ".join(parts)


def key(description: dict[str, Any]) -> str:
    """A file name for a cache: the hash of everything that decides its contents."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def on_disk(dataset, folder: Path, name: str):
    """`dataset.cache()` in a file shared by every run that caches the same contents: read when it
    is complete, else written under this process's own name and published when the first pass ends."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    if Path(f"{final}.index").exists():
        return dataset.cache(str(final))
    _remove_abandoned(folder)
    own = folder / f"{name}{_PARTIAL}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    atexit.register(_remove, own)  # its contents live on under the shared name

    def publish():
        _publish(own, final)
        return True

    # Runs after the cache's input is exhausted, i.e. when tf.data has written the complete file;
    # the element is filtered out, so consumers see exactly the cached examples.
    spec = dataset.element_spec
    placeholder = tf.nest.map_structure(
        lambda s: tf.zeros([d or 0 for d in s.shape] if s.shape.rank is not None else [], s.dtype), spec)
    published = tf.data.Dataset.from_tensors(placeholder).filter(
        lambda *_: tf.logical_not(tf.reshape(tf.py_function(publish, [], tf.bool), [])))
    return dataset.cache(str(own)).concatenate(published)


def _publish(own: Path, final: Path) -> None:
    """Give the complete cache files the shared name: hard links (the running pipeline keeps reading
    its own name), the index last, each by an atomic rename, so a reader never sees half a cache."""
    if Path(f"{final}.index").exists() or not Path(f"{own}.index").exists():
        return
    files = sorted(own.parent.glob(f"{own.name}.data-*")) + [Path(f"{own}.index")]
    for file in files:
        target = final.parent / (final.name + file.name[len(own.name):])
        staging = final.parent / f"{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.link(file, staging)
        except OSError:  # a file system without hard links
            import shutil

            shutil.copyfile(file, staging)
        os.replace(staging, target)
    log.info("published the data cache %s", final)


def _remove(own: Path) -> None:
    for file in own.parent.glob(f"{own.name}*"):  # tf.data writes <name>_<shard>.* until complete
        file.unlink(missing_ok=True)


def _remove_abandoned(folder: Path) -> None:
    """Partial caches of processes on this machine that are gone (killed mid-write: tf.data leaves
    its lockfile and half a file behind)."""
    host = socket.gethostname()
    for file in folder.glob(f"*{_PARTIAL}{host}.*"):
        pid = file.name.split(_PARTIAL, 1)[1][len(host) + 1:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            file.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
