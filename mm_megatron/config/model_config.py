"""Model configuration: small dataclasses for the vision encoder, projector and language model.

These describe *what* the model is (shapes, activations, norms); they know nothing about parallel
layout. ``mm_megatron.model.transformer_configs`` turns them into megatron-core
``TransformerConfig`` objects once a layout is chosen. Every field has a docstring line. Reading
them from dicts and overrides is ``mm_megatron.config.fields`` (shared with the job config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mm_megatron.config.fields import from_dict
from mm_megatron.config.hires_config import HighResConfig
from mm_megatron.config.qformer_config import QFormerConfig
from mm_megatron.config.resampler_config import ResamplerConfig
from mm_megatron.config.vit_styles import VIT_STYLES, vit_style

SPECS = ("local", "te")

PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu")
"""Activations an MLP projector may use, by their HF ``projector_hidden_act`` names."""


@dataclass
class VisionConfig:
    """A ViT image encoder in the style of CLIP or SigLIP."""

    style: str = "clip"
    """A registered encoder style (``mm_megatron.model.vision.VISION_ENCODERS``): ``clip``
    (class token, patch conv w/o bias, pre-LN, quick_gelu), ``siglip`` (no class token, conv
    bias, gelu-tanh, post-LN), ``blip2`` (BLIP-2's EVA ViT-g: class token, conv bias, no pre-LN,
    post-LN, exact GELU, no key bias), or one an architecture module adds; the choices are the
    table in ``mm_megatron.config.vit_styles``."""
    image_size: int = 336
    """Square input resolution in pixels."""
    patch_size: int = 14
    """Patch (conv kernel and stride) size."""
    num_channels: int = 3
    """Input channels."""
    num_layers: int = 24
    """Layers of the full encoder as published (e.g. 24 for CLIP-L); see ``feature_layer``."""
    feature_layer: int | list[int] = -2
    """HF ``vision_feature_layer``: -1 uses the last layer's output; -2 the one before, so the
    last layer is never built (LLaVA-1.5). Positive values count from the embeddings (0). A list
    selects several layers, whose features are concatenated (in list order) before the
    projector, which then sees ``feature_width`` = ``len(list) * hidden_size`` channels."""
    hidden_size: int = 1024
    """Transformer width."""
    ffn_hidden_size: int = 4096
    """MLP inner width."""
    num_attention_heads: int = 16
    """Attention heads (must divide by TP)."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    drop_class_token: bool = True
    """Drop the class token from the features (HF ``vision_feature_select_strategy="default"``)."""
    post_layernorm: bool | None = None
    """Apply the final LayerNorm to the features; None means the style default (SigLIP and
    BLIP-2: yes, CLIP: no). HF LLaVA reads hidden states before it, so its converters set False;
    BLIP-2 feeds the Q-Former ``last_hidden_state``, which has it."""
    spec: str = "local"
    """``local`` (PyTorch + our SDPA attention) or ``te`` (Transformer Engine)."""
    norm: str = "LayerNorm"
    """Norm of the encoder layers: ``LayerNorm`` or ``RMSNorm`` (InternViT-6B)."""
    activation: str | None = None
    """MLP activation, an HF ``hidden_act`` name; None: the style's own (CLIP quick_gelu,
    SigLIP gelu_pytorch_tanh, InternViT and BLIP-2 gelu)."""
    qkv_bias: bool = True
    """Bias on the QKV projection (HF InternViT ``attention_bias``)."""
    qk_norm: bool = False
    """RMSNorm over the full query and key widths (InternViT-6B ``use_qk_norm``)."""
    layer_scale_init: float | None = None
    """Per-channel layer scale on both residual branches (InternViT ``lambda_1``/``lambda_2``)
    with this initial value; None: no layer scale."""
    hires: HighResConfig = field(default_factory=HighResConfig)
    """A high-resolution second tower (MGM's ConvNeXt, ``style="mgm"``); ``type="none"``
    otherwise. The fields above then describe its low-resolution ViT."""

    @property
    def vit_style(self) -> str:
        """Style of the transformer itself: ``style``, or a dual encoder's ``hires.vit_style``."""
        return self.hires.vit_style if self.hires.enabled else self.style

    @property
    def input_image_size(self) -> int:
        """Square size of the images the data pipeline delivers (a dual encoder's high
        resolution; the model derives the ViT's ``image_size`` from it)."""
        return self.hires.image_size if self.hires.enabled else self.image_size

    @property
    def has_class_token(self) -> bool:
        """CLIP, InternViT and BLIP-2 prepend a learned class token; SigLIP does not."""
        return vit_style(self.vit_style).class_token

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """``feature_layer`` as indices into HF's ``hidden_states`` (0 = the embeddings)."""
        layers = self.feature_layer
        if not isinstance(layers, list):
            layers = [layers]
        return tuple(x + self.num_layers + 1 if x < 0 else x for x in layers)

    @property
    def num_layers_built(self) -> int:
        """Layers actually built: up to the deepest one ``feature_layer`` reads from."""
        return max(self.feature_layers)

    @property
    def feature_width(self) -> int:
        """Channels of the features the projector receives (concatenated feature layers)."""
        return self.hidden_size * len(self.feature_layers)

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Learned position embeddings (patches plus the class token, if any)."""
        return self.num_patches + (1 if self.has_class_token else 0)

    @property
    def num_output_tokens(self) -> int:
        """Tokens per image the encoder hands to the projector (a dual encoder's low-resolution
        crops each give a ViT pass's tokens)."""
        keep_cls = self.has_class_token and not self.drop_class_token
        passes = self.hires.low_res_images if self.hires.enabled else 1
        return passes * (self.num_patches + (1 if keep_cls else 0))

    @property
    def apply_post_layernorm(self) -> bool:
        """Whether the final LayerNorm runs."""
        if self.post_layernorm is None:
            return vit_style(self.vit_style).post_layernorm
        return self.post_layernorm

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.vit_style not in VIT_STYLES:
            raise ValueError(
                f"vision.style={self.style!r} with vision.hires.type={self.hires.type!r}: the "
                f"ViT must be one of {sorted(VIT_STYLES)} (a dual-encoder style needs "
                "vision.hires.type set, e.g. convnext)"
            )
        if self.norm not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"vision.norm must be 'LayerNorm' or 'RMSNorm', got {self.norm!r}")
        if self.activation is not None and self.activation not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"vision.activation={self.activation!r}; choose one of {PROJECTOR_ACTIVATIONS}"
            )
        # The patch conv drops a remainder (SigLIP so400m/14 at 384 px: 27x27 patches).
        if self.image_size < self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} is smaller than "
                f"vision.patch_size={self.patch_size}"
            )
        if isinstance(self.feature_layer, list) and not self.feature_layer:
            raise ValueError("vision.feature_layer=[] selects no layer")
        if not 1 <= self.num_layers_built <= self.num_layers or min(self.feature_layers) < 0:
            raise ValueError(
                f"vision.feature_layer={self.feature_layer} selects no valid layer of "
                f"{self.num_layers}"
            )
        if isinstance(self.feature_layer, list) and self.apply_post_layernorm:
            raise ValueError(
                f"vision.feature_layer={self.feature_layer} (several layers) with the final "
                "LayerNorm on: set vision.post_layernorm=false (HF applies it to no listed layer)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision.hidden_size={self.hidden_size} not divisible by "
                f"vision.num_attention_heads={self.num_attention_heads}"
            )
        _check_spec("vision.spec", self.spec)
        self.hires.validate(self.image_size // self.patch_size)


@dataclass
class ProjectorConfig:
    """Maps vision features into the language model's embedding space."""

    type: str = "mlp2x_gelu"
    """A name in ``mm_megatron.model.projector.PROJECTORS`` (``mlp2x_gelu``, ``linear``, ...)."""
    hidden_size: int | None = None
    """Inner width of MLP projectors; None means the language model's hidden size."""
    bias: bool = True
    """Linear layers carry a bias."""
    spec: str = "local"
    """``local`` or ``te`` linear layers."""
    activation: str = "gelu"
    """Activation between the MLP's two layers, an HF ``projector_hidden_act`` name (one of
    ``PROJECTOR_ACTIVATIONS``; ``gelu`` is LLaVA-1.5's)."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """Shape of the ``qformer`` connector (BLIP-2 / MiniGPT-4); read only by that type."""
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    """Shape of the ``resampler`` connector (MiniCPM-V); read only by that type."""
    pixel_shuffle_ratio: float = 0.5
    """``pixel_shuffle_mlp`` only: HF ``downsample_ratio``, 1/k folds k x k patches into one."""
    layernorm_eps: float = 1e-5
    """Epsilon of a projector's own LayerNorm (``pixel_shuffle_mlp``; torch's default)."""

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        _check_spec("projector.spec", self.spec)
        self.qformer.validate()
        if self.qformer.activation not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"projector.qformer.activation={self.qformer.activation!r}; choose one of "
                f"{PROJECTOR_ACTIVATIONS}"
            )
        if self.activation not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"projector.activation={self.activation!r}; choose one of {PROJECTOR_ACTIVATIONS}"
            )
        self.resampler.validate()

    def tp_problems(self, tp: int, lm_hidden: int) -> list[str]:
        """Why this projector's own heads and widths cannot split over TP=`tp` ([] if they can).

        Args:
            tp: Tensor-parallel size.
            lm_hidden: The LM width (the default width of MLP projectors and the resampler).
        """
        width = self.hidden_size or lm_hidden
        sizes = [("projector hidden size", width)]
        if self.type == "qformer":
            q = self.qformer
            sizes += [
                ("projector.qformer.num_attention_heads", q.num_attention_heads),
                ("projector.qformer.intermediate_size", q.intermediate_size),
            ]
        elif self.type == "resampler":
            sizes.append(("projector.resampler.num_heads", self.resampler.heads(width)))
        return [f"{name}={size} is not divisible by TP={tp}" for name, size in sizes if size % tp]


@dataclass
class TilingConfig:
    """How the data pipeline cuts one image into encoder tiles (``mm_megatron.data.tiling``)."""

    type: str = "none"
    """A name in ``mm_megatron.data.tiling.TILERS``; ``none`` makes every image one square tile
    (``data.image_aspect`` decides how it is squared)."""
    max_slice_nums: int = 9
    """``minicpm_slice``: most slices per image, besides the downscaled source image."""
    scale_resolution: int = 448
    """``minicpm_slice``: a slice (and the source image) aims at this side squared in pixels."""
    slice_patch_size: int = 14
    """``minicpm_slice``: slice and source sides are multiples of this (the ViT patch)."""
    slice_markers: str = "<im_start> <im_end> <slice> </slice>"
    """``minicpm_slice``: tile start, tile end, slices start and slices end tokens that go into
    the text around the placeholders, space-separated (MiniCPM-V's tokenizer: ``<image>
    </image> <slice> </slice>``, with ``<unk>`` as ``data.image_token``)."""
    min_patches: int = 1
    """``internvl_dynamic``: fewest grid tiles (HF ``min_patches``; the thumbnail not counted)."""
    max_patches: int = 12
    """``internvl_dynamic``: most grid tiles (HF ``max_patches``); 1 means one resized tile."""
    use_thumbnail: bool = True
    """``internvl_dynamic``: append the whole image as a last tile when the grid has several."""
    image_markers: str = ""
    """``internvl_dynamic``: the text put before and after each image's tokens, space-separated
    (InternVL's ``<img> </img>``, which its checkpoints were trained with and transformers'
    ``InternVLProcessor`` writes); empty: none."""
    grid_pinpoints: list[list[int]] = field(default_factory=list)
    """anyres: candidate (height, width) resolutions in pixels, multiples of
    ``vision.image_size`` (HF ``image_grid_pinpoints``)."""
    max_grid_patches: int = 0
    """anyres: OneVision's ``anyres_max_N`` (the grid's feature budget in tiles; bilinear
    down-scaling above ~1.1x it); 0 = LLaVA-NeXT (no limit)."""
    multi_image_single_tile: bool = False
    """In a sample with more than one image, make every image one tile (padded to a square with
    the mean colour, resized) instead of tiling it: LLaVA-OneVision's rule (HF
    ``batch_num_images``); False = LLaVA-NeXT (every image tiled)."""


@dataclass
class LanguageConfig:
    """A decoder-only LM in the Llama family (Llama, Vicuna, Mistral, Qwen2)."""

    flavor: str = "llama"
    """Informational family name: llama, vicuna, mistral or qwen2."""
    num_layers: int = 32
    """Decoder layers."""
    hidden_size: int = 4096
    """Model width."""
    ffn_hidden_size: int = 11008
    """SwiGLU inner width."""
    num_attention_heads: int = 32
    """Query heads."""
    num_query_groups: int | None = None
    """KV heads for GQA; None means MHA (= num_attention_heads)."""
    vocab_size: int = 32064
    """Real vocabulary size (HF ``vocab_size``); megatron pads it, see below."""
    make_vocab_size_divisible_by: int = 64
    """Megatron pads the vocab to a multiple of this x TP."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is configured for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """HF-style rope scaling: ``{"rope_type": "linear", "factor": f}`` or
    ``{"rope_type": "llama3", "factor": f, ...}``; None for plain RoPE."""
    qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    spec: str = "local"
    """``local`` or ``te``."""

    @property
    def kv_groups(self) -> int:
        """Number of KV heads."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab size after megatron's padding to ``make_vocab_size_divisible_by * tp``."""
        m = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // m) * m

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"lm.hidden_size={self.hidden_size} not divisible by "
                f"lm.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.kv_groups:
            raise ValueError(
                f"lm.num_attention_heads={self.num_attention_heads} not divisible by "
                f"lm.num_query_groups={self.kv_groups}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3"):
                raise ValueError(
                    f"lm.rope_scaling type {kind!r} is not supported (use 'linear' or 'llama3')"
                )
        _check_spec("lm.spec", self.spec)


