"""Tiny random-weight HF checkpoints (LLaVA, and separate vision/LM parts) and matching inputs.

Product code: ``convert verify`` builds its inputs with :func:`make_inputs`, and the README's
walkthroughs make their CPU-sized models with :func:`save_tiny_hf`, :func:`save_tiny_vision` and
:func:`save_tiny_lm`; the tests use the same.

Everything is built with transformers' own classes (``LlavaForConditionalGeneration``,
``LlavaProcessor`` with a ``tokenizers`` WordLevel tokenizer and a CLIP image processor) and saved
with ``save_pretrained``: no download. Variants cover what the converters must handle: GQA Llama
(untied, vocab padded even at TP1), Qwen2 (qkv bias, tied embeddings, rope theta 1e6), Mistral,
SigLIP with ``vision_feature_select_strategy="full"``, Llama with llama3 RoPE scaling.

:func:`make_inputs` builds one batch two ways: transformers 5.x expects ``input_ids`` already
expanded to ``image_seq_length`` image tokens per image; our model takes one placeholder per image
and expands it itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mm_megatron.checkpoint.safetensors_io import SafetensorsWriter, read_header, read_tensor
from mm_megatron.convert.keys import KeySpelling

VARIANTS = ("llama", "qwen2", "mistral", "siglip", "llama3rope")


TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
"""Vision tower of the tiny random models (CLIP/SigLIP config arguments)."""

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
"""Language model of the tiny random models (Llama/Qwen2/Mistral config arguments)."""


def tiny_hf_config(variant: str = "llama"):
    """A transformers ``LlavaConfig`` for a model of a few hundred thousand parameters."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    vkw = dict(TINY_VISION)
    tkw = dict(TINY_TEXT)
    strategy, layer, image_token = "default", -2, 5
    if variant == "siglip":
        vision = SiglipVisionConfig(**vkw)
        strategy, layer = "full", -1
    else:
        vision = CLIPVisionConfig(projection_dim=16, **vkw)
    if variant == "qwen2":
        text = Qwen2Config(vocab_size=120, rope_theta=1e6, tie_word_embeddings=True, **tkw)
    elif variant == "mistral":
        text = MistralConfig(vocab_size=100, sliding_window=None, **tkw)
        layer = [-1, 0, -2]  # several feature layers, out of order, the embeddings included
    elif variant == "llama3rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        tkw["max_position_embeddings"] = 16384
        text = LlamaConfig(vocab_size=100, rope_parameters=rope, **tkw)
    else:
        text = LlamaConfig(vocab_size=100, **tkw)
    patches = (vkw["image_size"] // vkw["patch_size"]) ** 2
    seq = patches + (1 if variant != "siglip" and strategy == "full" else 0)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=seq,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=variant == "qwen2",
    )


