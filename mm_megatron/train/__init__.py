"""Training on megatron-core: config, loop, optimizer/schedule, checkpoints, logging.

Model FLOPs live in `mm_megatron.model.flops`; the throughput arithmetic of the log line (shared
with `mm_megatron.bench`) in `throughput.py`.

Modules, by role:
- `config.py`: `TrainConfig`, `JobConfig`, YAML + dotted overrides (`load_job_config`).
- `components.py`: model chunks (recompute set at build), megatron optimizer, LR schedule, the
  guarded step.
- `data_setup.py`: data resolution (synthetic default), loaders, one step's micro-batches.
- `trainer.py`: the loop (`train(job)`), signals, NaN guard, evaluation and save cadence.
- `checkpointing.py`: atomic full-state checkpoints (model, optimizer, RNG, scheduler, data).
- `metrics.py`: log line, memory line, TensorBoard, metrics.jsonl.
- `throughput.py`: tokens/s, TFLOP/s and MFU from counted work and wall time.
- `evaluate.py`: validation loss, caption attribute accuracy on the synthetic data.

Heavy imports (torch, megatron) happen in the sub-modules; importing this package is cheap.
"""
