"""Large items between the processes of one node through shared memory segments (pype.segments).

The first tests run the pieces without Ray: framing with file descriptors, a
client's pool, a shard's table. The others run a real server and look at what
the kernel says each process holds (/proc/<pid>/fd and maps), also after a
producer, a consumer or a shard is killed with SIGKILL.
"""

import contextlib
import gc
import os
import signal
import socket

import numpy as np
import pytest
import ray

import pype
from pype import protocol
from pype.framing import (
    SegmentSlice,
    StreamReader,
    descriptor_channel,
    segment_slices,
    send_descriptors,
    send_stream,
    stream_message,
)
from pype.segments import MAX_SEGMENTS, SHARED_MIN, Borrowed, SegmentPool
from pype.shards.segments import SharedSegments
from tests.events import until
from tests.test_reliability import durable, kill_shard, shard_pid, until_restarted

SHAPE = (1024, 1024)  # 1 MB of uint8: well above SHARED_MIN


def frame(value: int) -> np.ndarray:
    return np.full(SHAPE, value, np.uint8)


def segments_held(pid: int) -> tuple[int, int]:
    """(segments open, mappings of segments) in process `pid`: the distinct Pype memfds
    among its file descriptors (an mmap object keeps a copy of its own), and its maps."""
    open_segments = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "pype-segment" in os.readlink(path):
                open_segments.add(os.stat(path).st_ino)
        except OSError:  # closed meanwhile
            pass
    with open(f"/proc/{pid}/maps") as maps:
        return len(open_segments), sum("pype-segment" in line for line in maps)


def encoded(array: np.ndarray, request_id: int = 1) -> list:
    return protocol.encode_request(request_id, ("test", 0), protocol.Push(("q",), [array]))


def connected() -> tuple:
    """A client's end of a stream socket and of its descriptor channel, sent beside its
    first bytes as a client does, and the shard's end with its reader."""
    sender, receiver = socket.socketpair()
    channel, channel_end = descriptor_channel()
    send_stream(sender, stream_message([b"first"]), [channel_end.fileno()])
    channel_end.close()
    reader = StreamReader()
    assert reader.read(receiver) == [[b"first"]] and reader.channel is not None
    return sender, receiver, channel, reader


# -- the pieces, without Ray ------------------------------------------------------------------

def test_a_segment_crosses_a_socket_as_a_descriptor_with_its_file_descriptor():
    pool = SegmentPool()
    frames = pool.place(encoded(frame(3)))
    assert type(frames[1]) is SegmentSlice and frames[1].nbytes == frame(3).nbytes
    sender, receiver, channel, reader = connected()
    send_descriptors(channel, segment_slices(frames))
    assert send_stream(sender, stream_message(frames)) is None
    (got,) = reader.read(receiver)
    assert type(got[1]) is SegmentSlice and got[1].fd not in (frames[1].fd, -1)
    borrowed = Borrowed(receiver)
    request_id, _, push = protocol.decode_request(borrowed.attach(got))
    assert request_id == 1 and np.array_equal(push.items[0], frame(3))
    del push
    assert borrowed.take_released() == (frames[1].segment,)
    reader.close()
    pool.close()


def test_descriptors_keep_their_order_through_partial_writes():
    """A non-blocking writer whose socket fills writes the rest later; the reader gives
    each segment frame the next descriptor of the channel, so its own segment."""
    pool = SegmentPool()
    sender, receiver, channel, reader = connected()
    sender.setblocking(False)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outgoing = []
    for value in range(1, 4):  # each message: a segment, then 1 MB by value
        frames = pool.place(encoded(frame(value)))
        frames.append(memoryview(bytes([value]) * (1 << 20)))
        send_descriptors(channel, segment_slices(frames))
        outgoing += stream_message(frames)
    got = []
    outgoing = send_stream(sender, outgoing)
    assert outgoing  # partly written
    while len(got) < 3:
        got += reader.read(receiver)
        if outgoing:
            outgoing = send_stream(sender, outgoing)
    borrowed = Borrowed(receiver)
    for value, frames in enumerate(got, 1):
        _, _, push = protocol.decode_request(borrowed.attach(frames[:2]))
        assert np.array_equal(push.items[0], frame(value)) and bytes(frames[2][:1]) == bytes([value])
    reader.close()
    pool.close()


def test_a_record_left_without_its_message_is_found_not_taken_for_the_next():
    """A send interrupted between its descriptor record and its message leaves a record
    behind: the reader says the channel is out of step, rather than giving the next
    message's frame another segment."""
    pool = SegmentPool()
    sender, receiver, channel, reader = connected()
    orphan = pool.place(encoded(frame(1)))
    send_descriptors(channel, segment_slices(orphan))  # ...and its message never goes
    frames = pool.place(encoded(frame(2)))
    send_descriptors(channel, segment_slices(frames))
    send_stream(sender, stream_message(frames))
    with pytest.raises(ValueError, match="out of step"):
        reader.read(receiver)
    reader.close()
    pool.close()


