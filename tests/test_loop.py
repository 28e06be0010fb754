"""The shard's loop with real sockets and threads, without Ray.

Requests reach it as a Ray method's thread hands them in (ShardEngine.submit) and
over its data sockets (a transport.Pipeline), as they do in a shard actor.
"""

import pickle
import socket
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from pype import protocol
from pype.errors import QueueFullError, QueueNotFoundError, ShardLostError
from pype.framing import stream_message
from pype.options import QueueOptions
from pype.protocol import Add, CanPull, CanPush, Pull, Push, Remove, Settle, Stats
from pype.shards.engine import ShardEngine
from pype.shards.listeners import ShardSockets
from pype.shards.loop import HOUSEKEEPING_INTERVAL, ShardLoop
from pype.shards.store import QueueStore
from pype.transport import Keys, Pipeline
from tests.events import until

NODE = "this-node"
END = "end of stream"


class Shard:
    """A loop with its sockets, and ways to call it from both sides."""

    def __init__(self, directory, restarted=False, lost=frozenset(), defaults=None,
                 housekeeping_interval=HOUSEKEEPING_INTERVAL):
        self.keys, secret = Keys.generate()
        sockets = ShardSockets(NODE, "127.0.0.1", self.keys, secret, directory / "sockets", 0, "test-0")
        self.engine = ShardEngine(QueueStore(defaults or QueueOptions()), 0, poll_wait=0.05,
                                  restarted=restarted, lost=lost)
        self.loop = ShardLoop(self.engine, sockets, housekeeping_interval=housekeeping_interval)
        self.threads = ThreadPoolExecutor(max_workers=16)

    def pipeline(self, local=True) -> Pipeline:
        return Pipeline(self.keys, lambda index, fresh=False: self.loop.address,
                        NODE if local else "another-node", request_timeout=10)

    def native(self, request, caller=("native", 0), wait=0.0):
        return self.pipeline().call(0, caller, request, wait)

    def ray(self, request, caller="ray", sequence=None, after=0, may_wait=True):
        """As a Ray method would: sequence for main-thread calls (may_wait False)."""
        return self.engine.submit(request, caller, sequence=sequence, after=after, may_wait=may_wait)

    def in_thread(self, function, *args, **kwargs):
        return self.threads.submit(function, *args, **kwargs)

    def waiting(self) -> int:
        return self.ray(Stats(), may_wait=False)["waiting_calls"]

    def close(self):
        self.threads.shutdown(wait=False, cancel_futures=True)
        self.loop.stop()


@pytest.fixture
def shard(tmp_path):
    shard = Shard(tmp_path)
    yield shard
    shard.close()


# -- waiting without threads -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["native", "ray"])
def test_a_blocking_pull_is_parked_and_woken_by_a_push(shard, path):
    call = shard.native if path == "native" else shard.ray
    waiter = shard.in_thread(call, Pull("q", 1, True, None), wait=None) if path == "native" \
        else shard.in_thread(call, Pull("q", 1, True, None))
    until(shard.waiting, "the pull to park")
    started = time.monotonic()
    assert shard.native(Push(("q",), ["x"])) == 1
    assert waiter.result(timeout=30) == ["x"]
    assert time.monotonic() - started < 5  # woken by the push, not by a timeout (it has none)
    assert shard.waiting() == 0


def test_a_blocking_pull_returns_what_is_there_at_its_timeout(shard):
    shard.native(Push(("q",), [1, 2]))
    started = time.monotonic()
    assert shard.native(Pull("q", 5, True, 0.2), wait=0.2) == [1, 2]
    assert time.monotonic() - started >= 0.19


def test_requests_that_timed_out_leave_nothing_behind_on_an_idle_queue(shard):
    """A consumer that polls an idle queue with short blocking pulls must not grow the shard."""
    for _ in range(20):
        assert shard.native(Pull("idle", 1, True, 0.01), wait=0.01) == []
    assert shard.ray(Stats(), may_wait=False)["waiting_calls"] == 0
    assert "idle" not in shard.engine._parked  # the loop's list of parked requests for the queue


