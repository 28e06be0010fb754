"""Where the shards of a server run on a multi-node cluster (the config's `placement`).

Ray's SPREAD strategy left 0-CPU actors uneven here (4 of 6 on one node of 3), and
a soft node affinity placed 8 actors on 4 nodes as 1, 2, 2 and 3. So Pype pins
each shard to a node with a hard node affinity: shard i goes to the i-th of the
eligible nodes, round-robin (with `replicas` N, its replicas on the i-th to the
(i + N - 1)-th). A shard restarts on its own node (where its journal is); if that
node is gone, the shard is gone with it, unless it has replicas on other nodes. The
router runs on the head node.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pype.config import Persistence, Placement
from pype.errors import ConfigError

HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives its head node alone


def eligible_nodes(placement: Placement) -> list[str]:
    """The alive nodes that may hold shards, by Ray node id, in a fixed order."""
    if placement.strategy == "pack":
        return [ray.get_runtime_context().get_node_id()]
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"] and (
        placement.resource is None or node["Resources"].get(placement.resource, 0) > 0))
    if not nodes:
        raise ConfigError(f"placement: no alive node of the cluster has the resource "
                          f"{placement.resource!r}")
    return nodes


def pinned_to(node: str) -> dict[str, Any]:
    """Ray actor options that keep an actor on `node`, also when Ray restarts it."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def shard_options(placement: Placement, count: int, replicas: int = 1) -> list[list[dict[str, Any]]]:
    """Ray actor options for each replica of each of `count` shards: replica r of shard i
    on the (i + r)-th eligible node, round-robin, so that a shard's replicas are on
    distinct nodes. Raises ConfigError if there are fewer eligible nodes than replicas.
    Call it where Ray is connected."""
    nodes = eligible_nodes(placement)
    if replicas > len(nodes):
        where = "pack puts every shard on one node" if placement.strategy == "pack" else (
            f"the cluster has {len(nodes)} eligible node{'s' * (len(nodes) != 1)}")
        raise ConfigError(f"replicas: {replicas} copies of each shard need {replicas} distinct "
                          f"nodes, and {where} (placement: {placement.strategy})")
    return [[pinned_to(nodes[(i + r) % len(nodes)]) for r in range(replicas)]
            for i in range(count)]


def router_options() -> dict[str, Any]:
    """Ray actor options that pin the router to the head node, whose loss is the cluster's
    loss anyway (Ray's control store lives there): losing a worker node never takes the
    router with it. Where Ray names no head node, the router runs on this process's node."""
    head = next((node["NodeID"] for node in ray.nodes() if node["Alive"] and
                 HEAD_RESOURCE in node["Resources"]), ray.get_runtime_context().get_node_id())
    return pinned_to(head)


def check_persistence_dir(persistence: Persistence, placements: list[list[dict[str, Any]]]) -> None:
    """Expand persistence.dir on each node that `placements` name, as its shards will;
    raise the ConfigError of the first node where a variable in it is not set.

    Runs only for a dir with a variable in it ($): `~` always expands.
    """
    if persistence.dir is None or "$" not in persistence.dir:
        return
    nodes = {options["scheduling_strategy"].node_id: options
             for replicas in placements for options in replicas}
    expand = ray.remote(num_cpus=0, max_retries=0)(_expand_here)
    try:
        ray.get([expand.options(**options).remote(persistence) for options in nodes.values()])
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ConfigError):
            raise error.cause from None
        raise


def _expand_here(persistence: Persistence) -> str:
    return str(persistence.on_this_node())
