"""Checkpoint directory format and save/load helpers (:mod:`mm_megatron.checkpoint.model_io`),
plus a streaming dist-checkpoint writer for converters (:mod:`.streaming`)."""