def test_a_blocking_pull_for_more_than_fits_returns_when_the_queue_is_full(shard):
    shard.native(Add("q", QueueOptions(maxsize=2)))
    shard.native(Push(("q",), [1, 2]))
    assert shard.native(Pull("q", 10, True, 60), wait=60) == [1, 2]


def test_the_main_thread_is_never_parked(shard):
    started = time.monotonic()
    assert shard.ray(Pull("q", 1, True, 30), sequence=1, may_wait=False) == []
    assert shard.ray(CanPull("q", None, 30), sequence=2, may_wait=False) is False
    assert time.monotonic() - started < 10  # not the 30 s it was offered


def test_a_batch_queue_pull_waits_for_a_full_batch_then_returns_a_partial_one(shard):
    shard.native(Add("b", QueueOptions(kind="batch", batch_size=3, batch_timeout=0.2)))
    shard.native(Push(("b",), [1, 2, 3, 4]))
    assert shard.native(Pull("b")) == [1, 2, 3]  # a full batch: at once
    started = time.monotonic()
    assert shard.native(Pull("b")) == [4]
    assert time.monotonic() - started >= 0.19


@pytest.mark.parametrize("path", ["native", "ray"])
def test_a_blocking_pull_that_needs_its_queue_ends_when_the_queue_is_removed(shard, path):
    shard.native(Add("q", QueueOptions()))
    pull = Pull("q", 1, True, 60, must_exist=True)
    waiter = shard.in_thread(shard.native, pull, wait=60) if path == "native" \
        else shard.in_thread(shard.ray, pull)
    until(shard.waiting, "the pull to park")
    assert shard.native(Remove("q")) == 0
    with pytest.raises(QueueNotFoundError, match="removed while this pull waited"):
        waiter.result(timeout=30)
    assert shard.waiting() == 0


def test_must_exist_refuses_a_missing_queue_instead_of_making_it(shard):
    with pytest.raises(QueueNotFoundError, match="'gone' does not exist"):
        shard.native(Push(("gone",), [1], must_exist=True))
    with pytest.raises(QueueNotFoundError):
        shard.native(Pull("gone", 1, True, None, must_exist=True), wait=5)  # does not wait
    assert shard.native(Pull("gone")) == []  # without must_exist: nothing there
    assert shard.native(Push(("gone",), [1])) == 1  # and a push makes it
    assert shard.native(Push(("gone",), [2], must_exist=True)) == 1


def test_an_exact_pull_takes_the_whole_batch_or_nothing(shard):
    shard.native(Push(("q",), [1, 2]))
    assert shard.native(Pull("q", 3, False, exactly=True)) == []
    with pytest.raises(ValueError, match="exactly"):
        shard.native(Pull("q", 3, True, 5, exactly=True), wait=5)
    assert shard.native(Pull("q", 2, False, exactly=True)) == [1, 2]


def test_a_request_the_shard_cannot_unpickle_is_answered_with_a_type_error(shard):
    """An item of a class the shard cannot import (one defined in a driver's __main__)."""
    module = types.ModuleType("made_here")
    module.Point = type("Point", (), {"__module__": "made_here"})
    sys.modules["made_here"] = module
    frames = protocol.encode_request(1, ("native", 0), Push(("q",), [module.Point()]))
    del sys.modules["made_here"]  # the shard cannot import it now
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(shard.loop.address.unix)
    raw.sendall(b"".join(stream_message(frames)))
    raw.settimeout(30)
    answer = raw.recv(1 << 16)
    raw.close()
    assert b"could not read this request" in answer
    assert shard.native(Push(("q",), [1])) == 1  # and it keeps serving


