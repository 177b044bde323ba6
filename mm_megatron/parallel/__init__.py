"""Parallel layout of one training step, between the runtime and the model.

- ``cp_padding.py``: pads the merged decoder input to the CP/SP shard factor, splits it over CP
  ranks (zig-zag, the one implementation of that split) and scatters it to the SP region.
- ``layout.py``: up-front checks of a layout against a model (one-line ``LayoutError``s) and the
  pipeline stage-split arithmetic (``stage_layers``).
- ``schedule.py``: one step over micro-batches with megatron-core's pipeline schedules, and the
  token-weighted loss.

Not here: process-group set-up (``mm_megatron.runtime``) or anything that builds a model
(``mm_megatron.model.build``); nothing in this package imports ``mm_megatron.model``.
"""
