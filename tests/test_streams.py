"""consume() and producer(): one item at a time in the code, batches on the wire."""

import logging

import pytest
import ray

from tests.events import until


@ray.remote(num_cpus=0)
def produce_with_helper(server, queue, count, batch_size, linger):
    with server.producer(queue, batch_size=batch_size, linger=linger) as out:
        for i in range(count):
            out.push(i)
    return count


def test_producer_and_consumer_move_everything_in_order(server, names):
    q = names()
    done = produce_with_helper.remote(server, q, 5000, 100, 0.005)
    got = list(server.consume(q, timeout=3))
    assert ray.get(done) == 5000
    assert got == list(range(5000))
    assert ray.get(server.stats.remote())["queues"][q]["pushed"] == 5000


def test_producer_batches_calls(server, names):
    q = names()
    producer = server.producer(q, batch_size=50, linger=10)
    for i in range(120):
        producer.push(i)
    assert ray.get(server.queue_len.remote(q)) == 100  # two full batches out, 20 buffered
    assert producer.close() == 120
    assert ray.get(server.pull.remote(q, batch_size=-1)) == list(range(120))


def test_producer_flushes_after_linger_without_more_pushes(server, names):
    q = names()
    producer = server.producer(q, batch_size=1000, linger=0.05)
    producer.push("lonely")
    until(lambda: ray.get(server.queue_len.remote(q)), "the linger flush")
    assert ray.get(server.pull.remote(q)) == ["lonely"]
    producer.close()
    with pytest.raises(RuntimeError):
        producer.push("after close")


def test_producer_close_raises_a_batch_error(server, names):
    import pype

    q = names()
    ray.get(server.add.remote(q, maxsize=2))
    ray.get(server.push.remote("first", q))
    producer = server.producer(q, batch_size=2, linger=10)
    for i in range(2):
        producer.push(i)
    with pytest.raises(pype.QueueFullError):
        producer.close()


def test_consumer_hands_back_what_it_took_but_did_not_yield(server, names, caplog):
    q = names()
    ray.get(server.push.remote(list(range(10)), q, expand=True))
    consumer = server.consume(q, batch_size=4, timeout=1)
    assert [next(consumer), next(consumer)] == [0, 1]
    assert consumer.close() == [2, 3, 4, 5, 6, 7]  # rest of this batch + the prefetched one
    assert ray.get(server.pull.remote(q, batch_size=-1)) == [8, 9]

    ray.get(server.push.remote(list(range(3)), q, expand=True))
    with caplog.at_level(logging.WARNING, logger="pype"), server.consume(q, timeout=1) as items:
        next(items)
    assert "took 2 items it never yielded" in caplog.text


def test_a_for_loop_that_breaks_out_leaves_the_rest_to_close(server, names):
    q = names()
    ray.get(server.push.remote(list(range(10)), q, expand=True))
    consumer = server.consume(q, batch_size=4, timeout=1)
    for item in consumer:
        if item == 1:
            break
    assert next(consumer) == 2  # the loop and next() share one position
    assert consumer.close() == [3, 4, 5, 6, 7]
    assert ray.get(server.pull.remote(q, batch_size=-1)) == [8, 9]


def test_loops_next_and_batches_over_one_consumer_share_one_position(server, names):
    q = names()
    ray.get(server.push.remote(list(range(12)), q, expand=True))
    consumer = server.consume(q, batch_size=3, timeout=0.5)
    seen = []
    for item in consumer:  # next() inside the loop takes the item after
        seen += [item, next(consumer)]
        if len(seen) == 6:
            break
    batches = consumer.batches()
    seen += next(batches)  # the rest of the batch next() began, then whole ones
    seen.append(next(consumer))
    seen += [a + b * 100 for a, b in zip(consumer, consumer, strict=False)]
    assert seen[:9] == list(range(9)), seen
    assert seen[9:] == [9, 10 + 11 * 100] and consumer.close() == []


def test_an_item_that_cannot_be_sent_is_raised_and_nothing_after_it_is_lost(server, names):
    q = names()
    producer = server.producer(q, batch_size=2, linger=0.05)
    producer.push("first")
    with pytest.raises(Exception, match="pickle"):
        producer.push(lambda: "cannot be pickled")  # fills the batch: sent at once
    with pytest.raises(Exception, match="pickle"):
        producer.close()  # still at the front: never skipped
    assert ray.get(server.queue_len.remote(q)) == 0


def test_batches_handed_over_whole_keep_order_and_count(server, names):
    source, output = names("in"), names("out")
    ray.get(server.push.remote(list(range(2500)), source, expand=True))
    with server.producer(output, batch_size=1000, linger=10) as out:
        consumer = server.consume(source, batch_size=700, timeout=0.5)
        batches = list(consumer.batches())
        for batch in batches:
            out.extend(batch)
        out.push("last")
    assert [len(batch) for batch in batches] == [700, 700, 700, 400]
    assert consumer.close() == []
    assert ray.get(server.pull.remote(output, batch_size=-1)) == list(range(2500)) + ["last"]


def test_consume_rejects_bad_arguments(server):
    with pytest.raises(TypeError):
        server.consume(5)
    with pytest.raises(ValueError):
        server.consume("q", batch_size=0)
    with pytest.raises(ValueError):
        server.producer("q", batch_size=0)
    with pytest.raises(ValueError, match="window must be between 1 and 10,000"):
        server.producer("q", window=10_001)  # more than a shard keeps answers for
