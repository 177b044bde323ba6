"""Training configuration: `TrainConfig`, the whole-job `JobConfig`, YAML and dotted overrides.

What this file does:
- `TrainConfig`: every knob of the trainer (batch sizes, optimizer, LR schedule, precision,
  recompute, checkpointing, logging, evaluation, reliability), one docstring line per field.
- `JobConfig`: preset name + model (`LlavaConfig`) + layout (`ParallelConfig`) + data
  (`DataConfig`) + train, i.e. everything a run needs, and its plain-dict form.
- `load_job_config(preset, config_file, overrides)`: a preset from the registry, then a YAML file
  (`examples/*.yaml`), then dotted `section.key=value` overrides, applied in that order through
  the one mechanism of `mm_megatron.config.fields` (values coerced to the field's annotated type,
  so YAML's `1e-3`, a string to PyYAML, is a float; unknown keys raise a ValueError naming them).
  Fields with a Megatron-LM flag declare it in their metadata (`{"flag": "--lr"}`); the CLI is
  built from that.

Data defaults follow the model: unless set explicitly, `data.image_norm` matches the encoder
style and `data.max_seq_len` is capped by the LM's `max_position_embeddings`. `data.image_size`
is the encoder's input size; setting it to anything else is an error (the encoder's position
embeddings fix it). An unset template is the data directory's own (the generated synthetic data
says `plain`).

What it does not do: parse command lines (`mm_megatron/commands/train_cmd.py`), or check a
layout against a world size (`mm_megatron.parallel.layout`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm_megatron.config import LlavaConfig, ParallelConfig, fields, get_preset
from mm_megatron.config.fields import apply_overrides, merge_trees
from mm_megatron.data.config import DataConfig

SECTIONS = ("model", "parallel", "data", "train")
"""Top-level sections of a job config (besides `preset`)."""

PRECISIONS = ("auto", "bf16", "fp32")
"""`train.precision` values; auto = bf16 on CUDA, fp32 on the CPU."""

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")
"""Decay styles megatron's `OptimizerParamScheduler` implements."""


