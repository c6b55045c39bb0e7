"""The `lkv` command line: thin layers over library functions, one module per subcommand in
`lkv_jax/commands/` (each defines `HELP`, `add_arguments(parser)` and `run(args)`).

A problem with the input (every `lkv_jax.errors.LkvError`, other ValueErrors of argument checks, OSErrors)
is printed as one line, `lkv <command>: error: <message>`, with exit status 2; only a bug shows its
traceback, and `--debug` shows it always."""

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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        # also after the subcommand; SUPPRESS keeps `lkv --debug X` from being reset to False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of every error")
        p.set_defaults(_run=module.run)
    return parser


def one_line(error: BaseException) -> str | None:
    """The one-line message for an error that is a problem with the user's input or files (LkvError,
    ValueError from argument checks, OSError, running out of device memory), None for a bug."""
    if isinstance(error, ValueError | OSError):
        text = str(error)
    elif type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(error):
        text = f"out of device memory: {str(error).splitlines()[0]}"
    else:
        return None
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        message = one_line(e)
        if message is None or args.debug:
            raise  # a bug, or asked for: the whole traceback
        print(f"lkv {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
