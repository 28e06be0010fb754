"""Where the shards of a server run on a multi-node cluster (the config's `placement`).

Ray's SPREAD strategy left 0-CPU actors uneven here (4 of 6 on one node of 3), and
a soft node affinity placed 8 actors on 4 nodes as 1, 2, 2 and 3. So Pype pins
each shard to a node with a hard node affinity: shard i goes to the i-th of the
eligible nodes, round-robin. A shard restarts on its own node (where its journal
is); if that node is gone, the shard is gone with it.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pype.config import Placement
from pype.errors import ConfigError


def shard_options(placement: Placement, count: int) -> list[dict[str, Any]]:
    """Ray actor options for each of `count` shards. Call it where Ray is connected."""
    if placement.strategy == "pack":
        nodes = [ray.get_runtime_context().get_node_id()]
    else:
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"] and (
            placement.resource is None or node["Resources"].get(placement.resource, 0) > 0))
    if not nodes:
        raise ConfigError(f"placement: no alive node of the cluster has the resource "
                          f"{placement.resource!r}")
    return [{"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)}
            for i in range(count)]