def test_a_blocking_push_waits_in_line_until_a_pull_makes_room(shard):
    shard.native(Add("q", QueueOptions(maxsize=1)))
    shard.native(Push(("q",), ["a"]))
    pushing = shard.in_thread(shard.native, Push(("q",), ["b"], block=True), wait=None)
    until(shard.waiting, "the push to park")
    with pytest.raises(QueueFullError, match="pushes waiting"):
        shard.native(Push(("q",), ["jumper"]))  # nobody jumps the line
    assert shard.native(Pull("q")) == ["a"]
    assert pushing.result(timeout=30) == 1
    assert shard.native(Pull("q", -1)) == ["b"]


def test_a_parked_push_fails_clearly_when_its_queue_is_removed(shard):
    shard.native(Add("q", QueueOptions(maxsize=1)))
    shard.native(Push(("q",), ["a"]))
    pushing = shard.in_thread(shard.native, Push(("q",), ["b"], block=True), wait=None)
    until(shard.waiting, "the push to park")
    assert shard.native(Remove("q")) == 1
    with pytest.raises(QueueNotFoundError, match="removed while the push waited"):
        pushing.result(timeout=30)


def test_can_pull_and_can_push_wait_for_their_condition(shard):
    shard.native(Add("q", QueueOptions(maxsize=1)))
    started = time.monotonic()
    assert shard.native(CanPull("q", None, 0.1), wait=0.1) is False
    assert time.monotonic() - started >= 0.09
    asking = shard.in_thread(shard.native, CanPull("q", None, 60), wait=60)
    until(shard.waiting, "can_pull to park")
    shard.native(Push(("q",), [1]))
    assert asking.result(timeout=30) is True
    assert shard.native(CanPush("q", 0)) is False
    asking = shard.in_thread(shard.native, CanPush("q", 60), wait=60)
    until(shard.waiting, "can_push to park")
    shard.native(Pull("q"))
    assert asking.result(timeout=30) is True


def test_a_parked_pull_wakes_when_a_lease_expires(tmp_path):
    shard = Shard(tmp_path, defaults=QueueOptions(visibility_timeout=0.3))
    try:
        shard.native(Push(("q",), ["x"]))
        [(_, item, _)] = shard.native(Pull("q", ack=True))
        waiter = shard.in_thread(shard.native, Pull("q", 1, True, None, ack=True), wait=None)
        until(shard.waiting, "the pull to park")
        [(_, item, redelivered)] = waiter.result(timeout=30)  # the loop's housekeeping expires it
        assert item == "x" and redelivered
    finally:
        shard.close()


# -- read-your-writes across the paths -----------------------------------------------------------

def test_a_request_is_held_until_its_callers_earlier_main_thread_call_ran(shard):
    pulled = shard.in_thread(shard.native, Pull("q", 1, False), ("p1", 2))  # after call 2 of p1
    until(lambda: shard.engine._behind.get("p1"), "the pull to be held")
    assert shard.ray(Push(("q",), ["first"]), "p1", sequence=1, may_wait=False) == 1
    assert not pulled.done()
    assert shard.ray(Push(("q",), ["second"]), "p1", sequence=2, may_wait=False) == 1
    assert pulled.result(timeout=30) == ["first"]


def test_a_restarted_shard_does_not_hold_requests_of_callers_it_never_saw(tmp_path):
    shard = Shard(tmp_path, restarted=True)
    try:
        # p1's calls 1-5 went to the shard's predecessor, which died with them
        assert shard.native(Pull("q"), ("p1", 5)) == []
    finally:
        shard.close()


def test_a_restarted_shard_tells_each_caller_once_that_a_queue_was_lost(tmp_path):
    shard = Shard(tmp_path, restarted=True, lost={"q"})
    try:
        for caller in ("a", "b"):
            with pytest.raises(ShardLostError, match="'q' lost its items.*not applied"):
                shard.native(Push(("q",), [1]), (caller, 0))
            assert shard.native(Push(("q",), [1]), (caller, 0)) == 1
        assert shard.native(Pull("q", -1), ("a", 0)) == [1, 1]
    finally:
        shard.close()


# -- many callers at once -------------------------------------------------------------------------

