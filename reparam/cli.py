"""The `reparam` command."""

from __future__ import annotations

import argparse

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reparam", description="Fuse re-parameterizable networks into plain convs.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fuse a RepVGG-A0-style net and print a before/after table")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(demo.run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
