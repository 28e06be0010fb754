"""The client's cost per native call: `python bench/client_micro.py [CALLS]`.

Starts a local Ray and a one-shard server, makes CALLS native one-item pushes from
this process one after another (each waits for its answer), and prints one JSON line:
{"us_per_call": ..., "calls": ..., "pype": where the pype it ran came from}. Written to
run unchanged against older versions of Pype (bench/compare.py): it uses only the
public API.
"""

import json
import os
import sys
import time

import ray

import pype


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    server = pype.Server.remote(shards=1)
    try:
        for i in range(1000):  # connected and warm before the clock runs
            server.push(i, "warm-up")
        started = time.perf_counter()
        for i in range(calls):
            server.push(i, "micro")
        seconds = time.perf_counter() - started
        assert server.queue_len("micro") == calls
        print(json.dumps({"us_per_call": seconds / calls * 1e6, "calls": calls,
                          "pype": pype.__file__}))
    finally:
        server.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
