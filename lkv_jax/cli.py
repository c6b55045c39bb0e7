"""The `lkv` command line: thin layers over library functions, one module per subcommand in
`lkv_jax/commands/` (each defines `HELP`, `add_arguments(parser)` and `run(args)`)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in lkv_jax.commands
COMMANDS = {
    "convert": "convert",
    "generate": "generate",
    "make-labels": "make_labels",
    "train": "train",
    "eval": "evaluate",
}


def _load(name: str):
    return importlib.import_module(f"lkv_jax.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkv", description="LookaheadKV and KV-cache eviction in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as e:
            if e.name != f"lkv_jax.commands.{COMMANDS[name]}":
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"lkv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
