"""Processors for the HF exports of tiled runs: LLaVA-NeXT, LLaVA-OneVision and InternVL.

What this file does: the ``HFFamily.build_processor`` builders that ``processor_files.
complete_export`` calls, through the family registry, for a run trained here whose config.json
is not plain LLaVA. Each takes ``(cfg, job, tokenizer_dir)`` and returns the family's
transformers processor, built from the run's own pre-processing:

- ``llava_next_processor``: ``LlavaNextProcessor`` + ``LlavaNextImageProcessorPil`` with the
  run's ``grid_pinpoints``, ``S x S`` tiles (S = ``vision.image_size``), bicubic resizes, black
  padding and the run's ``data.image_norm`` mean/std: the tiles of ``data/tiling_anyres.py``;
- ``onevision_processor``: ``LlavaOnevisionProcessor`` + ``LlavaOnevisionImageProcessorPil``, the
  same tiles, with ``vision_aspect_ratio = anyres_max_{tiling.max_grid_patches}``;
- ``internvl_processor``: ``InternVLProcessor`` + ``GotOcr2ImageProcessorPil`` with the run's
  min/max tiles, thumbnail, bicubic resizes and mean/std (the tiles of
  ``data/tiling_internvl.py``), ``image_seq_length`` the model's tokens per tile, and the run's
  tokenizer with InternVL's named tokens (``<img>``, ``</img>``, the run's placeholder as the
  context token). transformers writes ``<img>`` + context x N + ``</img>`` for an image, so it
  refuses (one line) a run not trained with ``model.tiling.image_markers = "<img> </img>"``, or
  whose tokenizer splits a marker into several tokens (training tokenized the markers as the
  tokenizer does; an added special token would change their ids).

Both anyres builders check, before returning, that the processor's image-token count equals the
model's ``ImageTokenCounter`` for images of several aspect ratios (the processor's
``patch_size``, ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` /
``num_image_tokens`` must express it); a mismatch raises ``ExportFilesError`` naming the size.

Note: ``LlavaOnevisionProcessor`` and ``InternVLProcessor`` hold a video processor, which
transformers builds only with ``torchvision`` installed; without it their builders refuse with a
one-line reason (so would ``AutoProcessor`` loading such an export). With ``torchvision``
installed, transformers loads image processors with its torchvision backend by default, whose
tiles differ from the training pixels (up to 0.24 after normalisation for anyres, 0.09 for
InternVL, measured in ``tests/unit/test_convert_export_processor_tiled.py``); the saved PIL
image processor, loaded with ``AutoImageProcessor.from_pretrained(export, backend="pil")``,
reproduces them.

What it does not do: write files (``complete_export`` saves what these return), tokenizers'
image token (``processor_files.run_tokenizer``), or the LLaVA-1.5 processor
(``processor_files.build_processor``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mm_megatron.config.presets_internvl import INTERNVL_MARKERS
from mm_megatron.convert.processor_files import (
    ExportFilesError,
    run_chat_template,
    run_tokenizer,
)

CHECK_ASPECTS = ((1, 1), (3, 5), (11, 4), (2, 7), (9, 2), (5, 4))
"""(height, width) ratios of the images the token-count check sizes at 3x the tile size."""


def anyres_image_processor_kwargs(cfg: Any, norm: str) -> dict[str, Any]:
    """LLaVA-NeXT / OneVision image-processor settings equal to our anyres tiles of ``cfg``."""
    from mm_megatron.data.image import NORMALIZATIONS

    s = cfg.vision.image_size
    mean, std = NORMALIZATIONS[norm]
    return {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": s, "width": s},  # the base tile: the whole image stretched
        "resample": 3,  # PIL bicubic, as data/tiling_anyres.py
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "image_grid_pinpoints": [[int(h), int(w)] for h, w in cfg.tiling.grid_pinpoints],
        "do_pad": True,  # pads the tile count across a batch only
    }


def _strategy(cfg: Any) -> tuple[str, int]:
    """(HF ``vision_feature_select_strategy``, extra tokens per tile) of ``cfg``'s tower."""
    v = cfg.vision
    return ("default" if v.has_class_token and v.drop_class_token else "full"), int(
        v.has_class_token
    )


