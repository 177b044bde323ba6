"""Tokenizer and processor files for an HF export of any run, so `AutoProcessor` loads it.

What this file does: `complete_export(out_dir, ckpt_dir, cfg)` runs after `mcore_to_hf` has
written config.json (and before the weights). When the export lacks tokenizer or processor files
(a run trained from scratch has no HF original to copy them from), it writes the processor of the
config.json's family, built from the run's own pre-processing read from the checkpoint's training
state. The family (`HF_FAMILIES[model_type]`) names its builder in `HFFamily.build_processor`
(LLaVA-NeXT / OneVision / InternVL: `processor_families.py`); None means this file's
`LlavaProcessor`, built from:

- the run's tokenizer (`data.tokenizer_path`; for the generated synthetic dataset the one inside
  the run directory), with `<image>` as its image token (`run_tokenizer`);
- an image processor that reproduces `mm_megatron.data.image.ImageTransform`: `pad` ->
  LLaVA's pad-to-square with the mean colour then a bicubic resize, `resize` -> a bicubic
  stretch, `crop` -> resize the short side and centre-crop; CLIP or SigLIP mean/std;
- the image-token count of the model (`ImageTokenCounter`), expressed through the processor's
  `patch_size`, `vision_feature_select_strategy` and `num_additional_image_tokens`;
- a jinja `chat_template` rendering the run's chat template (`vicuna_v1`, `llama3`, `chatml`;
  none for `plain`, which has no chat turns).

What it does not do: touch an export that already has tokenizer and processor files (converted
checkpoints copy the HF original's verbatim), invent a tokenizer for a converter output whose HF
original had none (nor for any checkpoint without a training state), or convert weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Any of these in an export means it has a tokenizer."""

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
"""Any of these in an export means it has a processor."""


class ExportFilesError(ValueError):
    """The run's tokenizer cannot be found, or no HF processor can reproduce the run's
    pre-processing; the message names the path or setting and the fix."""


def _latest_job(ckpt_dir: Path) -> dict:
    """The job config saved with the newest iteration (empty for converter outputs)."""
    iters = sorted(p for p in ckpt_dir.glob("iter_*") if (p / "train_state.json").is_file())
    if not iters:
        return {}
    state = json.loads((iters[-1] / "train_state.json").read_text(encoding="utf-8"))
    return state.get("job") or {}


def run_tokenizer_dir(job: dict) -> Path | None:
    """Where the run's tokenizer is: `data.tokenizer_path`, else the one its data carries."""
    data, train = job.get("data") or {}, job.get("train") or {}
    if data.get("tokenizer_path"):
        return Path(data["tokenizer_path"])
    shards = data.get("train_shards")
    if shards:
        beside = Path(shards) if Path(shards).is_dir() else Path(shards).parent
        return beside / "tokenizer"
    from mm_megatron.train.data_setup import SYNTHETIC_DIRNAME

    run_dir = train.get("run_dir") or str(Path("runs") / str(job.get("preset") or "run"))
    return Path(run_dir) / SYNTHETIC_DIRNAME / "tokenizer"


def image_processor_kwargs(image_size: int, aspect: str, norm: str) -> dict[str, Any]:
    """LlavaImageProcessor settings equal to `ImageTransform(image_size, aspect, norm)`."""
    from mm_megatron.data.image import NORMALIZATIONS

    mean, std = NORMALIZATIONS[norm]
    square = {"height": image_size, "width": image_size}
    kwargs: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,  # PIL bicubic, as ImageTransform
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_pad": aspect == "pad",
        "do_center_crop": aspect == "crop",
        "size": {"shortest_edge": image_size} if aspect == "crop" else square,
        "crop_size": square,
    }
    return kwargs


def chat_template_jinja(name: str, system_prompt: str | None = None) -> str | None:
    """A jinja chat template rendering the run's template `name` (None for `plain`)."""
    from mm_megatron.data.templates import EOS, get_template

    t = get_template(name)
    if t is None:
        return None

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text) + " }}" if text else ""

    end = "{{ eos_token }}" if t.assistant_end is EOS else lit(t.assistant_end)
    bos = ("{{ bos_token }}" if t.bos_text is None else lit(t.bos_text)) if t.add_bos else ""
    default = system_prompt if system_prompt is not None else t.default_system
    before, _, after = t.system_format.partition("{system}")
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    return (
        bos
        + "{% set system = namespace(text=" + json.dumps(default) + ") %}"
        + "{% for message in messages %}{% if message['role'] == 'system' %}"
        + "{% set system.text = message['content'] if message['content'] is string "
        + "else message['content'][0]['text'] %}{% endif %}{% endfor %}"
        + "{% if system.text %}" + lit(before) + "{{ system.text }}" + lit(after) + "{% endif %}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'user' %}" + lit(t.user_prefix) + content + lit(t.user_suffix)
        + "{% elif message['role'] == 'assistant' %}" + lit(t.assistant_prefix)
        + lit(t.answer_prefix) + content + end + lit(t.assistant_suffix)
        + "{% endif %}{% endfor %}"
        + "{% if add_generation_prompt %}" + lit(t.assistant_prefix) + "{% endif %}"
    )  # fmt: skip


