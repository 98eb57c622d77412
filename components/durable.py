"""Files written whole or not at all, and on disk before the next step: what a power cut or a kill
leaves is the old file or the new one, never half of one. Imports nothing heavy (no Keras)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_durably(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Replace `path` with `content` (text, bytes, or what a function writes to the open file)
    atomically, and make both file and folder entry survive a power cut."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        if callable(content):
            content(handle)
        else:
            handle.write(content.encode() if isinstance(content, str) else content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    sync_folder(path.parent)


def sync_folder(path: Path) -> None:
    """A folder's entries (a file made or renamed in it) on disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
