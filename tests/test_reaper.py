"""The servers and workers the cluster tests and the benchmarks start end with them, even after kill -9."""

import subprocess
import sys
from pathlib import Path

import psutil

from conftest import wait_until

STARTER = f"""
import subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from reaper import reaped_with_us
server = reaped_with_us(subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600"], start_new_session=True))
print(server.pid, flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_what_a_starter_killed_with_kill_9_started_ends_with_it():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    server = psutil.Process(int(starter.stdout.readline()))
    wait_until(lambda: len(server.children()) == 2, 10, "the server's two sleeps")
    family = [server.pid, *(child.pid for child in server.children())]
    starter.kill()
    starter.wait()
    wait_until(lambda: all(gone(pid) for pid in family), 10, "the server and its children to end")
