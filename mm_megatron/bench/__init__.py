"""Benchmarking and planning: model FLOPs, throughput arithmetic, the layout sweep and planner.

- `flops.py`: model FLOPs of a step, summed from what each component states about itself;
- `throughput.py`: tokens/s, samples/s, TFLOP/s per GPU and MFU (shared with the trainer);
- `gpus.py`: peak bf16 TFLOP/s, memory and bandwidths per GPU type;
- `sweep.py` / `worker.py`: `mm-megatron bench`, one torchrun job per layout;
- `memory.py` / `planner.py`: `mm-megatron plan`, the memory and time model and the ranking;
- `reference.py`: the single-GPU side-by-side reference benchmark (with a CPU dry mode).
"""
