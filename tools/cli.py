"""The ``dsv4`` command. Each subcommand lives in its own module ``tools/cmd_*.py`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (returning an exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per command family; a new command adds its module here.
COMMANDS = ("cmd_info", "cmd_demo", "cmd_checkpoint", "cmd_export", "cmd_generate", "cmd_parity", "cmd_inspect",
            "cmd_compile", "cmd_lint", "cmd_bench")


def build_parser() -> argparse.ArgumentParser:
    import dsv4

    p = argparse.ArgumentParser(prog="dsv4", description="DeepSeek V4: checkpoint -> verified ONNX/TVM artifacts")
    p.add_argument("--version", action="version", version=f"dsv4 {dsv4.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"dsv4.tools.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dsv4.tools.{name}":
                continue  # command family not built yet
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from dsv4.models.files import DiskSpaceError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, DiskSpaceError) as e:  # user errors: one clear line, no traceback
        from rich.console import Console
        from rich.markup import escape

        # one line, never wrapped (soft_wrap), and the message's brackets ("dims ['batch', 1]") are not markup
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
