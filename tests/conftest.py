"""Fixtures: one Ray session per test run, one shared server, process clean-up."""

import os
import signal
import subprocess
import sys
import uuid

import psutil
import pytest

# Keep Ray on the loopback interface, and stop it from merging log lines that repeat.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A bare ray.init() (the seed's scripts) joins the newest cluster on the machine if there
# is one; the tests start Ray clusters of their own instead, never joining another's.
os.environ.setdefault("RAY_ADDRESS", "local")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (ray.init takes seconds); stopped at the end."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def server(ray_session):
    """A server shared by the tests that use their own queue names (see `names`)."""
    import pype

    handle = pype.Server.remote(shards=2)
    yield handle
    handle.shutdown()


@pytest.fixture
def fresh_server(ray_session):
    """A server of the test's own, for tests that look at the whole server."""
    import pype

    handles = []

    def make(**options):
        handles.append(pype.Server.remote(**options))
        return handles[-1]
    yield make
    for handle in handles:
        handle.shutdown()


@pytest.fixture
def names():
    """Queue names unique to this test: names("q") -> "q-<random>"."""
    tag = uuid.uuid4().hex[:8]
    return lambda base="q": f"{base}-{tag}"


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
