"""Replicated shards on a multi-node Ray cluster: nodes die, their disks with them, and
nothing acknowledged is lost; clients fail over by themselves.

Run by tests/test_failover.py in its own process (a process joins one Ray cluster, and
the test session already runs one). A head node and 3 worker nodes (ray.cluster_utils),
Ray's failure detection shortened; 2 shards of 2 replicas (min_insync 1), journals with
fsync "always" on each node's own disk; the router is killed too, a primary stopped, the
server resized while a shard is under-replicated and as a node dies, and a `.remote()`
call sent to a backup. Prints one "ok: ..." line per check; stops the cluster, which
stops what it started.
"""

import os
import signal
import sys
import time

from events import until  # beside this script
from node_loss_scenario import queues_by_shard

from bench.cluster import LocalCluster  # the repository's root is on PYTHONPATH

WORKERS = 3
REQUEST_TIMEOUT = 10.0


def replicas_of(ray, server, index: int) -> dict:
    """The router's record of shard `index`: epoch, and each replica's node, role, in sync."""
    return ray.get(server.routes.router.stats.remote())["replicas"][index]


def all_in_sync(ray, server, index: int) -> bool:
    record = replicas_of(ray, server, index)
    return all(replica["in_sync"] for replica in record["replicas"]) and len(record["replicas"]) == 2


def describe_replicas(ray, server) -> None:
    """Print the router's record and what each replica says of itself (a failed wait)."""
    print("router:", ray.get(server.routes.router.stats.remote())["replicas"])
    for actor in ray.get(server.routes.router.actors.remote()):
        try:
            stats = ray.get(actor.stats.remote(), timeout=REQUEST_TIMEOUT)
            print("replica:", {key: stats.get(key) for key in
                               ("shard", "pid", "node_id", "restarted", "replication")})
        except Exception as error:  # noqa: BLE001 - a dead or stuck one says so
            print("replica: no answer:", repr(error)[:300])


def primary_node(ray, server, index: int) -> str:
    record = replicas_of(ray, server, index)
    return next(r["node"] for r in record["replicas"] if r["role"] == "primary")


def replica(ray, server, index: int, role: str) -> tuple:
    """(actor, pid) of a replica of shard `index` in `role` ("primary" or "backup")."""
    for actor in ray.get(server.routes.router.actors.remote()):
        stats = ray.get(actor.stats.remote(), timeout=REQUEST_TIMEOUT)
        if stats["shard"] == index and stats["replication"]["role"] == role:
            return actor, stats["pid"]
    raise AssertionError(f"shard {index} has no {role}")


def only_in_sync_replica_killed(pype, ray, name: str, persistence: dict) -> None:
    """Step 1d on a server of its own, named `name`, with `persistence`."""
    server = pype.Server.remote(
        name=name, shards=1, replicas=2, placement={"resource": "pype"},
        transport={"request_timeout": REQUEST_TIMEOUT}, persistence=persistence)
    server.push(["n1", "n2"], "nq", expand=True)
    _, backup_pid = replica(ray, server, 0, "backup")
    _, primary_pid = replica(ray, server, 0, "primary")
    os.kill(backup_pid, signal.SIGSTOP)
    try:
        assert ray.get(server.push.remote("n3", "nq")) == 1  # committed without the backup
        assert replicas_of(ray, server, 0)["under_replicated"]
        os.kill(primary_pid, signal.SIGKILL)
        if persistence["dir"] is None:
            try:
                server.push("n4", "nq")
                raise AssertionError("a push to a queue whose items died was applied silently")
            except pype.ShardLostError:
                pass  # told once; not applied
            assert server.push("n4", "nq") == 1
            assert server.pull("nq", -1) == ["n4"]
        else:
            assert server.push("n4", "nq") == 1  # resent to the restarted primary
            assert server.pull("nq", -1) == ["n1", "n2", "n3", "n4"]
    finally:
        os.kill(backup_pid, signal.SIGCONT)
    until(lambda: all_in_sync(ray, server, 0), f"the resumed backup of {name!r} in sync", 120)
    server.shutdown()