def check_anyres_counts(processor: Any, cfg: Any) -> None:
    """ExportFilesError unless ``processor`` counts each image's tokens as the model does."""
    from mm_megatron.data.batch import ImageGeometry
    from mm_megatron.model.image_tokens import ImageTokenCounter

    counter = ImageTokenCounter.from_config(cfg)
    s = cfg.vision.image_size
    sizes = [(3 * s * h // max(h, w), 3 * s * w // max(h, w)) for h, w in CHECK_ASPECTS]
    sizes += [(int(h), int(w)) for h, w in cfg.tiling.grid_pinpoints]
    got = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    for hw, theirs in zip(sizes, got):
        geometry = ImageGeometry(num_tiles=counter.arrangement.num_tiles(hw), image_size=hw)
        ours = counter(geometry)
        if theirs != ours:
            raise ExportFilesError(
                f"{type(processor).__name__} counts {theirs} image tokens for a {hw[0]}x{hw[1]} "
                f"image, the model {ours}: the export could not reproduce the run's input"
            )


def llava_next_processor(cfg: Any, job: dict, tokenizer_dir: Path) -> Any:
    """The ``LlavaNextProcessor`` of an anyres run (``tiling.max_grid_patches == 0``)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    data = job.get("data") or {}
    kwargs = anyres_image_processor_kwargs(cfg, data.get("image_norm", "clip"))
    s = cfg.vision.image_size
    strategy, extra = _strategy(cfg)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(crop_size={"height": s, "width": s}, **kwargs),
        tokenizer=run_tokenizer(job, tokenizer_dir),
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        image_token=data.get("image_token") or "<image>",
        chat_template=run_chat_template(job),
    )
    check_anyres_counts(processor, cfg)
    return processor


def onevision_processor(cfg: Any, job: dict, tokenizer_dir: Path) -> Any:
    """The ``LlavaOnevisionProcessor`` of an anyres run with ``tiling.max_grid_patches`` set."""
    _need_torchvision("LlavaOnevisionProcessor (model.tiling.max_grid_patches is set)")
    from transformers import (
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    data = job.get("data") or {}
    kwargs = anyres_image_processor_kwargs(cfg, data.get("image_norm", "clip"))
    strategy, extra = _strategy(cfg)
    side = cfg.vision.image_size // cfg.vision.patch_size
    video = {k: kwargs[k] for k in ("size", "resample", "image_mean", "image_std")}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(**kwargs),
        tokenizer=run_tokenizer(job, tokenizer_dir),
        video_processor=LlavaOnevisionVideoProcessor(**video),
        num_image_tokens=side * side + extra,
        vision_feature_select_strategy=strategy,
        image_token=data.get("image_token") or "<image>",
        vision_aspect_ratio=f"anyres_max_{cfg.tiling.max_grid_patches}",
        chat_template=run_chat_template(job),
    )
    check_anyres_counts(processor, cfg)
    return processor


def internvl_processor(cfg: Any, job: dict, tokenizer_dir: Path) -> Any:
    """The ``InternVLProcessor`` of an InternVL run trained with ``<img> </img>`` markers."""
    markers = cfg.tiling.image_markers.split()
    if markers != INTERNVL_MARKERS.split():
        raise ExportFilesError(
            f"model.tiling.image_markers={cfg.tiling.image_markers!r}: transformers' "
            "InternVLProcessor puts every image between <img> and </img>, which this run's "
            "training input does not; export refused"
        )
    _need_torchvision("InternVLProcessor")
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor, InternVLVideoProcessor

    from mm_megatron.data.batch import ImageGeometry
    from mm_megatron.data.image import NORMALIZATIONS
    from mm_megatron.model.image_tokens import ImageTokenCounter

    data = job.get("data") or {}
    image_token = data.get("image_token") or "<image>"
    plain = run_tokenizer(job, tokenizer_dir)
    for text in markers:
        ids = plain.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ExportFilesError(
                f"the run's tokenizer ({tokenizer_dir}) splits {text!r} into {len(ids)} tokens; "
                "InternVLProcessor needs it as one special token, as InternVL's tokenizers "
                "have it: train with such a tokenizer to export an HF InternVL processor"
            )
    if not cfg.tiling.use_thumbnail:
        raise ExportFilesError(
            "model.tiling.use_thumbnail=false: transformers' InternVL image processor always "
            "adds the thumbnail; export refused"
        )
    named = {
        "start_image_token": markers[0],
        "end_image_token": markers[1],
        "context_image_token": image_token,
        "video_token": "<video>",
    }
    s = cfg.vision.image_size
    mean, std = NORMALIZATIONS[data.get("image_norm", "clip")]
    common = {"size": {"height": s, "width": s}, "image_mean": list(mean), "image_std": list(std)}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            crop_to_patches=True,
            min_patches=cfg.tiling.min_patches,
            max_patches=cfg.tiling.max_patches,
            resample=3,  # PIL bicubic, as data/tiling_internvl.py
            **common,
        ),
        tokenizer=run_tokenizer(job, tokenizer_dir, extra_special_tokens=named),
        video_processor=InternVLVideoProcessor(**common),
        image_seq_length=ImageTokenCounter.from_config(cfg)(ImageGeometry(num_tiles=1)),
        chat_template=run_chat_template(job),
    )


def _need_torchvision(what: str) -> None:
    """ExportFilesError (one line) unless torchvision, which ``what`` needs, is installed."""
    if importlib.util.find_spec("torchvision") is None:
        raise ExportFilesError(
            f"transformers' {what}, and AutoProcessor loading it, need torchvision for its "
            "video processor; pip install torchvision, then export again"
        )
