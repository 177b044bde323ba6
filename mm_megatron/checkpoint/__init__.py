"""The mm_megatron checkpoint layer, below the converters and the trainer.

* :mod:`.model_io`: the checkpoint directory format and its save/load helpers.
* :mod:`.streaming`: a streaming dist-checkpoint writer for converters.
* :mod:`.safetensors_io`: streaming safetensors reader/writer (HF weight files).
* :mod:`.errors`: the one-line error types for bad checkpoint input.

Nothing here imports :mod:`mm_megatron.convert` or :mod:`mm_megatron.train`.
"""
