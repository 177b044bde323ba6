"""``mm-megatron``: one entry point, a dict of sub-commands.

Each sub-command module exposes ``register(subparsers)``; adding one means adding a line to
``COMMANDS``. Heavy imports (torch, megatron) happen inside the commands, so ``--help`` is fast.
``main`` first silences the dependencies' known-harmless start-up warnings
(``mm_megatron.runtime.startup_warnings``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command name -> module with ``register(subparsers)``
COMMANDS = {
    "model": "mm_megatron.commands.model_cmd",
    "data": "mm_megatron.commands.data_cmd",
    "train": "mm_megatron.commands.train_cmd",
    "convert": "mm_megatron.commands.convert_cmd",
    "bench": "mm_megatron.commands.bench_cmd",
    "plan": "mm_megatron.commands.plan_cmd",
    "launch": "mm_megatron.commands.launch_cmd",
    "generate": "mm_megatron.commands.generate_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-megatron", description="3D-parallel multimodal pretraining on megatron-core"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mm_megatron.runtime import startup_warnings

    startup_warnings.install()  # NOTE: before any command imports megatron-core
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as e:  # LayoutError is a ValueError
        # Bad input: one clear line, no traceback (set MM_MEGATRON_DEBUG=1 for one).
        import os

        if os.environ.get("MM_MEGATRON_DEBUG") == "1":
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mm-megatron {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
