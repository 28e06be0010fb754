"""The `pype` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    except (FileNotFoundError, ValueError) as error:  # bad config file or value: one clear line
        print(f"pype: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run_bench(bench_args: list[str]) -> int:
    """Run the checkout's bench package (it is not installed: it needs Redis, matplotlib...)."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "bench" / "run.py").is_file():
        print("pype: error: pype bench runs from a source checkout (pip install -e '.[bench]')",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(checkout))
    from bench.run import main as bench_main

    return bench_main(bench_args)


if __name__ == "__main__":
    sys.exit(main())