def main() -> None:
    cluster = LocalCluster(WORKERS, "pype-failover-")
    ray = cluster.ray
    try:
        import pype
        from pype.hashing import shard_for
        from pype.placement import eligible_nodes
        from pype.protocol import Pull

        try:
            pype.Server.remote(shards=1, replicas=4, placement={"resource": "pype"})
            raise AssertionError("4 replicas on 3 nodes started")
        except pype.ConfigError as error:
            assert "4 distinct nodes" in str(error), error
        print("ok: more replicas than eligible nodes is a ConfigError, and starts nothing")

        server = pype.Server.remote(  # leases outlive the steps up to step 2's failover
            shards=2, replicas=2, placement={"resource": "pype"},
            transport={"request_timeout": REQUEST_TIMEOUT},
            persistence={"dir": "${PYPE_DATA}/pype", "fsync": "always"},
            queue_defaults={"visibility_timeout": 3600})
        queue = queues_by_shard(server, 2)[0]
        for index in (0, 1):
            record = replicas_of(ray, server, index)
            nodes = [replica["node"] for replica in record["replicas"]]
            assert len(set(nodes)) == 2 and all(r["in_sync"] for r in record["replicas"]), record
        print("ok: each shard has 2 replicas on distinct nodes, both in sync")

        server.push(list(range(100)), queue, expand=True)
        assert ray.get(server.push.remote(list(range(100, 150)), queue, expand=True)) == 50
        leased = server.pull(queue, 5, ack=True)
        assert [item for _, item, _ in leased] == [0, 1, 2, 3, 4], leased
        print("ok: 150 items acknowledged on both paths, 5 of them leased")

        # 0. A .remote() call that reaches a backup (its caller's topology is from before a
        # failover) runs on the primary; one naming a partitioned queue's head goes on to
        # its partitions, as on the primary.
        server.add("parted", partitions=2)
        server.push(["p1", "p2"], "parted", expand=True)
        backup, _ = replica(ray, server, server.shard_of("parted"), "backup")
        got = ray.get(backup.wait_pull.remote(Pull("parted", -1), ("a-stale-caller", 0)))
        assert sorted(got) == ["p1", "p2"], got
        print("ok: a .remote() pull that reached a backup ran on the primary's partitions")

        # 1. A primary's process is SIGKILLed (its node lives): a backup takes over, and
        # Ray restarts the old one, which rejoins as a backup.
        other = queues_by_shard(server, 2)[1]
        server.push(["a", "b"], other, expand=True)
        pid = next(s["pid"] for s in ray.get(server.stats.remote())["shards"] if s["shard"] == 1)
        os.kill(pid, signal.SIGKILL)
        assert server.push("c", other) == 1  # resent to the new primary
        got = server.pull(other, -1)
        assert got == ["a", "b", "c"], (got, replicas_of(ray, server, 1))
        print(f"ok: shard 1's primary process {pid} was killed; the promoted backup serves "
              f"every acknowledged item")
        until(lambda: all_in_sync(ray, server, 1), "the restarted replica back in sync", 120)
        print("ok: the killed primary came back as a backup and caught up")

        # 1b. The router dies in the middle of a failover: it and shard 1's primary are
        # SIGKILLed together. Ray restarts the router, which carries on from its record.
        server.push(["d", "e"], other, expand=True)
        router = server.stats()["router"]["pid"]
        pid = next(s["pid"] for s in ray.get(server.stats.remote())["shards"] if s["shard"] == 1)
        epoch = replicas_of(ray, server, 1)["epoch"]
        os.kill(pid, signal.SIGKILL)
        os.kill(router, signal.SIGKILL)
        assert server.push("f", other) == 1
        got = server.pull(other, -1)
        assert got == ["d", "e", "f"], (got, replicas_of(ray, server, 1))
        assert server.stats()["router"]["pid"] != router
        assert replicas_of(ray, server, 1)["epoch"] > epoch
        until(lambda: all_in_sync(ray, server, 1), "shard 1's replicas back in sync", 120)
        print(f"ok: the router ({router}) and shard 1's primary ({pid}) were killed together; "
              f"the restarted router failed shard 1 over and every acknowledged item is there")

        # 1c. Shard 1's primary stops without dying (SIGSTOP): Ray sees nothing; the
        # router's pings do, and it promotes the backup. Resumed, the old one follows.
        server.push(["g"], other, expand=True)
        pid = next(s["pid"] for s in ray.get(server.stats.remote())["shards"] if s["shard"] == 1)
        epoch = replicas_of(ray, server, 1)["epoch"]
        os.kill(pid, signal.SIGSTOP)
        try:
            until(lambda: replicas_of(ray, server, 1)["epoch"] > epoch,
                  "the router to replace the stopped primary", 120)
            assert server.push("h", other) == 1  # no answer from the stopped one: resent
        finally:
            os.kill(pid, signal.SIGCONT)
        got = server.pull(other, -1)
        assert got == ["g", "h"], (got, replicas_of(ray, server, 1))
        until(lambda: all_in_sync(ray, server, 1), "the resumed replica back in sync", 120)
        print(f"ok: shard 1's primary ({pid}) was stopped (SIGSTOP); the router took it for "
              f"dead and promoted the backup; resumed, it followed and caught up")

        # 1d. The primary, the one replica in sync (its backup stopped), is SIGKILLed.
        # fsync "never": its OS did not restart, so its journal holds every record it
        # wrote: Ray restarts it, it leads again, and every acknowledged item is there.
        # No persistence: the items died with it; it leads again empty, and the first
        # call to a queue it held raises ShardLostError, as with one replica.
        only_in_sync_replica_killed(pype, ray, "never", {"dir": "${PYPE_DATA}/pype", "fsync": "never"})
        print("ok: fsync never: the only in-sync replica's process was killed; restarted on "
              "the same boot of its OS, it led again with every acknowledged item")
        only_in_sync_replica_killed(pype, ray, "memory", {"dir": None})
        print("ok: no persistence: the only in-sync replica's process was killed; it led "
              "again empty, and the first call to its queue raised ShardLostError")

        # 2. The primary's node dies, its disk with it.
        first = primary_node(ray, server, 0)
        killed_at = time.monotonic()
        cluster.lose(first)
        server.push([150], queue, expand=True)  # waits for the failover
        seconds = time.monotonic() - killed_at
        assert primary_node(ray, server, 0) != first
        print(f"ok: the primary's node died; a native push was acknowledged {seconds:.1f} s "
              f"after the kill, by the promoted backup")
        cluster.forget(first)

        assert server.ack(queue, [lease_id for lease_id, _, _ in leased]) == 5
        assert server.ack(queue, [lease_id for lease_id, _, _ in leased]) == 0
        print("ok: leases taken before the failover are acked after it (a second ack is harmless)")

        assert ray.get(server.push.remote([151], queue, expand=True)) == 1
        print("ok: .remote() pushes go to the new primary")

        # 3. A new replica replaces the lost one, on the node left, and catches up.
        until(lambda: all_in_sync(ray, server, 0), "a new replica of shard 0 in sync", 120)
        record = replicas_of(ray, server, 0)
        assert first not in [replica["node"] for replica in record["replicas"]], record
        print("ok: a new replica of shard 0 on the remaining node caught up and is in sync")

        # 3b. A resize while shard 0 is under-replicated: its backup stops (SIGSTOP); the
        # primary takes it out of the in-sync set at its next change (a .remote() push,
        # which waits for that) and commits alone from then on, the resize's steps too.
        seed = server.routes.topology.config.hash_seed
        moving = next(name for name in (f"moving-{n}" for n in range(1000))
                      if shard_for(name, 2, seed) == 0 and shard_for(name, 3, seed) == 2)
        server.push(["m1", "m2"], moving, expand=True)
        _, stopped = replica(ray, server, 0, "backup")
        os.kill(stopped, signal.SIGSTOP)
        try:
            assert ray.get(server.push.remote("m3", moving)) == 1
            assert replicas_of(ray, server, 0)["under_replicated"]
            resized = server.resize(3)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert resized["shards"] == 3 and resized["moved_queues"] >= 1, resized
        assert server.queue_len(queue) == 147 and server.pull(moving, -1) == ["m1", "m2", "m3"]
        until(lambda: all(all_in_sync(ray, server, index) for index in range(3)),
              "every replica of the 3 shards in sync", 120)
        print(f"ok: a resize to 3 shards while shard 0 was under-replicated moved "
              f"{resized['moved_queues']} queues and lost nothing; its backup caught up after")

        # 4. A second node loss: the node of the primary that holds `queue` (the resize may
        # have moved it). Nothing acknowledged is lost.
        second = primary_node(ray, server, server.shard_of(queue))
        cluster.lose(second)
        got = server.pull(queue, -1)
        assert got == list(range(5, 152)), (len(got), got[:10], got[-10:])
        print("ok: after a second node loss every acknowledged item is there, in order, once")
        cluster.forget(second)

        stats = server.stats()
        assert len(stats["failovers"]) >= 3 and stats["under_replicated"] >= 1, stats["failovers"]
        from rich.console import Console

        from pype.operations import StatsView
        console = Console(record=True, width=160)
        console.print(StatsView(server).render())
        shown = console.export_text()
        assert "failovers" in shown and "primary" in shown and "backup" in shown, shown
        assert "lag bytes" in shown, shown
        backups = [replica for record in stats["replicas"] for replica in record["replicas"]
                   if replica["role"] == "backup"]
        assert all(isinstance(replica["lag_bytes"], int) or replica["lag_bytes"] is None
                   for replica in backups) and any(replica["lag_bytes"] is not None
                                                   for replica in backups), backups
        print(f"ok: stats() and pype stats show {len(stats['failovers'])} failovers, "
              f"{stats['under_replicated']} shards under-replicated, each replica's role")

        # 5. A node joins: the router puts each shard's missing replica on it by itself.
        def gone_replicas() -> int:
            return sum(replica["gone"] for record in ray.get(
                server.routes.router.stats.remote())["replicas"] for replica in record["replicas"])
        until(lambda: gone_replicas() == 3, "each shard's replica lost with the node recorded", 120)
        cluster.add_worker()
        try:
            until(lambda: all(all_in_sync(ray, server, index) for index in range(3)),
                  "every shard with 2 replicas in sync again", 120)
        except AssertionError:
            describe_replicas(ray, server)  # what the next one to look at needs
            raise
        assert server.stats()["under_replicated"] == 0
        print("ok: a node joined and the router gave each under-replicated shard a new "
              "replica on it, which caught up")

        # 6. A node dies while a resize starts a new shard's replica on it (Ray takes 1.5 s
        # here to notice; the resize placed the replica at once): the replica starts on
        # another node and the resize finishes.
        cluster.add_worker()
        server.push(list(range(200, 220)), queue, expand=True)
        nodes = eligible_nodes(server.routes.topology.config.placement)
        victim = nodes[3 % len(nodes)]  # where shard 3's first replica goes (shard_options)
        resizing = server.routes.router.resize.remote(4)
        cluster.lose(victim)
        resized = ray.get(resizing)
        server.routes.refresh(resized["epoch"])
        assert resized["shards"] == 4, resized
        until(lambda: all(all_in_sync(ray, server, index) for index in range(4)),
              "every replica of the 4 shards in sync", 120)
        assert all(victim not in [r["node"] for r in replicas_of(ray, server, index)["replicas"]]
                   for index in range(4))
        assert server.pull(queue, -1) == list(range(200, 220))
        print("ok: a node lost as a resize placed a new shard on it: the resize to 4 shards "
              "finished, the new shard's replica started elsewhere, nothing was lost")
        cluster.forget(victim)

        server.shutdown()
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
