"""`cnnflow cache list | verify | prune | clear`: the disk cnnflow keeps outside the MLflow store.

- data caches (data.cache=disk): decoded images in `data.cache_dir` (default ~/.cache/cnnflow/tf.data),
  shared by every run on the same bytes; they can always be made again. prune and clear act on them,
  never on one that a running training reads;
- damaged caches set aside there (damaged/), kept for a look until clear;
- run folders (outputs/<experiment>/<run id>/): listed with their size, left to the user (they hold the
  run's own files: config, split, model, figures).
"""

from __future__ import annotations

import datetime
import re
import shutil
from pathlib import Path

from cnnflow.components.data import caching
from cnnflow.components.data.caching import readable_size
from cnnflow.components.errors import SettingsError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?")


def size_bytes(text: str) -> int:
    """`500M`, `20G`, `1.5GB`, `20GiB`, `1000000` -> bytes (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip().upper())
    if not match:
        raise SettingsError(f"--max-size {text}: give a size like 500M, 20G or 1.5GB")
    return int(float(match[1]) * _UNITS[match[2]])


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def listing(cache_dir: Path, outputs: Path) -> str:
    """Each data cache, the damaged ones set aside, each run folder: size, last use, what made it; totals."""
    rows = [("kind", "size", "last used", "what")]
    caches = caching.entries(cache_dir)
    for entry in reversed(caches):  # newest first
        rows.append(("data cache", readable_size(entry.bytes), _when(entry.last_used),
                     entry.final.name + (" (in use)" if entry.in_use else "")))
    damaged = cache_dir / "damaged"
    if damaged.is_dir() and any(damaged.iterdir()):
        rows.append(("damaged caches", readable_size(_folder_bytes(damaged)), "-", str(damaged)))
    runs = sorted((run for run in outputs.glob("*/*") if run.is_dir()), key=lambda run: run.stat().st_mtime, reverse=True)
    for run in runs:
        rows.append(("run folder", readable_size(_folder_bytes(run)), _when(run.stat().st_mtime), f"{run.parent.name} run {run.name}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    cache_total = sum(entry.bytes for entry in caches) + (_folder_bytes(damaged) if damaged.is_dir() else 0)
    run_total = sum(_folder_bytes(run) for run in runs)
    lines.append(f"total: {readable_size(cache_total)} of data caches in {cache_dir}, {readable_size(run_total)} in {len(runs)} run "
                 f"folders under {outputs}")
    return "\n".join(lines)


def verify(cache_dir: Path) -> str:
    """Every data cache's checksums; a damaged one is set aside (the next run makes it again)."""
    bad = []
    found = caching.entries(cache_dir)
    for entry in found:
        why = caching.damaged(entry.final)
        if why:
            caching.set_aside(entry.final, why)
            bad.append(f"{entry.final.name}: {why}")
    return "\n".join([*bad, f"{len(found) - len(bad)} of {len(found)} data caches in {cache_dir} intact"
                      + (f"; {len(bad)} set aside in {cache_dir / 'damaged'}" if bad else "")])


def prune(cache_dir: Path, older_than_days: float | None, max_size: str | None) -> str:
    if older_than_days is None and max_size is None:
        raise SettingsError("cnnflow cache prune needs --older-than DAYS, --max-size SIZE or both "
                            "(cnnflow cache clear removes every data cache)")
    if older_than_days is not None and older_than_days < 0:
        raise SettingsError(f"--older-than {older_than_days:g}: give a number of days, 0 or more")
    removed = caching.prune(cache_dir, older_than_days, size_bytes(max_size) if max_size else None)
    left = caching.entries(cache_dir)
    return (f"removed {len(removed)} data caches ({readable_size(sum(e.bytes for e in removed))}); "
            f"{len(left)} left ({readable_size(sum(e.bytes for e in left))}) in {cache_dir}")


def clear(cache_dir: Path) -> str:
    kept = [entry for entry in caching.entries(cache_dir) if entry.in_use]
    freed = sum(caching.remove(entry) for entry in caching.entries(cache_dir) if not entry.in_use)
    damaged = cache_dir / "damaged"
    if damaged.is_dir():
        freed += _folder_bytes(damaged)
        shutil.rmtree(damaged)
    return (f"removed {readable_size(freed)} of data caches from {cache_dir}"
            + (f"; {len(kept)} in use by a running training kept" if kept else ""))


def run(action: str, cache_dir: str | None, outputs: str, older_than: float | None, max_size: str | None) -> str:
    folder = caching.cache_dir({"cache_dir": cache_dir})
    if action == "list":
        return listing(folder, Path(outputs))
    if action == "verify":
        return verify(folder)
    if action == "prune":
        return prune(folder, older_than, max_size)
    return clear(folder)

