"""Text generation with a KV cache around `LlavaModel`: prefill the merged sequence once, then
one token at a time.

What this file does:
- `build_prompt(...)`: the token ids of a user turn with images, formatted by the run's own chat
  template up to where the assistant's answer starts (`tokenize_conversation` on a turn with an
  empty answer, cut at the first position with loss, so training and generation share one
  formatting), plus the text that ends an answer under that template (`stop_text`).
- `model_image_inputs(model, transform, images, tokenizer_info)`: pixels and per-placeholder
  facts (tiles, token counts, original sizes, separator layouts) of images as the model's tiling
  scheme cuts them (one tile per image without a scheme; anyres grids, MiniCPM slices...).
- `Generator.generate(...)`: greedy, temperature and nucleus (top-p) sampling, streaming the new
  text through a callback. With `use_cache=True` (the default) the prompt is merged (text + image
  embeddings) and run through the language model once, filling megatron-core's
  `StaticInferenceContext` (per-layer K/V buffers; megatron's attention appends to them and
  switches to unmasked attention over the cache for single-token steps); every further step
  feeds only the newest token, so an answer of n tokens computes `prompt + n - 1` positions
  instead of `n * prompt + n^2 / 2`. `use_cache=False` recomputes the whole sequence each step
  (the reference the tests compare against). `positions_computed` counts what ran.

Why this and not megatron-core's inference engine: the engine (dynamic batching, CUDA graphs,
text-generation controllers) wants CUDA and megatron's own `LLaVAModel`; the loop here is a few
lines around the model this project trains and uses megatron's cache through the same
`inference_context` argument the engine passes, so the attention code is megatron's.

Runs at TP = PP = CP = 1 (one CPU or GPU); checkpoints of any layout load into it
(`mm_megatron.infer.loading`).

What it does not do: batching of different prompts, beam search, or load anything from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from PIL import Image

from mm_megatron.data.batch import IGNORE_INDEX
from mm_megatron.data.image import ImageTransform
from mm_megatron.data.templates import EOS, get_template, tokenize_conversation
from mm_megatron.data.tiling import PlaceholderImages, build_tiler, sample_tiler


def model_image_inputs(
    model, transform: ImageTransform, images: list[Image.Image], tokenizer_info: Any = None
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """(pixels [T, 3, H, W] or None, {num_tiles, image_tokens, image_sizes[, layouts]}).

    The images are tiled and counted exactly as `SampleProcessor` does for training
    (`data.tiling.sample_tiler` and `PlaceholderImages`: a prompt of several images takes the
    scheme's multi-image tiler, e.g. OneVision's one tile per image); `Generator.generate`
    splices the layouts of schemes with separator tokens (MiniCPM-V slices) into the prompt.

    Args:
        model: The `LlavaModel` (its `cfg.tiling` and `count_image_tokens`).
        transform: Squares and normalises tiles (the run's image settings).
        images: RGB images in placeholder order.
        tokenizer_info: The run's `TokenizerInfo` (needed by schemes with a text layout).
    """
    if not images:
        return None, {}
    tiler = sample_tiler(build_tiler(model.cfg.tiling, transform), len(images))
    placed = PlaceholderImages()
    for img in images:
        tiled = tiler(img)
        if tiled.layout is not None and tokenizer_info is None:
            raise ValueError(
                f"tiling.type={model.cfg.tiling.type!r} puts separator text between tiles: "
                "model_image_inputs needs the tokenizer"
            )
        placed.add(img, tiled, model.count_image_tokens, tokenizer_info)
    pixels = transform.normalize_pixels(np.concatenate(placed.tiles))
    extras: dict[str, Any] = {
        "num_tiles": torch.tensor(placed.num_tiles),
        "image_tokens": torch.tensor(placed.image_tokens),
        "image_sizes": torch.tensor(placed.image_sizes),
    }
    if any(layout is not None for layout in placed.layouts):
        extras["layouts"] = placed.layouts
    return torch.from_numpy(pixels), extras


PLAIN_STOP = "\n"
"""The `plain` template ends a caption with a newline (LLaVA's preprocess_plain)."""


def stop_text(template: str) -> str | None:
    """Text that ends an answer under `template` (None: only the eos id stops)."""
    chat = get_template(template)
    if chat is None:
        return PLAIN_STOP
    return None if chat.assistant_end is EOS else chat.assistant_end


def build_prompt(
    tokenizer_info: Any,
    template: str,
    prompt: str,
    num_images: int,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of `prompt` as a user turn, up to the start of the assistant's answer.

    Missing `<image>` placeholders are put in front (LLaVA's CLI does the same); more
    placeholders than images is an error.

    Args:
        tokenizer_info: A `TokenizerInfo`.
        template: The run's chat template.
        prompt: The user's text, optionally with `<image>` placeholders.
        num_images: Images given with the prompt.
        system_prompt: Overrides the template's system prompt.
    """
    token = tokenizer_info.image_token
    have = prompt.count(token)
    if have > num_images:
        raise ValueError(f"the prompt has {have} {token} placeholders but {num_images} images")
    prompt = (token + "\n") * (num_images - have) + prompt
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
    tokens = tokenize_conversation(turns, tokenizer_info, template, system_prompt=system_prompt)
    first_answer = next(i for i, label in enumerate(tokens.labels) if label != IGNORE_INDEX)
    return tokens.input_ids[:first_answer]


@dataclass
class Generation:
    """One answer."""

    text: str
    """The decoded answer, without the stop text."""
    token_ids: list[int] = field(default_factory=list)
    """Generated ids (the stop token included when one was produced)."""
    positions_computed: int = 0
    """Sequence positions the language model ran over (prefill + decode steps)."""
    stopped: bool = False
    """True when the answer ended with eos / the stop text, False at max_new_tokens."""


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen) -> int:
    """Next token from logits [vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


class Generator:
    """Generates answers with one `LlavaModel` (TP = PP = CP = 1, eval mode).

    Args:
        model: The model (unwrapped, holding encoder, LM and output layer).
        tokenizer_info: The run's `TokenizerInfo`.
        template: The run's chat template (decides the stop text).
    """

    def __init__(self, model, tokenizer_info: Any, template: str):
        if not (model.pre_process and model.post_process and model.add_encoder):
            raise ValueError("generation needs the whole model on one rank (PP=1)")
        self.model = model
        self.info = tokenizer_info
        self.template = template
        self.stop = stop_text(template)

    def _lm(self, decoder_input: torch.Tensor, context) -> torch.Tensor:
        """decoder_input [s, 1, h] -> logits of the last position [vocab]."""
        out = self.model.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=None,
            decoder_input=decoder_input,
            inference_context=context,
            runtime_gather_output=True,
        )  # [1, s or 1, padded vocab]
        return out[0, -1, : self.model.cfg.lm.vocab_size]

    def _prefill(
        self, images, input_ids: torch.Tensor, context, extras: dict | None = None
    ) -> tuple[torch.Tensor, int]:
        di = self.model.prepare_decoder_inputs(images, input_ids, **(extras or {}))
        emb = di.embeddings  # [s, 1, h]
        return self._lm(emb, context), emb.shape[0]

    def _embed(self, token: int, position: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        pos = torch.tensor([[position]], device=self.device)
        return self.model.language_model.embedding(input_ids=ids, position_ids=pos)  # [1, 1, h]

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        use_cache: bool = True,
        on_text: Callable[[str], None] | None = None,
        image_inputs: dict[str, Any] | None = None,
    ) -> Generation:
        """Generate an answer to a prompt built by `build_prompt`.

        Args:
            images: [N, 3, H, W] transformed images (N = placeholders in the prompt), or None.
            prompt_ids: The prompt's token ids.
            max_new_tokens: Most tokens to generate.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_p: Nucleus sampling mass (1.0: the whole distribution).
            seed: Sampling seed.
            use_cache: Use the KV cache (False recomputes the sequence at every step).
            on_text: Called with each new piece of decoded text (streaming).
            image_inputs: `num_tiles`, `image_tokens`, `image_sizes` (and `layouts`) of
                `images` (`model_image_inputs`); needed by tiling schemes, else one tile per
                image. Layouts are spliced into `prompt_ids` in place of the placeholders.
        """
        model, tok = self.model, self.info.tokenizer
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        image_inputs = dict(image_inputs or {})
        layouts = image_inputs.pop("layouts", None)
        if layouts is not None:  # separator text between tiles, as in training
            placeholder = self.info.image_token_id
            prompt_ids = PlaceholderImages(layouts=layouts).splice(
                prompt_ids, prompt_ids, placeholder
            )[0]
        ids = torch.tensor([prompt_ids], device=self.device)
        if images is not None:
            images = images.to(self.device, dtype=next(model.parameters()).dtype)
        result = Generation(text="")
        context = None
        try:
            if use_cache:
                # the cache holds the merged (image-expanded) prompt and every new token
                tokens = (image_inputs or {}).get("image_tokens")
                seq_len = model.plan(ids, image_tokens=tokens).seq_len
                context = StaticInferenceContext(1, seq_len + max_new_tokens)
                logits, s = self._prefill(images, ids, context, image_inputs)
                context.sequence_len_offset += s
                result.positions_computed += s
            else:
                logits, s = self._prefill(images, ids, None, image_inputs)
                result.positions_computed += s
            shown = ""
            while len(result.token_ids) < max_new_tokens:
                token = _sample(logits, temperature, top_p, gen)
                result.token_ids.append(token)
                if token == self.info.eos_token_id:
                    result.stopped = True
                    break
                text = tok.decode(result.token_ids, skip_special_tokens=True)
                cut = text.find(self.stop) if self.stop else -1
                if cut >= 0:
                    text, result.stopped = text[:cut], True
                if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown) :])
                    shown = text
                result.text = text
                if result.stopped or len(result.token_ids) == max_new_tokens:
                    break
                if use_cache:
                    position = context.sequence_len_offset
                    logits = self._lm(self._embed(token, position), context)
                    context.sequence_len_offset += 1
                    result.positions_computed += 1
                else:
                    ids = torch.cat([ids, torch.tensor([[token]], device=self.device)], dim=1)
                    logits, s = self._prefill(images, ids, None, image_inputs)
                    result.positions_computed += s
            if on_text is not None and len(result.text) > len(shown):
                on_text(result.text[len(shown) :])
        finally:
            model.train(was_training)
        return result
