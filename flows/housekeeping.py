"""`cnnflow cache list | verify | prune | clear`: the disk cnnflow keeps outside the MLflow store.

What can always be had again, and so is pruned and cleared, least recently used first:
- data caches (data.cache=disk): decoded images in `data.cache_dir` (default ~/.cache/cnnflow/tf.data),
  shared by every run on the same bytes; never one that a running training reads;
- checkpoint copies: the checkpoint files in a run folder (outputs/<experiment>/<run id>/) of a run the
  MLflow store has as FINISHED, which keeps its newest checkpoint (a run keeps a copy where its store is
  a server, and `continue` fetches one); never those of an unfinished run, the only way to resume it.
What is listed only: damaged caches set aside (removed by clear), and run folders (the run's own files).
"""

from __future__ import annotations

import datetime
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cnnflow.components.data import caching
from cnnflow.components.data.caching import readable_size
from cnnflow.components.errors import SettingsError, UserError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?")


def size_bytes(text: str) -> int:
    """`500M`, `20G`, `1.5GB`, `20GiB`, `1000000` -> bytes (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip().upper())
    if not match:
        raise SettingsError(f"--max-size {text}: give a size like 500M, 20G or 1.5GB")
    return int(float(match[1]) * _UNITS[match[2]])


@dataclass(frozen=True)
class Kept:
    """Something cnnflow keeps that can be had again: its size, last use, and why it stays (if it must)."""

    kind: str  # data cache | checkpoint copy
    what: str
    bytes: int
    last_used: float
    busy: str | None  # why prune and clear leave it, or None
    remove: Callable[[], int]  # deletes it; the bytes freed


def kept(cache_dir: Path, outputs: Path) -> list[Kept]:
    """Data caches and checkpoint copies, least recently used first."""
    found = [Kept("data cache", entry.final.name, entry.bytes, entry.last_used, "in use" if entry.in_use else None,
                  lambda entry=entry: caching.remove(entry)) for entry in caching.entries(cache_dir)]
    copies = {run: sorted(run.glob("checkpoint-*")) for run in _run_folders(outputs)}
    copies = {run: files for run, files in copies.items() if files}
    statuses = _statuses([run.name for run in copies])
    for run, files in copies.items():
        status = statuses.get(run.name)
        busy = None if status == "FINISHED" else f"run {status}" if status else "run not in this MLflow store"
        found.append(Kept("checkpoint copy", f"{run.parent.name} run {run.name}",
                          sum(file.stat().st_size for file in files), max(file.stat().st_mtime for file in files),
                          busy, lambda files=files: _delete(files)))
    return sorted(found, key=lambda item: item.last_used)


def _run_folders(outputs: Path) -> list[Path]:
    return sorted(run for run in outputs.glob("*/*") if run.is_dir())


def _statuses(run_ids: list[str]) -> dict[str, str]:
    """run id -> status in the MLflow store this folder uses (MLFLOW_TRACKING_URI or ./mlflow.db); none
    without a store here."""
    if not run_ids:
        return {}
    from mlflow.exceptions import MlflowException

    from cnnflow.flows.tracking import store

    try:
        store.use_store({}, must_exist=True)
    except UserError:
        return {}
    statuses = {}
    for run_id in run_ids:
        try:
            statuses[run_id] = store.mlflow_client().get_run(run_id).info.status
        except MlflowException:
            continue
    return statuses


def _delete(files: list[Path]) -> int:
    freed = 0
    for file in files:
        if file.is_file():
            freed += file.stat().st_size
            file.unlink()
    return freed


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def listing(cache_dir: Path, outputs: Path) -> str:
    """Each data cache and checkpoint copy, the damaged caches set aside, each run folder: size, last
    use, what made it; totals."""
    items = kept(cache_dir, outputs)
    rows = [("kind", "size", "last used", "what")]
    rows += [(item.kind, readable_size(item.bytes), _when(item.last_used), item.what + (f" ({item.busy})" if item.busy else ""))
             for item in reversed(items)]  # newest first
    damaged = cache_dir / "damaged"
    aside = _folder_bytes(damaged) if damaged.is_dir() else 0
    if aside:
        rows.append(("damaged caches", readable_size(aside), "-", str(damaged)))
    runs = sorted(_run_folders(outputs), key=lambda run: run.stat().st_mtime, reverse=True)
    rows += [("run folder", readable_size(_folder_bytes(run)), _when(run.stat().st_mtime), f"{run.parent.name} run {run.name}")
             for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    caches = sum(item.bytes for item in items if item.kind == "data cache") + aside
    lines.append(f"total: {readable_size(caches)} of data caches in {cache_dir}, "
                 f"{readable_size(sum(_folder_bytes(run) for run in runs))} in "
                 f"{len(runs)} run folders under {outputs} (checkpoint copies "
                 f"{readable_size(sum(item.bytes for item in items if item.kind == 'checkpoint copy'))} of it)")
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


def prune(cache_dir: Path, outputs: Path, older_than_days: float | None, max_size: str | None) -> str:
    """Removes what was last used more than `older_than_days` ago, then the least recently used until
    the rest fit in `max_size`; never what must stay."""
    if older_than_days is None and max_size is None:
        raise SettingsError("cnnflow cache prune needs --older-than DAYS, --max-size SIZE or both "
                            "(cnnflow cache clear removes every data cache and checkpoint copy)")
    if older_than_days is not None and older_than_days < 0:
        raise SettingsError(f"--older-than {older_than_days:g}: give a number of days, 0 or more")
    items = kept(cache_dir, outputs)
    removed = caching.pruned(items, older_than_days, size_bytes(max_size) if max_size else None,
                             remove=lambda item: item.remove(), stays=lambda item: item.busy)
    return _said(removed, [item for item in items if item not in removed], cache_dir, outputs)


def clear(cache_dir: Path, outputs: Path) -> str:
    items = kept(cache_dir, outputs)
    removed = caching.pruned(items, None, -1, remove=lambda item: item.remove(),  # -1: all that may go
                             stays=lambda item: item.busy)
    damaged = cache_dir / "damaged"
    if damaged.is_dir():
        shutil.rmtree(damaged)
    return _said(removed, [item for item in items if item not in removed], cache_dir, outputs)


def _said(removed: list[Kept], left: list[Kept], cache_dir: Path, outputs: Path) -> str:
    def counted(items: list[Kept]) -> str:
        caches = [item for item in items if item.kind == "data cache"]
        copies = [item for item in items if item.kind == "checkpoint copy"]
        return (f"{len(caches)} data caches and {len(copies)} checkpoint copies "
                f"({readable_size(sum(item.bytes for item in items))})")

    busy = [item for item in left if item.busy]
    return (f"removed {counted(removed)}; left {counted(left)} in {cache_dir} and {outputs}"
            + (f"; kept because they must stay: {', '.join(f'{item.what} ({item.busy})' for item in busy[:3])}"
               + (", ..." if len(busy) > 3 else "") if busy else ""))


def run(action: str, cache_dir: str | None, outputs: str, older_than: float | None, max_size: str | None) -> str:
    folder, runs = caching.cache_dir({"cache_dir": cache_dir}), Path(outputs)
    if action == "list":
        return listing(folder, runs)
    if action == "verify":
        return verify(folder)
    if action == "prune":
        return prune(folder, runs, older_than, max_size)
    return clear(folder, runs)
