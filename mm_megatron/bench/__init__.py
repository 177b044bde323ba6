"""Benchmarking and planning: model FLOPs, throughput arithmetic, the layout sweep and planner.

- model FLOPs come from `mm_megatron.model.flops` (summed from what each component states about
  itself) and tokens/s, TFLOP/s per GPU and MFU from `mm_megatron.train.throughput`, the same
  arithmetic as the trainer's log line;
- `gpus.py`: peak bf16 TFLOP/s, memory and bandwidths per GPU type;
- `sweep.py` / `worker.py`: `mm-megatron bench`, one torchrun job per layout;
- `memory.py` / `planner.py`: `mm-megatron plan`, the memory and time model and the ranking;
- `reference.py`: the single-GPU side-by-side reference benchmark (with a CPU dry mode).
"""