def test_a_closed_connection_keeps_its_socket_while_its_process_reads_a_segment():
    """The shard counts a connection as a reader until its socket closes: closing it
    while an array still lives would let the producer write over that array."""
    pool = SegmentPool()
    frames = pool.place(encoded(frame(4)))
    sender, receiver, channel, reader = connected()
    send_descriptors(channel, segment_slices(frames))
    send_stream(sender, stream_message(frames))
    (got,) = reader.read(receiver)
    borrowed = Borrowed(receiver)
    _, _, push = protocol.decode_request(borrowed.attach(got))
    borrowed.close_when_unused()
    assert receiver.fileno() != -1
    del push
    assert receiver.fileno() == -1
    pool.close()


def test_a_pool_reuses_a_freed_segment_never_a_busy_one_and_goes_by_value_when_full():
    pool = SegmentPool()
    first = pool.place(encoded(frame(1)))[1]
    second = pool.place(encoded(frame(2)))[1]
    assert first.segment != second.segment and pool.sizes == (0, 2)
    pool.freed([first.segment])
    again = pool.place(encoded(frame(3)))[1]
    assert again.segment == first.segment and pool.sizes == (0, 2)
    small = pool.place(encoded(np.zeros(SHARED_MIN // 2, np.uint8)))[1]
    assert type(small) is not SegmentSlice  # small buffers cross the socket
    for value in range(MAX_SEGMENTS):
        pool.place(encoded(frame(value)))
    assert pool.sizes == (0, MAX_SEGMENTS)
    full = pool.place(encoded(frame(9)))[1]
    assert type(full) is not SegmentSlice and bytes(full.raw()) == frame(9).tobytes()
    pool.close()
    assert pool.sizes == (0, 0)


def test_a_shard_frees_a_segment_when_its_item_and_every_view_are_gone():
    pool, shard = SegmentPool(), SharedSegments()
    producer, consumer = object(), object()
    sent = pool.place(encoded(frame(5)))
    received = shard.received(producer, [sent[0], sent[1]._replace(fd=os.dup(sent[1].fd))])
    _, _, push = protocol.decode_request(received)
    item = push.items[0]
    del received, push
    assert np.array_equal(item, frame(5)) and len(shard) == 1
    answer = protocol.dumps((7, protocol.RESULT, [item]))
    lent = shard.lend(consumer, answer, room=8)
    assert type(lent[1]) is SegmentSlice and lent[1].segment == 1
    del item, answer
    assert shard.collect() == {}  # the shard's item is gone, the consumer still reads it
    assert len(shard) == 1
    shard.released(consumer, [lent[1].segment])
    assert len(shard) == 0 and shard.collect() == {producer: [sent[1].segment]}
    pool.close()


def test_the_sender_hears_of_a_freed_segment_and_not_after_it_left():
    pool, shard = SegmentPool(), SharedSegments()
    producer = object()
    for value in (1, 2):
        sent = pool.place(encoded(frame(value)))
        request = shard.received(producer, [sent[0], sent[1]._replace(fd=os.dup(sent[1].fd))])
        del request  # refused, say: the shard keeps nothing
    assert shard.collect() == {producer: [1, 2]} and len(shard) == 0
    sent = pool.place(encoded(frame(3)))
    kept = shard.received(producer, [sent[0], sent[1]._replace(fd=os.dup(sent[1].fd))])
    shard.left(producer)
    del kept
    assert shard.collect() == {} and len(shard) == 0  # freed, and nobody to tell
    pool.close()


def test_a_shard_refuses_a_descriptor_that_is_not_a_sealed_segment():
    shard = SharedSegments()
    unsealed = os.memfd_create("pype-segment-unsealed")
    os.ftruncate(unsealed, SHARED_MIN)
    with pytest.raises(ValueError, match="sealed"):
        shard.received(object(), [b"", SegmentSlice(1, 0, SHARED_MIN, unsealed)])
    with pytest.raises(OSError):
        os.fstat(unsealed)  # the shard closed it
    assert len(shard) == 0


# -- a real server ----------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class Client:
    """A producer or consumer in a process of its own, which a test can SIGKILL."""

    def __init__(self, server):
        self.server, self.held = server, []

    def pid(self) -> int:
        return os.getpid()

    def push(self, queue: str, values: list[int]) -> None:
        for value in values:
            self.server.push(frame(value), queue)  # native: this node's Unix socket

    def pull_and_hold(self, queue: str, count: int) -> list[int]:
        self.held += self.server.pull(queue, count)
        return [int(array[0, 0]) for array in self.held]


def shard_holds(server, queue) -> tuple[int, int]:
    return segments_held(shard_pid(server, queue))


def here() -> int:
    """Segments this process (the test's driver) holds open."""
    return segments_held(os.getpid())[0]


def test_a_pulled_array_stays_as_it_was_while_its_producer_reuses_segments(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    before = here()
    server.push(frame(1), q)
    (kept,) = server.pull(q)
    assert np.array_equal(kept, frame(1)) and kept.flags.writeable
    kept[0, 0] = 200  # a consumer's writes stay its own (copy-on-write)
    for value in range(2, 22):
        server.push(frame(value), q)
        (pulled,) = server.pull(q)
        assert np.array_equal(pulled, frame(value))
        del pulled
    assert kept[0, 0] == 200 and np.array_equal(kept[1:], frame(1)[1:])
    # 21 pushes, and the pool holds: kept's segment, the last one and the one before it
    assert here() - before <= 3
    del kept
    assert server.queue_len(q) == 0  # one more request: the shard hears the views are gone
    assert shard_holds(server, q) == (0, 0)


def test_a_leased_item_keeps_its_segment_until_it_is_acknowledged(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    server.push(frame(4), q)
    ((lease, first, _),) = server.pull(q, ack=True)
    del first  # the consumer's view goes; the lease keeps the item
    for value in range(5, 9):  # the producer pushes on: it must not write over the leased item
        server.push(frame(value), names("other"))
    assert server.nack(q, lease) == 1
    ((lease, again, redelivered),) = server.pull(q, ack=True)
    assert redelivered and np.array_equal(again, frame(4))
    del again
    assert server.ack(q, lease) == 1
    server.pull(names("other"), -1)
    assert server.queue_len(q) == 0
    assert shard_holds(server, q) == (0, 0)


def test_items_of_a_killed_producer_arrive_whole_and_then_free_their_segments(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    producer = Client.remote(server)
    ray.get(producer.push.remote(q, [10, 11, 12]))
    assert shard_holds(server, q)[0] == 3
    assert server.stats()["shards"][0]["shared_segments"] == 3
    os.kill(ray.get(producer.pid.remote()), signal.SIGKILL)
    got = server.pull(q, 3)
    assert [int(array[0, 0]) for array in got] == [10, 11, 12]
    assert all(np.array_equal(array, frame(value)) for array, value in zip(got, [10, 11, 12]))
    del got
    server.queue_len(q)  # tells the shard the views are gone
    assert shard_holds(server, q) == (0, 0)


def test_a_killed_consumer_gives_its_segments_back_to_the_producer(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    for value in (20, 21, 22):
        server.push(frame(value), q)
    gc.collect()  # other tests' connections, if any are left to collect, go now
    busy = here()
    consumer = Client.remote(server)
    assert ray.get(consumer.pull_and_hold.remote(q, 3)) == [20, 21, 22]
    assert shard_holds(server, q)[0] == 3  # lent to the consumer, which holds the arrays
    os.kill(ray.get(consumer.pid.remote()), signal.SIGKILL)
    until(lambda: shard_holds(server, q) == (0, 0), "the shard to free the dead consumer's segments")
    server.queue_len(q)  # the shard's notices came before this answer
    for value in (23, 24, 25):  # into the segments that came back
        server.push(frame(value), q)
    assert here() == busy
    assert [int(array[0, 0]) for array in server.pull(q, 3)] == [23, 24, 25]


def test_a_consumer_that_closes_keeps_its_arrays_as_they_were(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    for value in (50, 51):
        server.push(frame(value), q)
    with server.consume(q, batch_size=2) as consumer:
        kept = next(consumer.batches())
    for value in range(52, 60):  # the producer's pool turns over while kept lives
        server.push(frame(value), q)
        server.pull(q)
    assert [int(array[0, 0]) for array in kept] == [50, 51]
    assert all(np.array_equal(array, frame(value)) for array, value in zip(kept, [50, 51]))


def test_a_killed_shard_leaves_what_a_consumer_read_intact(fresh_server, names):
    server = fresh_server(shards=1)
    q = names()
    server.push(frame(30), q)
    (kept,) = server.pull(q)
    until_restarted(server, q, kill_shard(server, q))
    # Without persistence the new shard may know that q was lost (if the router had
    # learned its name): then the first call on q says so, once, and is not applied.
    with contextlib.suppress(pype.ShardLostError):
        assert server.pull(q) == []
    for value in (31, 32, 33):  # new segments: the dead shard's may still be read
        server.push(frame(value), q)
    assert [int(array[0, 0]) for array in server.pull(q, 3)] == [31, 32, 33]
    assert np.array_equal(kept, frame(30))
    del kept
    assert server.queue_len(q) == 0
    assert shard_holds(server, q) == (0, 0)


def test_a_durable_shard_journals_the_bytes_of_a_segment(fresh_server, names, tmp_path):
    server = fresh_server(**durable(tmp_path))
    q = names()
    server.push(frame(40), q)
    until_restarted(server, q, kill_shard(server, q))
    (again,) = server.pull(q)
    assert np.array_equal(again, frame(40))
