"""Two versions of Pype side by side: `python -m bench.compare --before REV`.

Checks out REV (and, with --after, a second revision; by default the working tree)
into temporary git worktrees, and runs in turns, each in a process of its own with
that tree first on sys.path (so its driver and its Ray workers import that tree's
pype):
- the client micro-benchmark: 100,000 native one-item pushes from one process to
  a one-shard server, microseconds per call (bench/client_micro.py), and the shard's
  CPU per one-item push and pull (bench/shard_micro.py), `--micro` runs of each
  version, alternating;
- `pype bench --only chain ping-pong capacity --rounds 1` (`--only` names other
  workloads), `--rounds` runs of each version, alternating which goes first.
Reports medians and spreads (min-max) per row and the ratio after/before, to
bench/results/compare-<date>.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"


def worktree(revision: str, into: Path) -> Path:
    """A clean checkout of `revision` at `into` (a git worktree, removed by cleanup())."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), revision],
                   check=True, capture_output=True)
    return into


def short(revision: str) -> str:
    """`revision` as the commit it names now (HEAD moves on; a hash does not)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision],
                          check=True, capture_output=True, text=True).stdout.strip()


def cleanup(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                   check=False, capture_output=True)


def run_in(tree: Path, *args: str, timeout: float = 1800) -> str:
    """Run `python *args` with `tree` first on the path (its pype and bench), in `tree`."""
    env = dict(os.environ, PYTHONPATH=str(tree), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} in {tree} failed:\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


def micro(tree: Path, calls: int) -> float:
    """Microseconds per native one-item push, measured by `tree`'s own code."""
    script = Path(__file__).parent / "client_micro.py"  # this version's, run on both trees
    outcome = json.loads(run_in(tree, str(script), str(calls)).strip().splitlines()[-1])
    if not outcome["pype"].startswith(str(tree)):
        raise RuntimeError(f"the run in {tree} imported {outcome['pype']}")
    return outcome["us_per_call"]


def shard_micro(tree: Path) -> dict[str, float]:
    """The loop thread's CPU microseconds per one-item push and pull, `tree`'s shard."""
    outcome = json.loads(run_in(tree, "-m", "bench.shard_micro").strip().splitlines()[-1])
    if not outcome["pype"].startswith(str(tree)):
        raise RuntimeError(f"the run in {tree} imported {outcome['pype']}")
    return {"shard micro-benchmark: CPU per one-item push (us)": outcome["push_us"],
            "shard micro-benchmark: CPU per one-item pull (us)": outcome["pull_us"]}


def bench_rows(tree: Path, workloads: list[str]) -> dict[str, float]:
    """workload: system -> its main figure, from one round of `tree`'s own bench."""
    with tempfile.TemporaryDirectory(prefix="pype-compare-") as out:
        run_in(tree, "-m", "bench", "--only", *workloads, "--rounds", "1", "--out", out)
        results = json.loads((Path(out) / "latest.json").read_text())
    rows = {}
    for workload, systems in results["workloads"].items():
        for system, metrics in systems.items():
            metric = "items_per_s" if "items_per_s" in metrics else min(metrics)
            rows[f"{workload}: {system} ({metric})"] = metrics[metric]
    return rows


def summary(samples: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    for row in samples["before"]:
        before, after = samples["before"][row], samples["after"].get(row, [])
        if not after:
            continue
        rows.append({"row": row, "before": statistics.median(before), "after": statistics.median(after),
                     "before_spread": [min(before), max(before)], "after_spread": [min(after), max(after)],
                     "ratio": statistics.median(after) / statistics.median(before)})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Before and after: {report['before']} -> {report['after']}", "",
             (f"{report['date']}, {report['machine']}; each version in a process of its own, "
             f"alternating ({report['micro_runs']} micro-benchmark runs, {report['bench_runs']} "
             f"bench runs of each). Medians; spread is min-max over the runs."), "",
             "| row | before | after | after/before | before spread | after spread |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in report["rows"]:
        lines.append(f"| {row['row']} | {row['before']:,.1f} | {row['after']:,.1f} | "
                     f"{row['ratio']:.3f} | {row['before_spread'][0]:,.1f}-{row['before_spread'][1]:,.1f} | "
                     f"{row['after_spread'][0]:,.1f}-{row['after_spread'][1]:,.1f} |")
    lines += ["", ("Each row names its unit: microseconds per call and p50 milliseconds are "
                   "better lower, items_per_s higher.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the version before")
    parser.add_argument("--after", default=None, help="git revision after (default: the working tree)")
    parser.add_argument("--micro", type=int, default=5, help="micro-benchmark runs of each (5)")
    parser.add_argument("--rounds", type=int, default=3, help="bench runs of each (3)")
    parser.add_argument("--calls", type=int, default=100_000, help="pushes per micro run")
    parser.add_argument("--only", nargs="+", default=["chain", "ping-pong", "capacity"],
                        help="the bench's workloads (chain ping-pong capacity)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="pype-compare-trees-"))
    trees = {"before": worktree(args.before, scratch / "before")}
    trees["after"] = worktree(args.after, scratch / "after") if args.after else ROOT
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    try:
        key = f"client micro-benchmark: {args.calls:,} native one-item pushes (us per call)"
        for run in range(args.micro):
            for version in (("before", "after") if run % 2 == 0 else ("after", "before")):
                samples[version].setdefault(key, []).append(micro(trees[version], args.calls))
                for row, value in shard_micro(trees[version]).items():
                    samples[version].setdefault(row, []).append(value)
                print(version, key, samples[version][key][-1], flush=True)
        for run in range(args.rounds):
            for version in (("before", "after") if run % 2 == 0 else ("after", "before")):
                for row, value in bench_rows(trees[version], args.only).items():
                    samples[version].setdefault(row, []).append(value)
                print(version, "bench round", run + 1, "done", flush=True)
    finally:
        for version, tree in trees.items():
            if tree != ROOT:
                cleanup(tree)
    report = {"before": short(args.before), "after": short(args.after) if args.after else "working tree",
              "date": time.strftime("%Y-%m-%d"),
              "machine": f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}",
              "micro_runs": args.micro, "bench_runs": args.rounds, "rows": summary(samples),
              "samples": samples}
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compare-{report['date']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
