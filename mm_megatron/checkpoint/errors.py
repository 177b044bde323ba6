"""Errors for bad checkpoint input: one line, naming the file or tensor at fault.

The checkpoint format (:mod:`.model_io`, :mod:`.safetensors_io`) and the converters in
:mod:`mm_megatron.convert` (which import this layer, never the reverse) raise them.

They subclass ``ValueError`` (or ``FileNotFoundError``) so ``mm-megatron``'s CLI prints them as
``mm-megatron convert: error: ...`` and exits 2 without a traceback.
"""

from __future__ import annotations


class ConversionError(ValueError):
    """Input the converter cannot use (unsupported model, inconsistent config, bad tensor)."""


class UnsupportedModelError(ConversionError):
    """The checkpoint describes a model mm_megatron does not implement."""


class CorruptFileError(ConversionError):
    """A weight file that is truncated, malformed or inconsistent with its index."""


class MissingFileError(ConversionError, FileNotFoundError):
    """A file the checkpoint needs (config, shard, tracker) does not exist."""


class OutputExistsError(ConversionError, FileExistsError):
    """The output directory exists and ``--force`` was not given."""
