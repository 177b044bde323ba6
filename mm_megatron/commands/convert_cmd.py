"""``mm-megatron convert hf-to-mcore|mcore-to-hf|verify|assemble|verify-parts``.

The library is ``mm_megatron.convert``; this file only parses arguments. Examples::

    mm-megatron convert hf-to-mcore --hf llava-1.5-7b-hf --out ckpt/llava7b --dtype bf16
    mm-megatron convert mcore-to-hf --ckpt ckpt/llava7b --out llava7b-hf
    mm-megatron convert verify --hf llava-1.5-7b-hf --ckpt ckpt/llava7b --tp 2 --pp 2
    mm-megatron convert assemble --vision clip-vit-large-patch14-336 --lm vicuna-7b-v1.5 \
        --out ckpt/llava7b-init --preset llava-1.5-7b --dtype bf16
    mm-megatron convert assemble --vision blip2-opt-2.7b --qformer-from blip2-opt-2.7b \
        --lm vicuna-7b-v1.5 --preset minigpt4 --out ckpt/minigpt4-init
    mm-megatron convert verify-parts --vision clip-vit-large-patch14-336 --lm vicuna-7b-v1.5 \
        --ckpt ckpt/llava7b-init --tp 2 --pp 2
    mm-megatron convert mcore-to-hf --ckpt runs/stage2/checkpoints --out parts --parts
"""

from __future__ import annotations

import argparse

_EPILOG = (
    "There is no 'reshard' command: checkpoints are megatron-core dist checkpoints, which load "
    "at any TP x PP layout (megatron reshards on load, vocab padding included)."
)


def feature_layers(text: str) -> int | list[int]:
    """`--vision-feature-layer`: "N" -> N, "N,M,..." -> [N, M, ...] (argparse type)."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a layer index or a comma-separated list of them"
        ) from None
    return layers[0] if len(layers) == 1 else layers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert checkpoints between HuggingFace LLaVA and mm_megatron (megatron-core)",
        description="Convert checkpoints between HuggingFace LLaVA and mm_megatron.",
        epilog=_EPILOG,
    )
    csub = p.add_subparsers(dest="convert_command", required=True)

    a = csub.add_parser(
        "hf-to-mcore",
        help="HF Llava, LlavaNext, LlavaOnevision or InternVL ForConditionalGeneration dir -> "
        "mm_megatron checkpoint dir",
        epilog=_EPILOG,
    )
    a.add_argument("--hf", required=True, help="HF checkpoint dir (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint dir")
    a.add_argument(
        "--spec",
        choices=["local", "te"],
        default="local",
        help="spec recorded for training (weights are spec-independent; default local)",
    )
    _dtype_option(
        a, "storage dtype (default: the HF tensors' dtype, which keeps round trips exact)"
    )
    _vocab_option(a, 64, "megatron pads the vocab to a multiple of this x TP (default 64)")
    _output_options(a)
    a.set_defaults(func=_hf_to_mcore)

    b = csub.add_parser(
        "mcore-to-hf", help="mm_megatron checkpoint dir -> HF LLaVA dir", epilog=_EPILOG
    )
    b.add_argument("--ckpt", required=True, help="mm_megatron checkpoint dir")
    b.add_argument("--out", required=True, help="output HF dir")
    _dtype_option(b, "output dtype (default: each tensor's dtype in the HF original)")
    b.add_argument("--iteration", default=None, help="'release' or a number (default: the latest)")
    b.add_argument(
        "--parts",
        action="store_true",
        help="write OUT/vision (HF vision model) and OUT/lm (HF causal LM + tokenizer) instead "
        "of one LlavaForConditionalGeneration",
    )
    _output_options(b)
    b.set_defaults(func=_mcore_to_hf)

    c = csub.add_parser(
        "verify",
        help="check a checkpoint against its HF original: config, weights, logits parity",
        epilog="Exit status 0 when every check passes, 1 otherwise.",
    )
    c.add_argument("--hf", required=True, help="HF checkpoint dir")
    c.add_argument("--ckpt", required=True, help="mm_megatron checkpoint dir")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the logits check")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel size for the logits check")
    c.add_argument(
        "--atol", type=float, default=None, help="max |logit difference| allowed (absolute)"
    )
    c.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="max |logit difference| as a fraction of the largest |logit| (default 1e-5)",
    )
    c.add_argument(
        "--no-logits",
        action="store_true",
        help="skip the logits check (it holds two fp32 copies of the model in memory)",
    )
    c.set_defaults(func=_verify)
    _register_assemble(csub)


def _register_assemble(csub) -> None:
    a = csub.add_parser(
        "assemble",
        help="HF vision tower + HF causal LM + fresh projector -> mm_megatron LLaVA checkpoint",
        description="Assemble a LLaVA checkpoint for stage-1 pretraining from an HF vision "
        "tower (CLIPVisionModel, CLIPModel, SiglipVisionModel, SiglipModel, Blip2VisionModel, or "
        "a BLIP-2/InstructBLIP model's vision half) and an HF causal LM "
        "(Llama, Mistral, Qwen2) with its tokenizer; the projector is freshly initialised.",
        epilog=_EPILOG,
    )
    a.add_argument("--vision", required=True, help="HF vision checkpoint dir")
    a.add_argument("--lm", required=True, help="HF causal-LM checkpoint dir (with tokenizer)")
    a.add_argument("--out", required=True, help="output checkpoint dir")
    a.add_argument(
        "--projector",
        default=None,
        help="projector type: mlp2x_gelu (default, or the preset's), linear, or any registered",
    )
    a.add_argument(
        "--vision-feature-layer",
        type=feature_layers,
        default=None,
        metavar="N[,N...]",
        help="HF vision_feature_layer: one layer, or several whose features are concatenated "
        "(--vision-feature-layer=-2,-5); default -2 for CLIP, -1 for SigLIP and BLIP-2, or the "
        "preset's",
    )
    a.add_argument("--image-token", default="<image>", help="image placeholder (default <image>)")
    a.add_argument("--spec", choices=["local", "te"], default="local", help="spec recorded")
    _dtype_option(a, "storage dtype (default: the parts' dtype; required when they differ)")
    a.add_argument(
        "--preset",
        default=None,
        help="take projector, freezing and init from this preset (its widths must match)",
    )
    a.add_argument("--seed", type=int, default=1234, help="projector init seed (default 1234)")
    _vocab_option(
        a,
        None,
        "megatron pads the vocab to a multiple of this x TP (default: the preset's, else 64)",
    )
    a.add_argument(
        "--qformer-from",
        default=None,
        metavar="DIR",
        help="BLIP-2/InstructBLIP checkpoint: its Q-Former + query tokens (+ language_projection "
        "when the widths match) become a 'qformer' projector (MiniGPT-4's init)",
    )
    _output_options(a)
    a.set_defaults(func=_assemble)

    v = csub.add_parser(
        "verify-parts",
        help="check an assembled checkpoint against its HF parts: vision features, LM logits",
        epilog="Exit status 0 when every check passes, 1 otherwise.",
    )
    v.add_argument("--vision", required=True, help="HF vision checkpoint dir")
    v.add_argument("--lm", required=True, help="HF causal-LM checkpoint dir")
    v.add_argument("--ckpt", required=True, help="mm_megatron checkpoint dir")
    v.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    v.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    v.add_argument("--atol", type=float, default=1e-4, help="max |difference| (default 1e-4)")
    v.set_defaults(func=_verify_parts)


def _output_options(parser) -> None:
    """``--force`` and ``--quiet``, which every writing sub-command has."""
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _dtype_option(parser, help: str) -> None:
    """``--dtype bf16|fp32|fp16`` (default None) with the sub-command's meaning."""
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None, help=help)


