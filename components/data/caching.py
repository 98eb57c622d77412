"""Where decoded images are kept between epochs: `data.cache` = auto | memory | disk | none.

- memory: tf.data's in-memory cache, filled in the first epoch (a decoded CelebA face is 116 KB).
- disk: a tf.data cache file in `data.cache_dir`, named by the content it is made from (the examples'
  fingerprint, fingerprint.py) and how (the source and the preprocessing), so a later run on the same
  bytes reads it instead of decoding again, and a run on changed files makes a new one. It is written
  under a name of this process's own and published under the shared name only when complete, with
  each file's SHA-256: a writer that dies leaves nothing that blocks a rerun or a parallel job, and a
  file damaged later is found when the cache is opened, set aside and written anew.
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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnflow.components.data.fingerprint import file_hash
from cnnflow.components.errors import InfrastructureError

log = logging.getLogger(__name__)

CACHED_ROLES = ("train", "valid")
_PARTIAL = ".partial."  # <key>.partial.<host>.<pid>.<random>: a cache file still being written
_USED = ".used."  # <key>.used.<host>.<pid>: a process reads this cache (prune leaves it)
CHECKSUMS = ".sha256"  # <key>.sha256: each file's size and SHA-256, written before the index


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
    return user_cache() / "tf.data"


def user_cache() -> Path:
    """cnnflow's folder in the user's cache (XDG_CACHE_HOME, else ~/.cache): data caches, calibrations."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnnflow"


def plan(data: dict[str, Any], needs: dict[str, Need]) -> dict[str, str]:
    """role -> memory | disk | none, as `data.cache` asks; `auto` shares one memory budget and one
    disk budget between the roles, training first."""
    mode = data.get("cache") or "none"
    if mode != "auto":
        check_folder(data)
        return {role: mode if role in CACHED_ROLES else "none" for role in needs}
    memory, disk = budgets(data)
    if unwritable(cache_dir(data)):
        disk = 0  # `auto` keeps to memory, or decodes every epoch
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


def check_folder(data: dict[str, Any]) -> None:
    """data.cache=disk needs a cache folder it can write: refused in one line (exit 5) before any run
    is made, not a NotADirectoryError in the middle of one."""
    if data.get("cache") == "disk" and (why := unwritable(cache_dir(data))):
        raise InfrastructureError(f"data.cache=disk: cannot write the data cache folder {cache_dir(data)} ({why}); "
                                  f"set data.cache_dir to a folder you can write, or data.cache=memory")


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot take cache files (made if need be), or None: a HOME or cache_dir that is a
    file, a read-only mount, no permission."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return error.strerror or str(error)
    return None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"


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


def on_disk(dataset, folder: Path, name: str, cap_bytes: int | None = None):
    """`dataset.cache()` in a file shared by every run that caches the same contents: read when it
    is complete and its checksums hold, else written under this process's own name, published once
    complete (then older caches are removed, least recently used first, until the folder holds at
    most `cap_bytes`).

    Publishing happens outside the pipeline: when this process ends, or when any process next opens
    or lists the folder. A step inside the pipeline would be a stateful op, and under TensorFlow's op
    determinism tf.data then runs every parallel map before it one at a time, and says so in an
    `E0000 ... use_unbounded_threadpool` line."""
    folder.mkdir(parents=True, exist_ok=True)
    _tag(folder)
    final = folder / name
    publish_complete(folder, cap_bytes)
    if Path(f"{final}.index").exists():
        damage = damaged(final)
        if not damage:
            _in_use(final)
            return dataset.cache(str(final))
        set_aside(final, damage)
    own = folder / f"{name}{_PARTIAL}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    atexit.register(_finish, own, final, cap_bytes)
    return dataset.cache(str(own))


def publish_complete(folder: Path, cap_bytes: int | None = None) -> None:
    """Publish every cache that a process (this one, another, or one that died) wrote completely under
    its own name and that has no shared copy yet; remove the remains of dead writers."""
    for index in sorted(folder.glob(f"*{_PARTIAL}*.index")):
        own = index.with_suffix("")
        final = folder / own.name.split(_PARTIAL, 1)[0]
        if not Path(f"{final}.index").exists():
            _publish(own, final, cap_bytes)
    _remove_abandoned(folder)


