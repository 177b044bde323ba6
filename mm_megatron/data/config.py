"""`DataConfig`: every knob of the multimodal data pipeline, one docstring line per field.

What this file does: holds the dataclass and checks its values (`DataConfig.validate`).

What it does not do: read YAML or command lines (the config registry does), or decide values that
belong to the model or the parallel layout; the image-token count, the data-parallel rank/size,
the micro batch size and the seed are arguments of `build_dataloader`, not fields here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mm_megatron.data.templates import TEMPLATE_NAMES

DEFAULT_TEMPLATE = "vicuna_v1"
"""The chat template of a dataset that names none (LLaVA-1.5's)."""

IMAGE_ASPECT_MODES = ("pad", "resize", "crop")
"""How a non-square image becomes square; see `image.py`."""

IMAGE_NORMALIZATIONS = ("clip", "siglip", "imagenet")
"""Mean/std presets; see `image.py`."""


@dataclass
class DataConfig:
    """Configuration of the webdataset reader, tokenization, packing and collation."""

    train_shards: str | None = field(default=None, metadata={"flag": "--data-path"})
    """Training shards: an index file (`d/train.index.json`), a directory holding
    `train.index.json`, a glob (`d/train-*.tar`), a brace range (`d/train-{000000..000009}.tar`)
    or a comma-separated list of those; or a megatron-energon dataset directory (with `.nv-meta/`)
    or energon metadataset YAML (weighted blends), read through energon's loader."""

    val_shards: str | None = None
    """Validation shards, same forms as `train_shards` (a directory means `val.index.json`)."""

    tokenizer_path: str | None = field(default=None, metadata={"flag": "--tokenizer"})
    """Local directory of a HuggingFace tokenizer (loaded offline with AutoTokenizer)."""

    template: str | None = None
    """Chat template: plain (stage-1 captions), vicuna_v1 (LLaVA-1.5), llama3 or chatml; None
    takes the data directory's own (its `dataset_info.json`), else vicuna_v1."""

    system_prompt: str | None = None
    """System prompt; None uses the template's default (a record's own system turn wins)."""

    image_token: str = "<image>"
    """Placeholder text in the conversations; becomes exactly one token id."""

    image_size: int = 336
    """Side of the square image given to the vision encoder, in pixels."""

    image_aspect: str = "pad"
    """pad (LLaVA expand2square with the mean colour, then resize), resize (stretch) or crop
    (resize the short side, centre crop)."""

    image_norm: str = "clip"
    """Normalisation: clip (OpenAI CLIP mean/std), siglip (0.5/0.5) or imagenet (InternVL)."""

    max_seq_len: int = 2048
    """Longest expanded sequence (each image expanded to its token count); longer samples are
    skipped and counted as bad, never truncated."""

    packing: bool = False
    """Pack several samples into one row (greedy knapsack); adds `seq_lens` to the batch."""

    pad_to: int | None = None
    """Pad input_ids/labels to this fixed text length (None: to the longest row of the batch)."""

    pad_to_multiple_of: int = 1
    """Round the padded text length up to a multiple of this."""

    shuffle: bool = True
    """Shuffle shard order and samples within a shard each epoch (training split only)."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0: decode in the calling process)."""

    prefetch_per_worker: int = 8
    """Samples each worker prepares ahead."""

    max_bad_fraction: float = 0.01
    """Raise when more than this fraction of the samples read so far was bad."""

    min_samples_for_bad_check: int = 200
    """Samples to read before the bad fraction is checked at all."""

    @property
    def chat_template(self) -> str:
        """The template the samples are formatted with: `template`, else vicuna_v1 (the trainer
        fills `template` from the data directory's `dataset_info.json` before this is read)."""
        return self.template or DEFAULT_TEMPLATE

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ValueError(f"data.template={self.template!r}; choose one of {TEMPLATE_NAMES}")
        if self.image_aspect not in IMAGE_ASPECT_MODES:
            raise ValueError(
                f"data.image_aspect={self.image_aspect!r}; choose one of {IMAGE_ASPECT_MODES}"
            )
        if self.image_norm not in IMAGE_NORMALIZATIONS:
            raise ValueError(
                f"data.image_norm={self.image_norm!r}; choose one of {IMAGE_NORMALIZATIONS}"
            )
        positive = {
            "image_size": self.image_size,
            "max_seq_len": self.max_seq_len,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "prefetch_per_worker": self.prefetch_per_worker,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"data.{name}={value} must be >= 1")
        if self.pad_to is not None and self.pad_to < 1:
            raise ValueError(f"data.pad_to={self.pad_to} must be >= 1 or None")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.min_samples_for_bad_check < 0:
            raise ValueError(
                f"data.min_samples_for_bad_check={self.min_samples_for_bad_check} must be >= 0"
            )
        if not self.image_token:
            raise ValueError("data.image_token must be a non-empty string")