@dataclass
class LlavaConfig:
    """The whole model: vision encoder -> projector -> language model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    """The image encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The vision -> LM projector."""
    lm: LanguageConfig = field(default_factory=LanguageConfig)
    """The language model."""
    tiling: TilingConfig = field(default_factory=TilingConfig)
    """How images are cut into encoder tiles."""
    image_token_id: int = 32000
    """Placeholder token id that marks one image in ``input_ids`` (llava-hf: 32000)."""
    freeze_vision: bool = True
    """Keep the vision encoder's weights fixed."""
    freeze_projector: bool = False
    """Keep the projector's weights fixed."""
    freeze_lm: bool = False
    """Keep the language model's weights fixed."""
    init_method_std: float = 0.02
    """Std of the normal init for fresh weights."""

    def set_spec(self, spec: str) -> None:
        """Use ``spec`` (local or te) for every component."""
        _check_spec("spec", spec)
        self.vision.spec = self.projector.spec = self.lm.spec = spec

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        self.vision.validate()
        self.projector.validate()
        self.lm.validate()
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} outside vocab of {self.lm.vocab_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ValueError naming them."""
        return from_dict(cls, d, "model")


def _check_spec(name: str, value: str) -> None:
    if value not in SPECS:
        raise ValueError(f"{name} must be one of {SPECS}, got {value!r}")
