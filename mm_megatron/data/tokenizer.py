"""Loading a local HuggingFace tokenizer for multimodal data, and building a tiny one.

What this file does:
- `load_tokenizer(path)` loads a tokenizer offline (`AutoTokenizer.from_pretrained(path,
  local_files_only=True)`) and `prepare_tokenizer` makes sure the image placeholder is exactly one
  token (adding it as a special token when missing) and that a pad id exists; it returns a
  `TokenizerInfo` with the ids the pipeline and the model need.
- `train_tiny_tokenizer` builds a small byte-level BPE over a given corpus with the `tokenizers`
  library and saves it as a HF fast-tokenizer directory (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json) with the special tokens `<unk> <s> </s> <pad> <image>` (ids 0..4).
  The synthetic dataset uses it; it never downloads anything.

What it does not do: chat formatting and loss masks (`templates.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
"""Special tokens of the tiny tokenizer, in id order."""


class TokenizerSetupError(RuntimeError):
    """The tokenizer cannot be used for multimodal data as it is (e.g. no one-token placeholder)."""


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer plus the ids the data pipeline and the model agree on."""

    tokenizer: Any
    """The HF tokenizer (a `PreTrainedTokenizerBase`), possibly with `<image>` added."""

    image_token: str
    """The placeholder text, e.g. `<image>`."""

    image_token_id: int
    """Id of the one-token placeholder."""

    pad_token_id: int
    """Id used to right-pad input_ids (pad, else unk, else eos of the tokenizer)."""

    bos_token_id: int | None
    """Beginning-of-sequence id, or None when the tokenizer has none."""

    eos_token_id: int | None
    """End-of-sequence id, or None when the tokenizer has none."""

    vocab_size: int
    """len(tokenizer): the embedding table needs at least this many rows."""

    added_image_token: bool
    """True when `<image>` was not in the tokenizer and was added here (resize the embeddings)."""


def load_tokenizer(path: str) -> Any:
    """Load a HF tokenizer from a local directory, never from the network.

    Args:
        path: Directory with tokenizer.json / tokenizer_config.json (or a slow tokenizer's files).
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise TokenizerSetupError(f"tokenizer path {path!r} is not a directory")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_tokenizer(tokenizer: Any, image_token: str = "<image>") -> TokenizerInfo:
    """Make `image_token` a single token id and pick the pad id.

    Args:
        tokenizer: A HF tokenizer or a local path to one.
        image_token: The placeholder text used in the conversations.

    Raises:
        TokenizerSetupError: when the placeholder still is not one token after adding it, or no
            pad/unk/eos id exists to pad with.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer))
    added = False
    ids = _encode(tokenizer, image_token)
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != image_token:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)])
        added = True
        ids = _encode(tokenizer, image_token)
        if len(ids) != 1:
            raise TokenizerSetupError(
                f"{image_token!r} encodes to {ids} even after adding it as a special token to "
                f"{type(tokenizer).__name__}; use a fast tokenizer or another placeholder"
            )
    image_token_id = ids[0]
    # The placeholder must stay one token when glued to text on either side.
    probe = _encode(tokenizer, f"a{image_token}b")
    if probe.count(image_token_id) != 1:
        raise TokenizerSetupError(
            f"{image_token!r} is not split out of text: 'a<image>b' -> {probe}"
        )
    pad = tokenizer.pad_token_id
    for fallback in (tokenizer.unk_token_id, tokenizer.eos_token_id):
        if pad is None:
            pad = fallback
    if pad is None:
        raise TokenizerSetupError("the tokenizer has no pad, unk or eos token to pad with")
    if pad == image_token_id:
        raise TokenizerSetupError(f"pad id {pad} equals the image token id")
    return TokenizerInfo(
        tokenizer=tokenizer,
        image_token=image_token,
        image_token_id=image_token_id,
        pad_token_id=int(pad),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vocab_size=len(tokenizer),
        added_image_token=added,
    )


def train_tiny_tokenizer(corpus: Iterable[str], out_dir: str, *, vocab_size: int = 1024) -> int:
    """Train a byte-level BPE on `corpus` and save it as a HF fast-tokenizer directory.

    Byte-level BPE encodes any text (so templates whose markers are not special tokens still
    work) and decodes it back exactly. Training is deterministic for a given corpus.

    Args:
        corpus: Texts to learn merges from; repeated texts weigh more.
        out_dir: Directory to create/overwrite tokenizer files in.
        vocab_size: Upper bound on the vocabulary (training stops earlier on a small corpus).

    Returns:
        The vocabulary size, special tokens included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    for expected_id, token in enumerate(TINY_SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise TokenizerSetupError(f"special token {token} did not get id {expected_id}")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<image>"],
    }
    # Written by hand (not save_pretrained) so transformers 4.x and 5.x both load it.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    for name, content in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
    ):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
    return tok.get_vocab_size()
