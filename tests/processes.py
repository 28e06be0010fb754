"""Running scripts the way a user would, and stopping exactly what they started."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil


def run_script(*args, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run `python *args` in its own session; return (exit code, output).

    The script may start its own Ray. Whatever it leaves running (Ray's workers
    start sessions of their own) is found through the process tree and killed by
    pid, also when the script fails or times out.
    """
    process = subprocess.Popen(
        [sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, **(env or {})})
    descendants: dict[int, psutil.Process] = {}

    def note_descendants():
        try:
            for child in psutil.Process(process.pid).children(recursive=True):
                descendants[child.pid] = child
        except psutil.NoSuchProcess:
            pass

    try:
        while True:
            note_descendants()
            try:
                output, _ = process.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                timeout -= 0.5
                if timeout <= 0:
                    process.kill()
                    output, _ = process.communicate()
                    output += "\n[run_script: timed out]"
                    break
    finally:
        with_suppressed = (psutil.NoSuchProcess, ProcessLookupError)
        for child in descendants.values():
            try:
                if child.is_running():
                    child.send_signal(signal.SIGKILL)
            except with_suppressed:
                pass
        psutil.wait_procs(list(descendants.values()), timeout=10)
    return process.returncode, output


# Ray's Cluster writes the newest cluster's address here and removes it on shutdown;
# a scenario killed midway would leave it pointing at a dead cluster.
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
ROOT = Path(__file__).resolve().parent.parent


def run_cluster_scenario(script: Path, timeout: float) -> tuple[int, str]:
    """run_script for a script that starts a multi-node Ray Cluster of its own; Ray's
    note of the newest cluster on this machine is put back as it was, also on failure."""
    before = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        return run_script(script, timeout=timeout, env={"PYTHONPATH": str(ROOT)})  # bench.cluster
    finally:
        if before is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(before)
