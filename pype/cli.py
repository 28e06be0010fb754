"""The `pype` command."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from pype.errors import PypeError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options, parsed by bench/run.py
        return run_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="pype", description="Pype: queues between Ray processes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the seed's data-communication chain (or a video split) on a local Ray",
        description="chain (default): start a local Ray and a Pype server, push items through the "
                    "seed README's chain of 6 locked stages, and print items/s and the per-shard "
                    "spread. video: stream a clip through a VideoServer, split it across edge-"
                    "detection workers, print fps per worker count and write a contact sheet.")
    demo.add_argument("which", nargs="?", choices=("chain", "video"), default="chain")
    demo.add_argument("--items", type=int, default=1000, help="chain: items to send (default 1000)")
    demo.add_argument("--batch", action="store_true",
                      help="stages move everything available per call instead of one item")
    demo.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    demo.add_argument("--shards", type=int, help="number of shards (overrides the config)")
    demo.add_argument("--file", help="video: a video file (default: a synthetic 720p clip)")
    demo.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                      help="video: worker counts to run (default 1 2)")
    demo.add_argument("--frames", type=int, default=120, help="video: frames of the synthetic clip")
    demo.add_argument("--out", default="pype-video-demo.png", help="video: contact sheet PNG")

    commands.add_parser("bench", help="benchmark Pype against its peers (bench/ of a checkout; "
                                      "see pype bench --help)")

    serve = commands.add_parser(
        "serve", help="start a detached, named server on a running Ray cluster and return",
        description="Start a named Pype server (router and shards) on the Ray cluster at "
                    "--address. It keeps running after this command returns, until "
                    "`pype shutdown`. Attach with pype.connect(name, namespace).")
    serve.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    serve.add_argument("--shards", type=int, help="number of shards (overrides the config)")
    serve.add_argument("--replicas", type=int,
                       help="copies of each shard, on distinct nodes (overrides the config)")
    serve.add_argument("--min-insync", type=int, dest="min_insync",
                       help="replicas that hold a change before it is acknowledged")
    redrive = commands.add_parser(
        "redrive", help="move the items of one queue to another (dead letters back to work)",
        description="Move the items of queue SOURCE to queue DESTINATION, in order, exactly "
                    "once (Server.move): for example a dead-letter queue's items back to the "
                    "queue they came from.")
    redrive.add_argument("source")
    redrive.add_argument("destination")
    redrive.add_argument("--count", type=int, default=-1, help="items to move (default: all)")
    for command in (serve, redrive, *(commands.add_parser(name, help=text, description=text) for name, text in (
            ("connect", "connect to a running server and show where its shards run"),
            ("stats", "show a server's queues: depth, leases, push and pull rates, shard, node"),
            ("shutdown", "stop a running server: its shards and router, and their queues"),
            ("scale", "resize a running server to --shards shards while it serves")))):
        command.add_argument("--address", default="auto",
                             help="the Ray cluster (default auto: the one this machine belongs to)")
        command.add_argument("--name", default="pype", help="the server's name (default pype)")
        command.add_argument("--namespace", default=None, help="its Ray namespace (default pype)")
    commands.choices["scale"].add_argument("--shards", type=int, required=True,
                                           help="the number of shards to have")
    stats = commands.choices["stats"]
    stats.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    stats.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")

    config = commands.add_parser(
        "config", help="validate a config file and print the resolved configuration",
        description="Read configs/default.yaml, then FILE over it, validate every value and "
                    "print the result. Exit status 2 if it is invalid.")
    config.add_argument("file", nargs="?", help="YAML config file (default: only the defaults)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo" and args.which == "video":
            from pype import video_demo

            try:
                import cv2  # noqa: F401
            except ImportError:
                print("pype: error: pype demo video needs OpenCV: pip install -e '.[video]'",
                      file=sys.stderr)
                return 2
            if min(args.workers) < 1 or args.frames < 8:
                parser.error("--workers must be >= 1 and --frames >= 8")
            return video_demo.main(args.file, args.workers, args.frames, args.out)
        if args.command == "demo":
            from pype import demo as demo_module

            if args.items < 1:
                parser.error("--items must be at least 1")
            return demo_module.main(args.items, args.batch, args.config, args.shards)
        return operate(args, parser)
    except (FileNotFoundError, ValueError) as error:  # bad config file or value: one clear line
        print(f"pype: error: {error}", file=sys.stderr)
        return 2
    except (ConnectionError, PypeError) as error:  # no cluster, no such server, ...
        print(f"pype: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def operate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The operator's commands: serve, connect, stats, scale, redrive, shutdown, config."""
    from rich.console import Console
    from rich.live import Live

    from pype import operations

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: never cut columns
    if args.command == "config":
        console.print(operations.show_config(args.file), markup=False, highlight=False)
        return 0
    if args.command == "serve":
        if args.shards is not None and args.shards < 1:
            parser.error("--shards must be at least 1")
        overrides = {key: value for key in ("shards", "replicas", "min_insync")
                     if (value := getattr(args, key)) is not None}
        console.print(operations.serve(args.config, args.address, args.name, args.namespace,
                                       **overrides))
    elif args.command == "connect":
        console.print(operations.describe(args.address, args.name, args.namespace))
    elif args.command == "redrive":
        console.print(operations.redrive(args.address, args.name, args.namespace, args.source,
                                         args.destination, args.count), markup=False)
    elif args.command == "shutdown":
        console.print(operations.shutdown(args.address, args.name, args.namespace))
    elif args.command == "scale":
        if args.shards < 1:
            parser.error("--shards must be at least 1")
        console.print(operations.scale(args.address, args.name, args.namespace, args.shards))
    elif args.command == "stats":
        view = operations.StatsView(operations.attached(args.address, args.name, args.namespace))
        if not args.watch:
            console.print(view.render())
            return 0
        try:
            if console.is_terminal:
                with Live(view.render(), console=console, auto_refresh=False) as live:
                    while True:
                        time.sleep(args.interval)
                        live.update(view.render(), refresh=True)
            else:  # piped (a log, a test): Live would show only the last view, at exit
                while True:
                    console.print(view.render())
                    console.file.flush()
                    time.sleep(args.interval)
        except KeyboardInterrupt:  # the way to leave --watch: not an error
            pass
    return 0


def run_bench(bench_args: list[str]) -> int:
    """Run `python -m bench` in the source checkout this package was installed from.

    bench/ is not part of the installed package (it needs Redis, matplotlib and the
    seed's example scripts), so an installed copy of Pype says so in one line.
    """
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "run.py").is_file():
        print("pype: error: pype bench needs a source checkout of Pype "
              "(git clone, then pip install -e '.[bench]' there)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *bench_args], cwd=checkout)


if __name__ == "__main__":
    sys.exit(main())
