"""What a test or a benchmark starts (servers, workers, their flow runs) ends with it, however it ends.

`kill_tree` is the normal way, from a `finally`. kill -9 of the starting process runs no `finally`,
so `reaped_with_us` also starts a watcher: it blocks reading a pipe whose other end only the starter
holds, and when the starter ends the kernel closes that end, the read returns, and the watcher kills
what was started. Run as a script, this file is that watcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

_held_open: list[int] = []  # the pipes' write ends: closed by the kernel when this process ends


def kill_tree(pid: int) -> None:
    """SIGKILL to a process and everything it started, each in its whole process group; returns once
    they are gone (at most 30 s)."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(family, timeout=30)


def reaped_with_us(process: subprocess.Popen) -> subprocess.Popen:
    """`process`, with a watcher that runs `kill_tree` on it once this process has ended."""
    born = psutil.Process(process.pid).create_time()
    read, write = os.pipe()  # not inheritable: no other child keeps the write end open
    subprocess.Popen([sys.executable, __file__, str(process.pid), repr(born)], stdin=read,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read)
    _held_open.append(write)
    return process


if __name__ == "__main__":
    pid, born = int(sys.argv[1]), float(sys.argv[2])
    os.read(0, 1)  # returns (empty) when the starter has ended
    try:
        if psutil.Process(pid).create_time() == born:  # still ours, not a new process given its number
            kill_tree(pid)
    except psutil.NoSuchProcess:
        pass
