"""``mm-megatron data synth|convert`` (implemented in ``mm_megatron.data``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make webdataset shards (synthetic or from LLaVA JSON)")
    p.add_argument("data_command", choices=["synth", "convert"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the data command")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from mm_megatron.data import synthetic

        return int(synthetic.main(args.rest) or 0)
    from mm_megatron.data import llava_json

    return int(llava_json.main(args.rest) or 0)
