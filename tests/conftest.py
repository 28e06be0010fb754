"""Fixtures: one Ray session per test run, one shared server, unique queue names."""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

# Keep Ray on the loopback interface, and stop it from merging log lines that repeat.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A bare ray.init() (the seed's scripts) joins the newest cluster on the machine if there
# is one; the tests start Ray clusters of their own instead, never joining another's.
os.environ.setdefault("RAY_ADDRESS", "local")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole run (ray.init takes seconds); stopped at the end.

    Its processes see PYPE_TEST_DATA, a directory of this run (persistence.dir tests).
    """
    import ray

    os.environ["PYPE_TEST_DATA"] = str(tmp_path_factory.mktemp("node-data"))
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


class Api:
    """One path's view of a server: each data method returns its result.

    path "native" calls server.push(...) directly; path "remote" calls
    ray.get(server.push.remote(...)). Tests written against an Api run on both
    paths, so both keep one set of semantics.
    """

    def __init__(self, server, path: str):
        self.server, self.path = server, path

    def __getattr__(self, name):
        method = getattr(self.server, name)
        if self.path == "native":
            return method
        import ray

        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))

    def start(self, name, *args, **kwargs):
        """Begin a call that may wait; return a function that waits for its result."""
        method = getattr(self.server, name)
        if self.path == "native":
            future = _background.submit(method, *args, **kwargs)
            return lambda: future.result(timeout=120)
        import ray

        ref = method.remote(*args, **kwargs)
        return lambda: ray.get(ref, timeout=120)


_background = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-native-call")


@pytest.fixture(params=["remote", "native"])
def api(server, request):
    """The shared server on each path in turn (see Api)."""
    return Api(server, request.param)