def tiny_hf_model(variant: str = "llama", seed: int = 0):
    """``LlavaForConditionalGeneration`` with random weights (norms and biases perturbed too)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_hf_config(variant)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_tokenizer(size: int, specials: dict[int, str], **special_kwargs):
    """A WordLevel ``PreTrainedTokenizerFast`` of ``size`` tokens.

    The top ids spell the synthetic dataset's words, so ``mm-megatron train`` on the generated
    data with this tokenizer sees no unknown tokens; ids in ``specials`` carry those names, the
    rest are placeholder words ``w<id>``.

    Args:
        size: vocabulary size.
        specials: ``{id: token}`` (e.g. ``{0: "<unk>", 1: "<s>"}``).
        special_kwargs: passed to the tokenizer (``unk_token="<unk>"``, ...).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mm_megatron.data.synthetic import vocabulary_words

    words = vocabulary_words()
    first_word = size - len(words)
    assert first_word > max(specials), "tiny vocabulary too small for the synthetic words"
    vocab = {specials.get(i, f"w{i}"): i for i in range(first_word)}
    vocab.update({w: first_word + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_kwargs)


def _image_processor_class():
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    return ImageProcessor


def tiny_processor(hf_cfg):
    """A ``LlavaProcessor`` (WordLevel tokenizer + CLIP image processor) matching ``hf_cfg``."""
    from transformers import LlavaProcessor

    image_token = hf_cfg.image_token_index
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>", image_token: "<image>"}
    tokenizer = tiny_tokenizer(
        hf_cfg.text_config.vocab_size,
        specials,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    size = hf_cfg.vision_config.image_size
    image_processor = _image_processor_class()(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    strategy = hf_cfg.vision_feature_select_strategy
    has_cls = hf_cfg.vision_config.model_type == "clip_vision_model"
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=hf_cfg.vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        image_token="<image>",
        num_additional_image_tokens=1 if has_cls else 0,
    )


def save_tiny_hf(
    out_dir: Path,
    variant: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    spelling: KeySpelling | None = None,
):
    """Save a tiny model + processor with ``save_pretrained``; returns the model (fp32, eval).

    Args:
        out_dir: directory to create.
        variant: one of :data:`VARIANTS`.
        seed: weight seed.
        dtype: dtype of the saved weights.
        max_shard_size: e.g. ``"200KB"`` for a sharded checkpoint with an index file.
        spelling: rewrite the keys into this spelling afterwards (default: as saved).
    """
    model = tiny_hf_model(variant, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, **kwargs)
    model.float()
    tiny_processor(model.config).save_pretrained(out_dir)
    if spelling is not None:
        respell(Path(out_dir), spelling)
    return model


def respell(hf_dir: Path, spelling: KeySpelling) -> None:
    """Rewrite an HF dir's safetensors keys (saved in transformers' spelling) into ``spelling``."""
    from mm_megatron.convert.keys import detect_spelling

    index = hf_dir / "model.safetensors.index.json"
    files = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    rename = {}
    for fname in files:
        infos, _ = read_header(hf_dir / fname)
        current = detect_spelling(infos)
        tensors = {k: read_tensor(v) for k, v in infos.items()}
        new = {spelling.to_file(current.to_canonical(k)): t for k, t in tensors.items()}
        rename.update({k: spelling.to_file(current.to_canonical(k)) for k in tensors})
        decl = [(k, t.dtype, tuple(t.shape)) for k, t in new.items()]
        with SafetensorsWriter({hf_dir / fname: decl}) as w:
            for k, t in new.items():
                w.write(k, t)
    if index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"] = {rename[k]: f for k, f in doc["weight_map"].items()}
        index.write_text(json.dumps(doc, indent=2))


def make_inputs(hf_cfg, batch: int = 2, text_len: int = 10, seed: int = 0) -> dict:
    """One batch for both models: ``ours`` (one placeholder per image) and ``hf`` (expanded).

    Each sample has one image at position 2; text tokens avoid the special ids 0-3 and the image
    token.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = hf_cfg.text_config.vocab_size
    image_token = hf_cfg.image_token_index
    ids = torch.randint(6, vocab, (batch, text_len), generator=gen)
    ids[ids == image_token] = 6
    ids[:, 2] = image_token
    size = hf_cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    t = hf_cfg.image_seq_length
    expanded = torch.cat([ids[:, :2], torch.full((batch, t), image_token), ids[:, 3:]], dim=1)
    ours = dict(images=pixels, input_ids=ids, num_images=torch.ones(batch, dtype=torch.long))
    hf = dict(pixel_values=pixels, input_ids=expanded)
    return {"ours": ours, "hf": hf}


@torch.no_grad()
def hf_logits(model, inputs: dict) -> torch.Tensor:
    """Logits of an HF LLaVA model on ``make_inputs(...)["hf"]``: [b, s, vocab] fp32."""
    out = model(**inputs, use_cache=False)
    return out.logits.float()


# --- separate parts, for ``convert assemble`` -------------------------------------------------

VISION_PARTS = ("clip", "clip-model", "siglip", "siglip-model")
"""Tiny vision checkpoints: ``CLIPVisionModel``, ``CLIPModel``, ``SiglipVisionModel``,
``SiglipModel`` (the ``-model`` ones carry a text half that assembly drops)."""
LM_PARTS = ("llama", "qwen2", "mistral")
"""Tiny causal LMs: GQA Llama without a pad token (assembly adds ``<pad>`` and ``<image>``, vocab
100 -> 102); Qwen2 with qkv bias, tied embeddings, rope theta 1e6 and 10 spare embedding rows past
its 110-token tokenizer (the added tokens land there: no resize); Mistral with a pad token."""


def _perturb(model, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def save_tiny_vision(out_dir: Path, kind: str = "clip", *, seed: int = 0, dtype=torch.float32):
    """Save a tiny random vision checkpoint (see :data:`VISION_PARTS`); returns the model."""
    import transformers as tf

    if kind not in VISION_PARTS:
        raise ValueError(f"unknown vision part {kind!r}; known: {VISION_PARTS}")
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    if kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**TINY_VISION))
    elif kind == "clip-model":
        cfg = tf.CLIPConfig(
            vision_config=TINY_VISION, text_config=dict(vocab_size=64, **text), projection_dim=16
        )
        model = tf.CLIPModel(cfg)
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY_VISION))
    else:
        cfg = tf.SiglipConfig(vision_config=TINY_VISION, text_config=dict(vocab_size=64, **text))
        model = tf.SiglipModel(cfg)
    _perturb(model, seed).to(dtype).save_pretrained(out_dir)
    return model.float()


def save_tiny_lm(
    out_dir: Path,
    kind: str = "llama",
    *,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
):
    """Save a tiny random causal LM and its tokenizer (see :data:`LM_PARTS`); returns the model."""
    import transformers as tf

    if kind not in LM_PARTS:
        raise ValueError(f"unknown LM part {kind!r}; known: {LM_PARTS}")
    torch.manual_seed(seed)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, **TINY_TEXT))
        tokenizer = tiny_tokenizer(100, specials, **names)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=120, rope_theta=1e6, tie_word_embeddings=True, **TINY_TEXT)
        model = tf.Qwen2ForCausalLM(cfg)
        tokenizer = tiny_tokenizer(110, {**specials, 3: "<pad>"}, pad_token="<pad>", **names)
    else:
        model = tf.MistralForCausalLM(
            tf.MistralConfig(vocab_size=100, sliding_window=None, **TINY_TEXT)
        )
        tokenizer = tiny_tokenizer(100, {**specials, 3: "<pad>"}, pad_token="<pad>", **names)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    _perturb(model, seed).to(dtype).save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return model.float()
