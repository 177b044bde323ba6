"""HF LLaVA-NeXT and LLaVA-OneVision <-> mm_megatron: config translation, tiny models, inputs.

``LlavaNextForConditionalGeneration`` (model_type ``llava_next``) and
``LlavaOnevisionForConditionalGeneration`` (``llava_onevision``) are LLaVA plus anyres: the same
vision tower, projector and language model keys as ``LlavaForConditionalGeneration``, one more
tensor (``model.image_newline [h]``, mapped in ``mapping.py``), and the tiling settings
(``image_grid_pinpoints``; OneVision's ``vision_aspect_ratio="anyres_max_N"``). So this module
only adds what differs, and registers both families with ``hf_config.register_hf_family``:

- :func:`tiling_from_hf`: HF config -> our ``TilingConfig`` (clear errors for what we lack;
  OneVision also sets ``multi_image_single_tile``, its one-tile-per-image rule for samples with
  several images);
- :func:`anyres_hf_config`: our anyres config -> an HF config dict (export with no original:
  OneVision when ``max_grid_patches`` and ``multi_image_single_tile`` are set, LLaVA-NeXT when
  neither is; one-line error for a mix HF has no class for);
- :func:`anyres_verify_inputs`: ``convert verify``'s batch for both models: images of three aspect
  ratios (so three tile grids), two images in one sample (one tile each under OneVision's rule,
  with HF's ``batch_num_images``), a text-only sample, right padding;
- :func:`tiny_anyres_model`: a random tiny HF model of either family (tests, walkthroughs).

What it does not do: the tensor mapping (``mapping.py``), streaming, or the CLI.
"""

from __future__ import annotations

import re

import torch

from mm_megatron.checkpoint.errors import UnsupportedModelError
from mm_megatron.config.model_config import LlavaConfig, TilingConfig
from mm_megatron.convert.hf_config import (
    HFFamily,
    register_hf_family,
    text_hf_config,
    vision_hf_config,
)
from mm_megatron.convert.processor_families import llava_next_processor, onevision_processor
from mm_megatron.data.batch import ImageGeometry
from mm_megatron.model.image_tokens import ImageTokenCounter

NEXT, ONEVISION = "llava_next", "llava_onevision"
_MAX = re.compile(r"^anyres_max_(\d+)$")


def tiling_from_hf(hf_cfg) -> TilingConfig:
    """``image_grid_pinpoints`` (+ OneVision's ``vision_aspect_ratio``) -> ``TilingConfig``."""
    pins = [[int(x) for x in p] for p in (hf_cfg.image_grid_pinpoints or [])]
    size = hf_cfg.vision_config.image_size
    if not pins or any(len(p) != 2 or p[0] % size or p[1] % size for p in pins):
        raise UnsupportedModelError(
            f"config.json image_grid_pinpoints={pins} must be (height, width) multiples of "
            f"vision_config.image_size={size}"
        )
    max_patches = 0
    if hf_cfg.model_type == ONEVISION:
        ratio = str(getattr(hf_cfg, "vision_aspect_ratio", "anyres_max_9"))
        m = _MAX.match(ratio)
        if not m:
            raise UnsupportedModelError(
                f"config.json vision_aspect_ratio={ratio!r} is unsupported (expected anyres_max_N)"
            )
        max_patches = int(m.group(1))
    return TilingConfig(
        type="anyres",
        grid_pinpoints=pins,
        max_grid_patches=max_patches,
        multi_image_single_tile=hf_cfg.model_type == ONEVISION,  # HF's batch_num_images rule
    )


def anyres_hf_config(cfg: LlavaConfig, dtype: str = "float32") -> dict:
    """A transformers LLaVA-NeXT / OneVision config dict for anyres model ``cfg``."""
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    t = cfg.tiling
    if bool(t.max_grid_patches) != t.multi_image_single_tile:
        raise UnsupportedModelError(
            f"model.tiling.max_grid_patches={t.max_grid_patches} with multi_image_single_tile="
            f"{t.multi_image_single_tile}: HF LLaVA-OneVision has both, LLaVA-NeXT neither"
        )
    v = cfg.vision
    strategy = "default" if v.has_class_token and v.drop_class_token else "full"
    kw = dict(
        vision_config=vision_hf_config(cfg),
        text_config=text_hf_config(cfg),
        image_token_index=cfg.image_token_id,
        projector_hidden_act=cfg.projector.activation,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
        image_grid_pinpoints=[list(p) for p in cfg.tiling.grid_pinpoints],
        multimodal_projector_bias=cfg.projector.bias,
        tie_word_embeddings=cfg.lm.tie_embeddings,
    )
    if cfg.tiling.max_grid_patches:
        hf = LlavaOnevisionConfig(
            vision_aspect_ratio=f"anyres_max_{cfg.tiling.max_grid_patches}", **kw
        )
        hf.architectures = [ONEVISION_ARCH]
    else:
        hf = LlavaNextConfig(image_seq_length=ImageTokenCounter.from_config(cfg)(), **kw)
        hf.architectures = [NEXT_ARCH]
    d = hf.to_dict()
    d["dtype"] = dtype
    return d


NEXT_ARCH = "LlavaNextForConditionalGeneration"
ONEVISION_ARCH = "LlavaOnevisionForConditionalGeneration"

# --- verify inputs and tiny models ---------------------------------------------------------

VERIFY_SIZES = [(60, 100), (110, 40), (64, 64)]
"""(height, width) of the verify images: wide, tall and square (three different grids)."""