def _finish(own: Path, final: Path, cap_bytes: int | None) -> None:
    """At exit: this process's complete cache published (if no other was first), its own name removed."""
    try:
        if Path(f"{own}.index").exists() and not Path(f"{final}.index").exists():
            _publish(own, final, cap_bytes)
    finally:
        _remove(own)
        Path(f"{final}{_USED}{socket.gethostname()}.{os.getpid()}").unlink(missing_ok=True)


def _publish(own: Path, final: Path, cap_bytes: int | None = None) -> None:
    """Give the complete cache files the shared name: hard links (the running pipeline keeps reading
    its own name), then their checksums, the index last, each by an atomic rename, so a reader never
    sees half a cache, and one that a disk or a hand later damages is found before it is read."""
    if Path(f"{final}.index").exists() or not Path(f"{own}.index").exists():
        return
    files = sorted(own.parent.glob(f"{own.name}.data-*")) + [Path(f"{own}.index")]
    sums = {file.name[len(own.name):]: [file.stat().st_size, file_hash(file).hexdigest()] for file in files}
    staged = {final.parent / (final.name + file.name[len(own.name):]): file for file in files}
    staged[Path(f"{final}{CHECKSUMS}")] = None
    for target, file in sorted(staged.items(), key=lambda item: item[0].name.endswith(".index")):
        staging = final.parent / f"{target.name}.{uuid.uuid4().hex[:8]}.tmp"
        if file is None:
            staging.write_text(json.dumps(sums))
        else:
            try:
                os.link(file, staging)
            except OSError:  # a file system without hard links
                import shutil

                shutil.copyfile(file, staging)
        os.replace(staging, target)
    log.info("published the data cache %s", final)
    writer = own.name.split(_PARTIAL, 1)[1].rsplit(".", 1)[0]  # <host>.<pid>: it reads it until it ends
    Path(f"{final}{_USED}{writer}").touch()
    if cap_bytes is not None:  # data.cache_max_gb: the least recently used others make room
        for entry in prune(final.parent, max_bytes=cap_bytes, keep=final):
            log.info("removed the data cache %s (last used %s) to stay within data.cache_max_gb", entry.final.name,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)))


def damaged(final: Path) -> str | None:
    """Why the published cache `final` cannot be read as it is (a file missing, cut short or
    changed since it was written), or None when its checksums hold."""
    try:
        sums = json.loads(Path(f"{final}{CHECKSUMS}").read_text())
    except (OSError, ValueError):
        return f"no readable checksums ({final.name}{CHECKSUMS})"
    for suffix, (size, digest) in sorted(sums.items()):
        file = Path(f"{final}{suffix}")
        if not file.is_file():
            return f"{file.name} is missing"
        if file.stat().st_size != size:
            return f"{file.name} holds {file.stat().st_size:,} bytes, not {size:,}"
        if file_hash(file).hexdigest() != digest:
            return f"{file.name} has changed since it was written (its SHA-256 differs)"
    return None


def set_aside(final: Path, why: str) -> Path:
    """Move a damaged cache's files into <cache folder>/damaged/ (for a look; `cnnflow cache clear`
    removes them), so the next pass writes it anew."""
    aside = final.parent / "damaged"
    aside.mkdir(exist_ok=True)
    stamp = uuid.uuid4().hex[:8]
    for file in cache_files(final):
        try:
            os.replace(file, aside / f"{file.name}.{stamp}")
        except FileNotFoundError:  # another run set it aside first
            pass
    for index in final.parent.glob(f"{final.name}{_PARTIAL}*.index"):  # links to the same damaged bytes
        index.unlink(missing_ok=True)
    log.warning("the data cache %s is damaged (%s): set aside in %s, and made again by this run", final.name, why, aside)
    return aside


def cache_files(final: Path) -> list[Path]:
    """The files of the published cache `final` (its data, index, checksums and use marks)."""
    return sorted(file for file in final.parent.glob(f"{final.name}.*") if _PARTIAL not in file.name)


