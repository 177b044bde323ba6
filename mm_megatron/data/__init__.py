"""Multimodal data pipeline: webdataset shards -> tokenized, packed, collated LLaVA batches.

Modules, by role:
- `batch.py`: the batch contract with the model and `validate_batch`.
- `config.py`: `DataConfig`.
- `shards.py`: the shard format, `ShardWriter`, shard resolution and random access.
- `llava_json.py`: LLaVA JSON + images -> shards; `synthetic.py`: the synthetic shapes dataset.
- `tokenizer.py`, `templates.py`: tokenizer loading and chat templates with loss masks.
- `image.py`: decoding, pad-to-square/resize, normalisation.
- `samples.py`: one raw sample -> `Example` or a counted bad sample.
- `reader.py`: per-rank sample order (DP/worker sharding, resumable positions).
- `packing.py`, `collate.py`, `loader.py`: batching, packing and `build_dataloader`.
- `energon.py`, `energon_encoder.py`: the megatron-energon backend (energon-prepared datasets and
  metadataset blends through energon's own loader, same batches); `build_dataloader` picks it.

This package never imports torch.distributed; ranks are passed in.
"""

from mm_megatron.data.batch import IGNORE_INDEX, BatchContractError, expanded_length, validate_batch
from mm_megatron.data.config import DataConfig
from mm_megatron.data.loader import (
    DataCounters,
    MultimodalDataLoader,
    TooManyBadSamplesError,
    build_dataloader,
)
from mm_megatron.data.tokenizer import TokenizerInfo, load_tokenizer, prepare_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BatchContractError",
    "DataConfig",
    "DataCounters",
    "MultimodalDataLoader",
    "TokenizerInfo",
    "TooManyBadSamplesError",
    "build_dataloader",
    "expanded_length",
    "load_tokenizer",
    "prepare_tokenizer",
    "validate_batch",
]