def test_many_producers_and_consumers_on_both_paths_lose_and_duplicate_nothing(shard):
    shard.native(Add("q", QueueOptions(maxsize=7)))
    producers, per_producer = 4, 250

    def produce(p):
        pipeline = shard.pipeline()
        for i in range(per_producer):
            request = Push(("q",), [(p, i)], block=True, timeout=30)
            if p % 2:
                pipeline.call(0, ("native", 0), request, wait=30)
            else:
                shard.ray(request)

    def consume(native):
        """Pull batches of 3 until one holds an END marker."""
        pipeline, got = shard.pipeline(), []
        while True:
            request = Pull("q", 3, True, 120.0)
            items = pipeline.call(0, ("native", 0), request, wait=120) if native else shard.ray(request)
            got.extend(item for item in items if item != END)
            if END in items:
                return got

    consumers = [shard.in_thread(consume, native) for native in (True, False, True)]
    for future in [shard.in_thread(produce, p) for p in range(producers)]:
        future.result(timeout=120)
    for _ in range(3 * len(consumers)):  # behind every item, enough for full last batches
        shard.ray(Push(("q",), [END], block=True))
    results = [future.result(timeout=120) for future in consumers]
    everything = [item for got in results for item in got]
    assert sorted(everything) == [(p, i) for p in range(producers) for i in range(per_producer)]
    for got in results:
        for p in range(producers):
            mine = [i for q, i in got if q == p]
            assert mine == sorted(mine), f"producer {p} out of order at one consumer"


def test_a_pipeline_keeps_many_requests_in_flight_in_order(shard):
    pipeline = shard.pipeline()
    tickets = [pipeline.send(0, ("native", 0), Push(("q",), [i])) for i in range(500)]
    assert [pipeline.result(ticket) for ticket in tickets] == [1] * 500
    assert shard.native(Pull("q", -1)) == list(range(500))


def test_errors_come_back_as_themselves_and_the_shard_keeps_serving(shard):
    shard.native(Add("q", QueueOptions(maxsize=1)))
    shard.native(Push(("q",), [1]))
    with pytest.raises(QueueFullError, match="'q' is full"):
        shard.native(Push(("q",), [2]))
    with pytest.raises(LookupError, match="not held"):
        shard.native(Settle("q", [123], outcome="ack"))
    assert shard.native(Pull("q")) == [1]


# -- who may talk to a shard --------------------------------------------------------------------

def test_tcp_admits_only_the_servers_client_key_and_nothing_else_is_unpickled(shard, tmp_path):
    """Raw peers without a key, with the wrong keys, and with garbage: none reaches pickle."""
    witness = tmp_path / "pickle-ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    evil = [pickle.dumps(Exploit()), b"\x80\x05garbage", b"not a pickle at all"]
    context = zmq.Context()
    wrong_server, _ = zmq.curve_keypair()
    wrong_client = zmq.curve_keypair()
    peers = []
    for server_key, (client_public, client_secret) in [
            (None, (None, None)),                                                 # no CURVE at all
            (wrong_server, wrong_client),                                         # wrong server key
            (shard.keys.server_public, wrong_client),                             # not our client key
    ]:
        peer = context.socket(zmq.DEALER)
        peer.linger = 0
        if server_key is not None:
            peer.curve_serverkey, peer.curve_publickey, peer.curve_secretkey = (
                server_key, client_public, client_secret)
        peer.connect(shard.loop.address.tcp)
        peers.append(peer)
    for peer in peers:
        for message in evil:
            peer.send(message)
            peer.send_multipart([message, message])
    for peer in peers:  # nobody answers them: they were never admitted
        assert peer.poll(500) == 0
    assert not witness.exists()
    assert shard.pipeline(local=False).call(0, ("native", 0), Push(("q",), [1])) == 1  # over TCP
    assert shard.native(Pull("q")) == [1]
    for peer in peers:
        peer.close()
    context.term()