def _in_use(final: Path) -> None:
    """Mark the cache as read by this process until it ends (so prune leaves it), and as used now."""
    mark = Path(f"{final}{_USED}{socket.gethostname()}.{os.getpid()}")
    mark.touch()
    atexit.register(mark.unlink, missing_ok=True)
    index = Path(f"{final}.index")
    if index.exists():
        os.utime(index)  # its time is the cache's last use: prune removes the least recently used first


def _tag(folder: Path) -> None:
    """A CACHEDIR.TAG (bford.org/cachedir): backup tools skip the folder."""
    tag = folder / "CACHEDIR.TAG"
    if not tag.exists():
        tag.write_text("Signature: 8a477f597d28d172789f06886806bc55\n"
                       "# This file is a cache directory tag created by cnnflow (its decoded-image caches).\n"
                       "# For information about cache directory tags see https://bford.org/cachedir/\n")


def _remove(own: Path) -> None:
    for file in own.parent.glob(f"{own.name}*"):  # tf.data writes <name>_<shard>.* until complete
        file.unlink(missing_ok=True)


def _remove_abandoned(folder: Path) -> None:
    """Partial caches and use marks of processes on this machine that are gone (killed mid-write:
    tf.data leaves its lockfile and half a file behind)."""
    host = socket.gethostname()
    for marker in (_PARTIAL, _USED):
        for file in folder.glob(f"*{marker}{host}.*"):
            pid = file.name.split(marker, 1)[1][len(host) + 1:].split(".", 1)[0]
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


# ------------------------------------------------------------------------------------ housekeeping

def readable_size(count: float) -> str:
    """Bytes as people read them: 827.0 KiB, 3.1 MiB, 1.9 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


@dataclass(frozen=True)
class Entry:
    """One published cache: its files' total size, last use (its index's time), and whether a live
    process on this machine reads it now."""

    final: Path
    bytes: int
    last_used: float
    in_use: bool


def entries(folder: Path) -> list[Entry]:
    """The published caches in `folder`, least recently used first."""
    if not folder.is_dir():
        return []
    publish_complete(folder)  # and a dead process's use mark would keep its cache "in use" for ever
    found = []
    for index in folder.glob("*.index"):
        if _PARTIAL in index.name:
            continue
        final = index.with_suffix("")
        files = cache_files(final)
        used = any(_USED in file.name for file in files)
        found.append(Entry(final, sum(file.stat().st_size for file in files if file.exists()), index.stat().st_mtime, used))
    return sorted(found, key=lambda entry: entry.last_used)


def remove(entry: Entry) -> int:
    """Delete a cache's files, the index first (so no reader takes it for complete), and any copy a
    writer left under its own name (else the next opener would publish it again); the bytes freed."""
    files = sorted(cache_files(entry.final), key=lambda file: not file.name.endswith(".index"))
    files += sorted(entry.final.parent.glob(f"{entry.final.name}{_PARTIAL}*"), key=lambda f: not f.name.endswith(".index"))
    for file in files:
        file.unlink(missing_ok=True)
    return entry.bytes


def prune(folder: Path, older_than_days: float | None = None, max_bytes: int | None = None,
          keep: Path | None = None) -> list[Entry]:
    """Remove caches last used more than `older_than_days` ago, then the least recently used until the
    rest fit in `max_bytes`; never one that a running process reads, nor `keep`. The removed, in order."""
    return pruned(entries(folder), older_than_days, max_bytes, remove,
                  stays=lambda entry: entry.in_use or entry.final == keep)


def pruned(items: list, older_than_days: float | None, max_bytes: int | None, remove, stays) -> list:
    """Of `items` (least recently used first, each with `bytes` and `last_used`), remove those used
    more than `older_than_days` ago, then the least recently used until the rest fit in `max_bytes`,
    never one that `stays`; the removed, in order."""
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    total, removed = sum(item.bytes for item in items), []
    for item in items:
        if stays(item):
            continue
        if (cutoff is not None and item.last_used < cutoff) or (max_bytes is not None and total > max_bytes):
            remove(item)
            total -= item.bytes
            removed.append(item)
    return removed
