"""Targets, the Markdown table and the chart of a bench run."""

from __future__ import annotations

from pathlib import Path


def _get(results: dict, workload: str, system: str, metric: str) -> float | None:
    return results["workloads"].get(workload, {}).get(system, {}).get(metric)


def check_targets(results: dict, original_seed_chain: float) -> list[dict]:
    """The issue's targets as ratios of this run's medians: value, goal, met."""
    def ratio(a, b):
        return None if a is None or b is None else a / b

    chain = lambda system: _get(results, "chain", system, "items_per_s")
    pingpong = lambda system, metric: _get(results, "ping-pong", system, metric)
    frames = lambda system: _get(results, "frames", system, "frames_per_s")
    rows = [
        ("chain native one item per call / redis LPUSH+BRPOP",
         ratio(chain("pype native, one item per call"), chain("redis, LPUSH/BRPOP")), ">=", 1.5),
        ("chain native push_pull / redis LPUSH+BRPOP pipelined (one round trip per stage each)",
         ratio(chain("pype native, one item per call, push_pull"), chain("redis, LPUSH+BRPOP pipelined")),
         ">=", 1.5),
        ("chain native one item per call / .remote() one item per call",
         ratio(chain("pype native, one item per call"), chain("pype .remote(), one item per call")),
         ">=", 10),
        ("chain native batched / redis BLMPOP 1000",
         ratio(chain("pype native, batched"), chain("redis, BLMPOP COUNT 1000")), ">=", 5),
        ("chain consume/producer / chain native batched",
         ratio(chain("pype native, consume/producer"), chain("pype native, batched")), ">=", 0.5),
        ("ping-pong p50: native / redis",
         ratio(pingpong("pype native", "p50_ms"), pingpong("redis", "p50_ms")), "<=", 1),
        ("ping-pong p99: native / redis",
         ratio(pingpong("pype native", "p99_ms"), pingpong("redis", "p99_ms")), "<=", 2),
        ("one shard / one redis-server: pipelined one-item pushes from 4 processes",
         ratio(_get(results, "capacity", "pype native, 4 processes, one-item pushes, 64 in flight each",
                    "items_per_s"),
               _get(results, "capacity", "redis, 4 processes, pipelines of 64 LPUSH", "items_per_s")),
         ">=", 0.5),
        ("frames native / cross-process floor",
         ratio(frames("pype native (shared memory)"),
               frames("cross-process floor (a task's ray.put, handed over by Ray)")), ">=", 0.9),
        ("frames native / redis", ratio(frames("pype native (shared memory)"), frames("redis (raw bytes)")),
         ">=", 2),
        ("chain .remote() batched / redis batched",
         ratio(chain("pype .remote(), batched"), chain("redis, BLMPOP COUNT 1000")), ">=", 3),
        ("seed README chain code / original implementation (3.7 items/s)",
         ratio(chain("pype .remote(), seed README polling code"), original_seed_chain), ">=", 10),
        ("bulk native items/s", _get(results, "bulk", "pype native", "items_per_s"), ">=", 1_000_000),
        ("video through one hop / OpenCV decode alone",
         ratio(_get(results, "video", "pype VideoServer, one hop", "frames_per_s"),
               _get(results, "video", "opencv decode only", "frames_per_s")), ">=", 0.8),
    ]
    queue = lambda system, metric: _get(results, "queue", system, metric)
    for label, metric, goal in (("blocking put+get", "pairs_per_s", 10),
                                ("4 producer + 4 consumer tasks", "items_per_s", 10),
                                ("put_nowait_batch + get_nowait_batch", "items_per_s", 1.5)):
        rows.append((f"pype.Queue / ray.util.queue: {label}",
                     ratio(queue(f"pype.Queue, {label}", metric), queue(f"ray.util.queue, {label}", metric)),
                     ">=", goal))
    for system, metrics in results["workloads"].get("spread", {}).items():
        rows.append((f"spread {system}: router calls per data operation", metrics["router_calls_per_op"], "<=", 0))
        rows.append((f"spread {system}: max/mean shard load", metrics["max_over_mean_load"], "<=", 1.2))
    for system, metrics in results["workloads"].get("scale", {}).items():
        rows.append((f"scale {system}: router calls per data operation", metrics["router_calls_per_op"], "<=", 0))
        rows.append((f"scale {system}: max/mean shard load", metrics["max_over_mean_load"], "<=", 1.2))
    if "memory" in results:
        rows.append(("shard RSS holding 1,000,000 items (MB)", results["memory"]["shard_peak_rss_mb"], "<=", 200))
    targets = []
    for name, value, op, goal in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        targets.append({"target": name, "value": value, "goal": f"{op} {goal:g}", "met": met})
    return targets


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [(f"Machine: {m['cpus']} cores, {m['memory_gb']} GB, Python {m['python']}, Ray {m['ray']}, "
             f"{m['date']}; {results['rounds']} rounds, medians{' (quick sizes)' if results['quick'] else ''}."),
             "", "| workload | system | result |", "| --- | --- | --- |"]
    for workload, systems in results["workloads"].items():
        for system, metrics in systems.items():
            shown = ", ".join(f"{_fmt(v)} {k.replace('_per_s', '/s').replace('_', ' ')}"
                              for k, v in metrics.items())
            lines.append(f"| {workload} | {system} | {shown} |")
    if "memory" in results:
        mem = results["memory"]
        lines.append(f"| memory | pype shard holding {mem['items']:,} items | "
                     f"{mem['shard_peak_rss_mb']:.0f} MB peak RSS ({mem['shard_peak_rss_mb_empty']:.0f} MB empty) |")
    lines += ["", "| target | value | goal | met |", "| --- | --- | --- | --- |"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """Throughput per system (log scale) for each workload, and ping-pong latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(wl, metric) for wl, metric in [("chain", "items_per_s"), ("bulk", "items_per_s"),
                                                  ("frames", "frames_per_s"), ("capacity", "items_per_s"),
                                                  ("video", "frames_per_s"),
                                                  ("spread", "items_per_s"),
                                                  ("scale", "items_per_s"),
                                                  ("durability", "pushes_per_s"),
                                                  ("ping-pong", "p50_ms")]
              if wl in results["workloads"]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels) + 0.5), squeeze=False)
    for ax, (workload, metric) in zip(axes[:, 0], panels, strict=True):
        systems = results["workloads"][workload]
        names = list(systems)
        values = [systems[n][metric] for n in names]
        colors = ["tab:blue" if n.startswith("pype") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        if max(values) > 50 * min(values):  # a wide range: log scale; else bars from zero
            ax.set_xscale("log")
        ax.set_title(f"{workload}: {metric.replace('_per_s', '/s').replace('_', ' ')}", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    m = results["machine"]
    fig.suptitle(f"Pype bench, {m['cpus']} cores, {m['memory_gb']} GB, Ray {m['ray']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