def test_a_local_peer_that_sends_garbage_is_answered_or_ignored_and_the_shard_keeps_serving(shard):
    well_framed = socket.socket(socket.AF_UNIX)
    well_framed.connect(shard.loop.address.unix)
    for message in (pickle.dumps((1, ("x", 0), 99, ("not", "a", "request"))), b"\x80\x05junk"):
        for part in stream_message([message]):
            well_framed.sendall(part)
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(shard.loop.address.unix)
    raw.sendall(b"\xff" * 64)  # a header claiming billions of frames
    assert raw.recv(16) == b""  # the shard hung up on it
    assert shard.native(Push(("q",), [1])) == 1
    well_framed.settimeout(30)  # the first has a readable request id: an error answers it
    assert b"could not read this request" in well_framed.recv(1 << 16)
    well_framed.settimeout(0.2)
    with pytest.raises(TimeoutError):
        well_framed.recv(16)  # the junk gets no answer; the connection stays
    for sock in (well_framed, raw):
        sock.close()


def test_the_socket_directory_admits_only_its_owner(tmp_path):
    directory = tmp_path / "open"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    keys, secret = Keys.generate()
    with pytest.raises(PermissionError, match="mode 0700"):
        ShardSockets(NODE, "127.0.0.1", keys, secret, directory, 0, "t")


def test_threads_share_no_socket(shard):
    """Each thread's pipeline has its own sockets; 8 threads at once lose nothing."""
    def push_many(t):
        pipeline = shard.pipeline()
        return sum(pipeline.call(0, ("native", 0), Push(("q",), [(t, i)])) for i in range(200))

    threads = [shard.in_thread(push_many, t) for t in range(8)]
    assert sum(f.result(timeout=60) for f in threads) == 1600
    assert len(shard.native(Pull("q", -1))) == 1600


def test_protocol_sends_large_buffers_out_of_band():
    import numpy as np

    frame = np.arange(1_000_000, dtype=np.uint8)
    frames = protocol.encode_request(1, ("c", 0), Push(("q",), [frame, b"small"]))
    assert len(frames) == 2 and frames[1].raw().nbytes == frame.nbytes
    _, _, request = protocol.decode_request([frames[0], memoryview(frames[1])])
    assert type(request) is Push
    assert np.array_equal(request.items[0], frame) and request.items[1] == b"small"


def test_no_two_threads_are_ever_in_the_store_at_once(shard):
    """Native requests run on the loop's thread, Ray's on their own: one lock keeps them apart."""
    inside, overlaps = [], []
    original = shard.engine.store.push

    def spy(*args, **kwargs):
        if inside:
            overlaps.append(threading.get_ident())
        inside.append(threading.get_ident())
        time.sleep(0.0005)  # widen the window a second thread would use
        try:
            return original(*args, **kwargs)
        finally:
            inside.pop()

    shard.engine.store.push = spy

    def native_pushes():
        pipeline = shard.pipeline()
        for i in range(100):
            pipeline.call(0, ("native", 0), Push(("q",), [i]))

    def ray_pushes(thread):
        for i in range(100):
            shard.ray(Push(("q",), [(thread, i)]))

    futures = [shard.in_thread(native_pushes) for _ in range(2)]
    futures += [shard.in_thread(ray_pushes, t) for t in range(2)]
    for future in futures:
        future.result(timeout=60)
    assert overlaps == []
    assert len(shard.native(Pull("q", -1))) == 400


def test_a_request_parked_by_a_ray_thread_is_answered_at_its_deadline(tmp_path):
    """The loop, asleep until its next housekeeping tick, must learn of a deadline a Ray
    thread set. Its ticks are an hour apart here: a pull answered only at a tick would
    never be answered within the test."""
    shard = Shard(tmp_path, housekeeping_interval=3600)
    try:
        for _ in range(5):
            pulled = shard.in_thread(shard.ray, Pull("empty", 1, True, 0.001))
            assert pulled.result(timeout=60) == []
    finally:
        shard.close()