@dataclass
class TrainConfig:
    """Everything the trainer decides; the model, layout and data have their own configs."""

    run_dir: str | None = field(default=None, metadata={"flag": "--run-dir"})
    """Directory for logs, tensorboard, metrics.jsonl and the synthetic-data cache; None means
    `runs/<preset>` under the working directory."""
    seed: int = field(default=1234, metadata={"flag": "--seed"})
    """Seed of model init, megatron's RNG tracker and the data shuffle."""
    micro_batch_size: int = field(default=16, metadata={"flag": "--micro-batch-size"})
    """Rows per micro-batch on one data-parallel rank."""
    global_batch_size: int = field(default=16, metadata={"flag": "--global-batch-size"})
    """Rows per optimizer step over all DP ranks; micro-batches per step are
    global / (micro * DP) (gradient accumulation)."""
    train_iters: int = field(default=300, metadata={"flag": "--train-iters"})
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), bf16 (bf16 weights, fp32 main params and grads) or fp32."""
    optimizer: str = "adam"
    """adam (megatron's AdamW) or sgd."""
    lr: float = field(default=1e-3, metadata={"flag": "--lr"})
    """Peak learning rate."""
    min_lr: float = field(default=0.0, metadata={"flag": "--min-lr"})
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = field(default=20, metadata={"flag": "--lr-warmup-iters"})
    """Linear warm-up steps (from 0 to `lr`)."""
    lr_warmup_fraction: float | None = field(
        default=None, metadata={"flag": "--lr-warmup-fraction"}
    )
    """Warm-up as a fraction of the decay steps; overrides `lr_warmup_iters` when set."""
    lr_decay_iters: int | None = field(default=None, metadata={"flag": "--lr-decay-iters"})
    """Steps over which the LR decays to `min_lr`; None means `train_iters`."""
    lr_decay_style: str = field(default="cosine", metadata={"flag": "--lr-decay-style"})
    """cosine, linear, constant or inverse-square-root."""
    weight_decay: float = field(default=0.0, metadata={"flag": "--weight-decay"})
    """Decoupled weight decay (megatron skips biases and norms)."""
    adam_beta1: float = field(default=0.9, metadata={"flag": "--adam-beta1"})
    """Adam beta1."""
    adam_beta2: float = field(default=0.999, metadata={"flag": "--adam-beta2"})
    """Adam beta2."""
    adam_eps: float = field(default=1e-8, metadata={"flag": "--adam-eps"})
    """Adam epsilon."""
    clip_grad: float = field(default=1.0, metadata={"flag": "--clip-grad"})
    """Clip the global gradient norm to this (0 disables clipping)."""
    use_distributed_optimizer: bool = field(
        default=False, metadata={"flag": "--use-distributed-optimizer"}
    )
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = field(default=False, metadata={"flag": "--overlap-grad-reduce"})
    """Overlap the DP gradient reduce with the backward pass."""
    recompute_granularity: str | None = field(
        default=None, metadata={"flag": "--recompute-granularity"}
    )
    """Activation recompute in the LM: None, full (whole layers) or selective (core attention)."""
    recompute_method: str | None = field(default=None, metadata={"flag": "--recompute-method"})
    """With full recompute: uniform (every `recompute_num_layers` layers as one unit) or block
    (the first `recompute_num_layers` layers of each stage)."""
    recompute_num_layers: int | None = field(
        default=None, metadata={"flag": "--recompute-num-layers"}
    )
    """Layers per recompute unit (uniform) or layers recomputed per stage (block)."""
    save: str | None = field(default=None, metadata={"flag": "--save"})
    """Checkpoint directory. A run resumes from its latest checkpoint if it has one."""
    load: str | None = field(default=None, metadata={"flag": "--load"})
    """Initial checkpoint (model weights only, e.g. a converter output or a stage-1 run), used
    when `save` has no checkpoint yet."""
    save_interval: int | None = field(default=None, metadata={"flag": "--save-interval"})
    """Save every this many steps (None: only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Checkpoints kept in `save` (older ones are deleted; 0 keeps all)."""
    async_save: bool = field(default=False, metadata={"flag": "--async-save"})
    """Write checkpoints in a background process (megatron async dist_checkpointing)."""
    log_interval: int = field(default=10, metadata={"flag": "--log-interval"})
    """Print the log line (and write tensorboard scalars) every this many steps."""
    tensorboard_dir: str | None = field(default=None, metadata={"flag": "--tensorboard-dir"})
    """TensorBoard event directory; None means `<run_dir>/tensorboard`."""
    eval_interval: int | None = field(default=None, metadata={"flag": "--eval-interval"})
    """Evaluate on the validation split every this many steps (None: only at the end)."""
    eval_iters: int = field(default=2, metadata={"flag": "--eval-iters"})
    """Global batches per evaluation (0 disables evaluation)."""
    caption_eval: bool | None = None
    """Also measure colour/shape word accuracy on held-out synthetic captions (PP=CP=1); None
    means on when the run uses the generated synthetic dataset."""
    max_nan_iters: int = 5
    """Abort with an error after this many NaN/inf-loss (or grad-norm) steps in a row."""
    blank_images: bool = False
    """Ablation: replace every image by zeros (the model then cannot see them)."""
    synthetic_samples: int = 2000
    """Training samples of the generated synthetic dataset (used when no data is configured)."""
    num_threads: int | None = None
    """torch CPU threads per process; None: cores / local ranks on CPU, torch's default on GPU."""
    dist_timeout_s: float = 600.0
    """Seconds a collective may wait for its peers before the job stops naming the late rank
    (torch.distributed's timeout; a dead peer is usually seen at once)."""

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        positive = {
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "train_iters": self.train_iters,
            "log_interval": self.log_interval,
            "max_nan_iters": self.max_nan_iters,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"train.{name}={value} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"train.optimizer={self.optimizer!r}; choose adam or sgd")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(
                f"train.lr_decay_style={self.lr_decay_style!r}; choose one of {LR_DECAY_STYLES}"
            )
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(
                f"train.recompute_granularity={self.recompute_granularity!r}; "
                "choose full, selective or null"
            )
        if self.recompute_granularity == "full":
            if self.recompute_method not in ("uniform", "block"):
                raise ValueError(
                    "train.recompute_granularity=full needs recompute_method uniform or block"
                )
            if not self.recompute_num_layers or self.recompute_num_layers < 1:
                raise ValueError("train.recompute_granularity=full needs recompute_num_layers >= 1")
        for name in ("save_interval", "eval_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name}={value} must be >= 1 or null")
        if self.keep_last < 0 or self.eval_iters < 0 or self.lr_warmup_iters < 0:
            raise ValueError("train.keep_last, eval_iters and lr_warmup_iters must be >= 0")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise ValueError(f"train.lr_warmup_fraction={self.lr_warmup_fraction} not in [0, 1)")

    @property
    def decay_iters(self) -> int:
        """Steps of the LR decay."""
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_iters(self) -> int:
        """Steps of the linear warm-up."""
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.decay_iters)
        return self.lr_warmup_iters


