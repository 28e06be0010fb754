"""A local multi-node Ray cluster for the bench and the tests that lose nodes.

ray.cluster_utils starts a head node and worker nodes as processes of this machine; Ray's
failure detection is shortened (a silent node is declared dead after 1.5 s instead of 15 s)
so that losing a node shows quickly. Losing a node kills its processes by pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import psutil

# Ray declares a silent node dead after period x threshold (default 3 s x 5).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


NODE_START_TRIES = 3


def _started(start):
    """start() (a Ray node's start), tried again if Ray gave up on it: Ray gives a node 30 s
    to register with its control store, which a loaded machine may not meet. What a
    failed try started (processes of this one) is stopped by pid first."""
    for attempt in range(1, NODE_START_TRIES + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            return start()
        except Exception as error:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(error) or attempt == NODE_START_TRIES:
                raise
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass


class LocalCluster:
    """A head node and worker nodes on this machine, each worker with the resource "pype"
    and a data directory of its own in $PYPE_DATA; Ray connected to it."""

    def __init__(self, workers: int, prefix: str = "pype-cluster-"):
        from ray.cluster_utils import Cluster

        self.cluster = _started(lambda: Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "_system_config": FAST_FAILURE_DETECTION}))
        import ray  # after Cluster, as Ray's own tests do

        self.ray = ray
        self.scratch = tempfile.mkdtemp(prefix=prefix)
        self.data: dict[str, str] = {}
        self._added = 0
        for _ in range(workers):
            self.add_worker()
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level="WARNING")

    def add_worker(self) -> str:
        self._added += 1
        directory = os.path.join(self.scratch, f"node-{self._added}")
        os.mkdir(directory)
        node = _started(lambda: self.cluster.add_node(num_cpus=1, resources={"pype": 1},
                                                      env_vars={"PYPE_DATA": directory}))
        self.cluster.wait_for_nodes()
        self.data[node.node_id] = directory
        return node.node_id

    def lose(self, node_id: str) -> str:
        """Lose a worker as a machine is lost: SIGKILL its raylet and every process it
        started (a removed node's processes can outlive their raylet on one machine),
        delete its directory. Returns its IP. Ray learns of it by itself; forget()
        only tidies up after."""
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        processes = [raylet, *raylet.children(recursive=True)]
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)
        shutil.rmtree(self.data.pop(node_id))
        return node.node_ip_address

    def forget(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def stop(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.scratch, ignore_errors=True)