def _vocab_option(parser, default: int | None, help: str) -> None:
    """``--make-vocab-size-divisible-by N``."""
    parser.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=default, metavar="N", help=help
    )


def _iteration(value: str | None):
    if value is None or value == "release":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--iteration must be 'release' or a number, got {value!r}") from None


def _quiet_imports() -> None:
    """Keep the terminal to our progress bar and result (megatron/torch notices are not errors)."""
    import logging
    import warnings

    for msg in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*torch.distributed is disabled, unavailable or uninitialized.*",
        ".*deprecating ShardedTensor.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=msg)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    _quiet_imports()
    from mm_megatron.convert.hf_to_mcore import hf_to_mcore

    out = hf_to_mcore(
        args.hf,
        args.out,
        spec=args.spec,
        dtype=args.dtype,
        force=args.force,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    _quiet_imports()
    if args.parts:
        from mm_megatron.convert.export_parts import mcore_to_hf_parts as export
    else:
        from mm_megatron.convert.mcore_to_hf import mcore_to_hf as export

    out = export(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        force=args.force,
        iteration=_iteration(args.iteration),
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    _quiet_imports()
    from mm_megatron.convert.verify import format_table, verify

    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    checks = verify(
        args.hf,
        args.ckpt,
        tp=args.tp,
        pp=args.pp,
        atol=args.atol,
        rtol=args.rtol,
        logits=not args.no_logits,
    )
    print(format_table(checks))
    return 0 if all(c.ok for c in checks) else 1


def _assemble(args: argparse.Namespace) -> int:
    _quiet_imports()
    from mm_megatron.convert.assemble import assemble

    out = assemble(
        args.vision,
        args.lm,
        args.out,
        projector=args.projector,
        feature_layer=args.vision_feature_layer,
        image_token=args.image_token,
        spec=args.spec,
        dtype=args.dtype,
        preset=args.preset,
        seed=args.seed,
        force=args.force,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        qformer_from=args.qformer_from,
        progress=not args.quiet,
    )
    print(f"wrote {out}")
    return 0


def _verify_parts(args: argparse.Namespace) -> int:
    _quiet_imports()
    from mm_megatron.convert.verify import format_table
    from mm_megatron.convert.verify_parts import verify_parts

    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    checks = verify_parts(args.vision, args.lm, args.ckpt, tp=args.tp, pp=args.pp, atol=args.atol)
    print(format_table(checks))
    return 0 if all(c.ok for c in checks) else 1