def anyres_verify_inputs(hf_cfg, cfg: LlavaConfig, *, seed: int = 0) -> dict:
    """``convert verify``'s batch for an anyres model: ``ours``, ``hf`` and ``lengths``.

    Sample 0 has two images (wide, tall) at different positions, sample 1 is text-only, sample 2
    has one square image and is shorter (right padding). Pixels are random normal tiles; the
    image sizes are scaled to the tile size so every grid of the pinpoints can occur. Under
    ``tiling.multi_image_single_tile`` (OneVision) sample 0's images are one tile each, HF gets
    ``batch_num_images``, and a sample 3 holds the wide image alone, so its grid stays covered.

    Args:
        hf_cfg: The HF config (ids, vocab).
        cfg: Our config of the same model (tiling and count).
        seed: Seed of ids and pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    counter = ImageTokenCounter.from_config(cfg)
    arr = counter.arrangement
    scale = cfg.vision.image_size / 32
    sizes = [(round(h * scale), round(w * scale)) for h, w in VERIFY_SIZES]
    vocab = hf_cfg.text_config.vocab_size
    image = int(hf_cfg.image_token_index)
    pad = getattr(hf_cfg, "pad_token_id", None)
    pad = int(pad) if pad is not None and 0 <= int(pad) < vocab else 0

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(6, vocab, (n,), generator=gen)
        ids[(ids == image) | (ids == pad)] = 6
        return ids

    single_tile = cfg.tiling.multi_image_single_tile
    layouts = [([3, 20, 9], sizes[:2]), ([40], []), ([5, 7], sizes[2:])]
    if single_tile:
        layouts.append(([4, 11], sizes[:1]))
    rows, tokens, tiles = [], [], []
    for pieces, imgs in layouts:
        parts = []
        for i, n in enumerate(pieces):
            parts.append(text(n))
            if i < len(imgs):
                parts.append(torch.tensor([image]))
        rows.append(torch.cat(parts))
        for hw in imgs:
            t = 1 if single_tile and len(imgs) > 1 else arr.num_tiles(hw)
            tiles.append(t)
            tokens.append(counter(ImageGeometry(num_tiles=t, image_size=hw)))
    all_sizes = [hw for _, imgs in layouts for hw in imgs]
    s_img = cfg.vision.image_size
    pixels = [torch.randn(t, 3, s_img, s_img, generator=gen) for t in tiles]
    s = max(len(r) for r in rows)
    ours_ids = torch.full((len(rows), s), pad, dtype=torch.long)
    expanded, k = [], 0
    for i, row in enumerate(rows):
        ours_ids[i, : len(row)] = row
        parts = []
        for tok in row:
            if tok == image:
                parts.append(torch.full((tokens[k],), image))
                k += 1
            else:
                parts.append(tok.view(1))
        expanded.append(torch.cat(parts))
    lengths = [len(e) for e in expanded]
    hf_ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(hf_ids)
    for i, e in enumerate(expanded):
        hf_ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    stacked = torch.zeros(len(tiles), max(tiles), 3, s_img, s_img)  # HF: [n, max tiles, ...]
    for i, p in enumerate(pixels):
        stacked[i, : p.shape[0]] = p
    ours = dict(
        images=torch.cat(pixels),
        input_ids=ours_ids,
        num_images=torch.tensor([len(imgs) for _, imgs in layouts]),
        num_tiles=torch.tensor(tiles),
        image_tokens=torch.tensor(tokens),
        image_sizes=torch.tensor(all_sizes),
    )
    hf = dict(
        pixel_values=stacked,
        image_sizes=torch.tensor(all_sizes),
        input_ids=hf_ids,
        attention_mask=mask,
    )
    if single_tile:  # transformers' OneVision tiles only the images that are alone in a sample
        hf["batch_num_images"] = torch.tensor([len(imgs) for _, imgs in layouts if imgs])
    return {"ours": ours, "hf": hf, "lengths": lengths}


TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
"""Pinpoints of the tiny models (32 px tiles): up to 2x2, 1x3 and 3x1 grids."""


def tiny_anyres_config(family: str = NEXT):
    """A transformers LLaVA-NeXT (CLIP + Llama) or OneVision (SigLIP + Qwen2) config, tiny."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from mm_megatron.convert.tiny_models import TINY_TEXT, TINY_VISION

    vkw = dict(TINY_VISION)
    tkw = {**TINY_TEXT, "max_position_embeddings": 512}
    if family == NEXT:
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(projection_dim=16, **vkw),
            text_config=LlamaConfig(vocab_size=100, **tkw),
            image_token_index=5,
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=16,
        )
    if family == ONEVISION:
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **vkw),
            text_config=Qwen2Config(vocab_size=120, rope_theta=1e6, **tkw),
            image_token_index=5,
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_2",  # a 2x2 grid (64 features) shrinks to 2 tiles
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown family {family!r}; known: {NEXT}, {ONEVISION}")


def tiny_anyres_model(family: str = NEXT, seed: int = 0):
    """The tiny model of ``family`` with random weights (norms, biases, newline perturbed)."""
    import transformers

    torch.manual_seed(seed)
    arch = NEXT_ARCH if family == NEXT else ONEVISION_ARCH
    model = getattr(transformers, arch)(tiny_anyres_config(family)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


for _type, _arch, _config, _capped, _processor in (
    (NEXT, NEXT_ARCH, "LlavaNextConfig", False, llava_next_processor),
    (ONEVISION, ONEVISION_ARCH, "LlavaOnevisionConfig", True, onevision_processor),
):
    register_hf_family(
        _type,
        HFFamily(
            _arch,
            _config,
            exports=lambda cfg, capped=_capped: (
                cfg.tiling.type == "anyres" and bool(cfg.tiling.max_grid_patches) == capped
            ),
            to_hf=anyres_hf_config,
            tiling=tiling_from_hf,
            verify_inputs=anyres_verify_inputs,
            build_processor=_processor,
        ),
    )