def run_tokenizer(job: dict, tokenizer_dir: Path, **kwargs: Any) -> Any:
    """The run's tokenizer, with its image placeholder (`data.image_token`) as one token.

    Args:
        job: The run's job config.
        tokenizer_dir: Where the run's tokenizer is.
        **kwargs: More `AutoTokenizer.from_pretrained` options (e.g. named special tokens).
    """
    from transformers import AutoTokenizer

    image_token = (job.get("data") or {}).get("image_token") or "<image>"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, **kwargs)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


def run_chat_template(job: dict) -> str | None:
    """The jinja chat template of the run's data config."""
    data = job.get("data") or {}
    return chat_template_jinja(data.get("template", "vicuna_v1"), data.get("system_prompt"))


def build_processor(cfg: Any, job: dict, tokenizer_dir: Path) -> Any:
    """The `LlavaProcessor` of a run: its tokenizer, image transform and image-token count."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from mm_megatron.data.batch import ImageGeometry
    from mm_megatron.model.image_tokens import ImageTokenCounter

    if cfg.tiling.type != "none":
        raise ExportFilesError(
            f"model.tiling.type={cfg.tiling.type!r}: transformers' LlavaProcessor has no such "
            "tiling, so the export could not reproduce the run's pre-processing"
        )
    data = job.get("data") or {}
    image_processor = LlavaImageProcessorPil(
        **image_processor_kwargs(
            cfg.vision.image_size, data.get("image_aspect", "pad"), data.get("image_norm", "clip")
        )
    )
    patch = cfg.vision.patch_size
    grid = (cfg.vision.image_size // patch) ** 2
    count = ImageTokenCounter.from_config(cfg)(ImageGeometry())
    # LlavaProcessor: grid + num_additional_image_tokens (- 1 with the "default" strategy)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=run_tokenizer(job, tokenizer_dir),
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=count - grid,
        image_token=data.get("image_token") or "<image>",
        chat_template=run_chat_template(job),
    )


def export_family(out_dir: Path) -> Any:
    """The `HFFamily` of the export's config.json (its `model_type`)."""
    from mm_megatron.convert.hf_config import HF_FAMILIES

    config = json.loads((Path(out_dir) / "config.json").read_text(encoding="utf-8"))
    return HF_FAMILIES[config.get("model_type", "llava")]


def complete_export(out_dir: Path, ckpt_dir: Path, cfg: Any, log=print) -> bool:
    """Write the run's processor (and tokenizer) into `out_dir` unless it has them; True if
    written.

    Args:
        out_dir: The export directory (config.json already written).
        ckpt_dir: The checkpoint it was exported from (its training state names the data).
        cfg: The model's `LlavaConfig`.
        log: Where to print a one-line note.

    Raises:
        ExportFilesError: the tokenizer is missing, or the family's processor cannot reproduce
            the run's pre-processing (one line naming why).
    """
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    has_tokenizer = any((out_dir / n).is_file() for n in TOKENIZER_FILES)
    has_processor = any((out_dir / n).is_file() for n in PROCESSOR_FILES)
    if has_tokenizer and has_processor:
        return False
    job = _latest_job(ckpt_dir)
    if not job:  # a converter's or assembler's output: no training pre-processing to export
        log(f"note: {ckpt_dir} has no training state: no tokenizer/processor written")
        return False
    tokenizer_dir = out_dir if has_tokenizer else run_tokenizer_dir(job)
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise ExportFilesError(
            f"{ckpt_dir} was trained with the tokenizer in {tokenizer_dir}, which does not exist "
            "(relative paths are from the training run's working directory); run the export "
            "from there so the export gets its tokenizer and processor"
        )
    build = export_family(out_dir).build_processor or build_processor
    processor = build(cfg, job, tokenizer_dir)
    processor.save_pretrained(str(out_dir))
    name = type(processor).__name__
    log(f"wrote the run's tokenizer ({tokenizer_dir}) and {name} to {out_dir}")
    return True
