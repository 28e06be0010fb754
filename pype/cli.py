"""The `pype` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pype", description="Pype: queues between Ray processes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the seed's data-communication chain on an embedded local Ray",
        description="Start a local Ray and a Pype server, push items through the seed README's "
                    "chain of 6 locked stages, and print items/s and the per-shard spread.")
    demo.add_argument("--items", type=int, default=1000, help="items to send (default 1000)")
    demo.add_argument("--batch", action="store_true",
                      help="stages move everything available per call instead of one item")
    demo.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    demo.add_argument("--shards", type=int, help="number of shards (overrides the config)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
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


if __name__ == "__main__":
    sys.exit(main())