@dataclass
class JobConfig:
    """A whole training job: what model, on what layout, on what data, trained how."""

    preset: str | None
    """The model preset the model section started from (None: taken from `--load`)."""
    model: LlavaConfig
    """The model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout (DP is what is left of the world size)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data pipeline."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The trainer."""

    @property
    def run_dir(self) -> Path:
        """Where logs, tensorboard and caches go."""
        return Path(self.train.run_dir or Path("runs") / (self.preset or "run"))

    def validate(self) -> None:
        """Validate every section and their agreement (ValueError names the field)."""
        self.model.validate()
        self.data.validate()
        self.train.validate()
        v = self.model.vision
        size = v.input_image_size
        if self.data.image_size != size:
            key = "model.vision.hires.image_size" if v.hires.enabled else "model.vision.image_size"
            raise ValueError(
                f"data.image_size={self.data.image_size} but {key}={size}: the "
                "encoder takes exactly that size; drop data.image_size (it follows the model)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly); `from_dict` inverts it."""
        return {
            "preset": self.preset,
            "model": self.model.to_dict(),
            "parallel": dataclasses.asdict(self.parallel),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Inverse of `to_dict` (unknown keys raise)."""
        job = cls(preset=d.get("preset"), model=LlavaConfig.from_dict(d["model"]))
        rest = {k: v for k, v in d.items() if k not in ("preset", "model")}
        apply_overrides(job, rest, "")
        return job


# --- dotted overrides -------------------------------------------------------------------------


def parse_dotted(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "model.lm.num_layers=4"]` -> nested dict (values parsed as YAML)."""
    return fields.parse_dotted(items, ("preset", *SECTIONS))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A job YAML file as a dict (ValueError for anything but a mapping with known sections)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a job config must be a mapping")
    unknown = sorted(set(doc) - set(SECTIONS) - {"preset", "description"})
    if unknown:
        raise ValueError(
            f"{path}: unknown sections {unknown}; valid: preset, {', '.join(SECTIONS)}"
        )
    return doc


def _data_defaults(model: LlavaConfig) -> DataConfig:
    """A DataConfig whose image settings and length limit follow the model."""
    return DataConfig(
        image_size=model.vision.input_image_size,
        image_norm="siglip" if model.vision.vit_style == "siglip" else "clip",
        max_seq_len=min(2048, model.lm.max_position_embeddings),
    )


def build_job_config(tree: dict[str, Any], base_model: LlavaConfig | None = None) -> JobConfig:
    """A validated `JobConfig` from a merged override tree.

    Args:
        tree: `{"preset": name, "model": {...}, "parallel": {...}, "data": {...},
            "train": {...}}`; every part optional except a preset or `base_model`.
        base_model: The model to start from when no preset is named (e.g. a checkpoint's).
    """
    preset = tree.get("preset")
    if preset is not None:
        model = get_preset(str(preset))
    elif base_model is not None:
        model = base_model
    else:
        raise ValueError("no model: give --preset NAME (or a config file naming one, or --load)")
    apply_overrides(model, tree.get("model") or {}, "model")
    job = JobConfig(preset=preset, model=model, data=_data_defaults(model))
    apply_overrides(job.parallel, tree.get("parallel") or {}, "parallel")
    data = tree.get("data") or {}
    apply_overrides(job.data, data, "data")
    apply_overrides(job.train, tree.get("train") or {}, "train")
    job.validate()
    return job


def load_job_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    base_model: LlavaConfig | None = None,
) -> JobConfig:
    """Preset, then YAML file, then overrides -> a validated `JobConfig`.

    Args:
        preset: Preset name; wins over the file's `preset`.
        config_file: A job YAML (`preset:` plus any of the sections).
        overrides: A nested dict, or dotted `section.key=value` strings.
        base_model: Model used when neither argument nor file names a preset.
    """
    tree: dict[str, Any] = read_yaml(config_file) if config_file else {}
    tree.pop("description", None)
    if isinstance(overrides, list):
        overrides = parse_dotted(overrides)
    tree = merge_trees(tree, overrides or {})
    if preset is not None:
        tree["preset"] = preset
    return build_job_config(tree, base_model)
