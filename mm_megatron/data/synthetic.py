"""A small, learnable synthetic captioning/VQA dataset, its tokenizer, in the real shard format.

What this file does: draws images with pillow (one shape from `SHAPES`, in one of `COLOURS`, at
one of `POSITIONS`, on a plain background; a quarter of the images are not square) and writes
LLaVA records about them into webdataset shards in exactly the format `convert.py` produces
(`shards.py` documents it), so the same reader reads both. Sample kinds:

- caption: "<image>\\nDescribe the image briefly." -> "a red circle on the left"
- vqa: one to three of "What colour is the shape?" -> "red", "What shape is it?" -> "circle",
  "Where is the shape?" -> "left"
- multi-image (two images): "Do the two shapes have the same colour?" -> "yes"/"no", sometimes
  followed by "What shape is in the second image?"
- text-only: "What is the opposite of left?" -> "right", "Which colour do you get by mixing red
  and yellow?" -> "orange"

It also trains a tiny byte-level BPE tokenizer over the dataset's texts and the chat templates'
fixed strings (`tokenizer.train_tiny_tokenizer`) and writes `dataset_info.json`. Output layout:

    out_dir/train-000000.tar ...  train.index.json
    out_dir/val-000000.tar ...    val.index.json      (held-out split, different samples)
    out_dir/tokenizer/            tokenizer.json, tokenizer_config.json, special_tokens_map.json
    out_dir/dataset_info.json     counts, vocab size, image size, label vocabularies

Every sample is drawn from its own RNG seeded by (seed, split, index), so output is byte-identical
for the same arguments. `mm-megatron data synth` calls `main(argv)`.

What it does not do: evaluation metrics, or downloading anything.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from mm_megatron.data.shards import ShardWriter, encode_sample, sample_key
from mm_megatron.data.templates import TEMPLATES, VICUNA_SYSTEM
from mm_megatron.data.tokenizer import TINY_SPECIAL_TOKENS, train_tiny_tokenizer

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
"""Shape colours (RGB)."""

SHAPES = ("circle", "square", "triangle", "star", "diamond")
"""Shapes that can be drawn."""

POSITIONS = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
"""Position name -> shape centre as a fraction of (width, height)."""

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
"""How captions say a position."""

OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "center"}
"""Answers of the text-only 'opposite' questions."""

MIXES = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
"""Answers of the text-only 'mixing' questions."""

BACKGROUNDS = ((250, 250, 250), (190, 190, 190), (30, 30, 30))
"""Plain background colours."""

CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in the picture?",
    "Write a short caption for the image.",
)
"""User prompts of caption samples."""

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
}
"""VQA question per attribute."""

SAME_COLOUR_QUESTION = "Do the two shapes have the same colour?"
SECOND_SHAPE_QUESTION = "What shape is in the second image?"
OPPOSITE_QUESTION = "What is the opposite of {}?"
MIX_QUESTION = "Which colour do you get by mixing {} and {}?"
"""Fixed questions of the two-image and text-only samples."""


def vocabulary_words() -> list[str]:
    """Every lower-cased word and punctuation mark the samples' texts use (sorted).

    A word-level tokenizer holding these (e.g. the tiny HF test checkpoint's) tokenizes the
    dataset without unknown tokens.
    """
    texts = [
        *COLOURS,
        *SHAPES,
        *POSITIONS,
        *POSITION_PHRASES.values(),
        *CAPTION_PROMPTS,
        *QUESTIONS.values(),
        SAME_COLOUR_QUESTION,
        SECOND_SHAPE_QUESTION,
        OPPOSITE_QUESTION,
        MIX_QUESTION,
        "yes no",
    ]
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s{}]", t.lower())})


TRIANGLE_HALF_BASE = 1.1
"""Half the triangle's base, in units of the shape size r (the widest silhouette sideways)."""


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of `shape` (any of `SHAPES` but the circle) of size `r` centred at (cx, cy).

    Areas differ by >= 1.27x between any two shapes (star 1.0 r^2, diamond 1.5, triangle 2.2,
    circle 3.14, square 4), more than the size jitter (1.18x), so the silhouettes differ in both
    outline and pixel count.
    """
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        half = TRIANGLE_HALF_BASE * r
        return [(cx, cy - r), (cx - half, cy + r), (cx + half, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.34 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(
    shape: str, colour: str, position: str, width: int, height: int, rng: random.Random
) -> Image.Image:
    """Draw one shape on a plain background.

    The shape's size is a fraction (0.23-0.25) of the image's longer side, so after LLaVA's
    pad-to-square a shape has the same size in square and non-square images; its centre sits at
    `POSITIONS[position]` (+-4% jitter), moved inwards where the shape would leave the image.

    Args:
        shape: One of `SHAPES`.
        colour: A key of `COLOURS`.
        position: A key of `POSITIONS`.
        width: Image width in pixels.
        height: Image height in pixels.
        rng: Source of the background, size and position jitter.
    """
    img = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    side = max(width, height)
    r = side * rng.uniform(0.23, 0.25)
    fx, fy = POSITIONS[position]
    cx = fx * width + rng.uniform(-0.04, 0.04) * side
    cy = fy * height + rng.uniform(-0.04, 0.04) * side
    reach = TRIANGLE_HALF_BASE * r
    cx = min(max(cx, reach), width - reach)
    cy = min(max(cy, r), height - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img


def _random_image(
    rng: random.Random, image_size: int, colour: str | None = None, non_square: float = 0.25
) -> dict:
    """Attributes and drawing of one random image (``non_square``: share of 4:3 / 3:4 ones)."""
    width = height = image_size
    if rng.random() < non_square:  # non-square images exercise pad/resize and anyres grids
        if rng.random() < 0.5:
            height = round(image_size * 0.75)
        else:
            width = round(image_size * 0.75)
    attrs = {
        "shape": rng.choice(SHAPES),
        "colour": colour or rng.choice(sorted(COLOURS)),
        "position": rng.choice(sorted(POSITIONS)),
    }
    attrs["image"] = draw_shape(
        attrs["shape"], attrs["colour"], attrs["position"], width, height, rng
    )
    return attrs


def _with_image(rng: random.Random, text: str, n: int = 1) -> str:
    marks = "\n".join(["<image>"] * n)
    return f"{text}\n{marks}" if rng.random() < 0.2 else f"{marks}\n{text}"


def make_sample(
    rng: random.Random,
    image_size: int,
    multi_image_fraction: float,
    text_only_fraction: float,
    non_square_fraction: float = 0.25,
) -> tuple[list[dict], list[Image.Image], str]:
    """One random sample: (conversations, images, kind).

    Args:
        rng: The sample's own random generator.
        image_size: Longer side of the drawn images.
        multi_image_fraction: Probability of a two-image sample.
        text_only_fraction: Probability of a sample without images.
        non_square_fraction: Probability that an image is 4:3 or 3:4 rather than square.
    """
    ns = non_square_fraction
    u = rng.random()
    if u < text_only_fraction:
        if rng.random() < 0.5:
            position = rng.choice(sorted(OPPOSITES))
            question, answer = OPPOSITE_QUESTION.format(position), OPPOSITES[position]
        else:
            (a, b), answer = rng.choice(sorted(MIXES.items()))
            question = MIX_QUESTION.format(a, b)
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], [], "text"
    if u < text_only_fraction + multi_image_fraction:
        first = _random_image(rng, image_size, non_square=ns)
        same = rng.random() < 0.5
        other = rng.choice(sorted(set(COLOURS) - {first["colour"]}))
        second = _random_image(
            rng, image_size, colour=first["colour"] if same else other, non_square=ns
        )
        turns = [
            {
                "from": "human",
                "value": _with_image(rng, SAME_COLOUR_QUESTION, 2),
            },
            {"from": "gpt", "value": "yes" if same else "no"},
        ]
        if rng.random() < 0.5:
            turns.append({"from": "human", "value": SECOND_SHAPE_QUESTION})
            turns.append({"from": "gpt", "value": second["shape"]})
        return turns, [first["image"], second["image"]], "multi"
    attrs = _random_image(rng, image_size, non_square=ns)
    if rng.random() < 0.55:
        caption = f"a {attrs['colour']} {attrs['shape']} {POSITION_PHRASES[attrs['position']]}"
        prompt = _with_image(rng, rng.choice(CAPTION_PROMPTS))
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption}]
        return turns, [attrs["image"]], "caption"
    asked = rng.sample(sorted(QUESTIONS), rng.randint(1, 3))
    turns = []
    for i, attribute in enumerate(asked):
        question = QUESTIONS[attribute]
        turns.append({"from": "human", "value": _with_image(rng, question) if i == 0 else question})
        turns.append({"from": "gpt", "value": attrs[attribute]})
    return turns, [attrs["image"]], "vqa"


def _encode_image(img: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _template_texts() -> list[str]:
    """The templates' fixed strings, so the tiny tokenizer learns them as few tokens."""
    texts = [VICUNA_SYSTEM, "You are a helpful assistant.", "<|begin_of_text|>"]
    for t in TEMPLATES.values():
        texts += [t.system_format, t.user_prefix, t.user_suffix, t.assistant_prefix]
        if isinstance(t.assistant_end, str):
            texts.append(t.assistant_end + t.assistant_suffix)
    return [text for text in texts if text.strip()]


def _write_split(
    out_dir: str,
    split: str,
    n: int,
    seed: int,
    shard_size: int,
    image_format: str,
    show_progress: bool = False,
    **kw: Any,
) -> tuple[dict, list[str]]:
    counts = {"num_samples": n, "num_images": 0, "text_only": 0, "multi_image": 0}
    texts: list[str] = []
    with ShardWriter(out_dir, split, samples_per_shard=shard_size) as writer:
        for i in tqdm(range(n), desc=f"synthesising {split}", disable=not show_progress):
            rng = random.Random(f"mm_megatron-synthetic/{seed}/{split}/{i}")
            turns, images, kind = make_sample(rng, **kw)
            record_id = f"synth-{split}-{i:06d}"
            names = [f"{split}/{i:06d}_{j}.{image_format}" for j in range(len(images))]
            record = {"id": record_id, "conversations": turns, "images": names}
            payload = [(image_format, _encode_image(img, image_format)) for img in images]
            writer.write(encode_sample(sample_key(i, record_id), record, payload))
            counts["num_images"] += len(images)
            counts["text_only"] += kind == "text"
            counts["multi_image"] += kind == "multi"
            texts.extend(t["value"].replace("<image>", "") for t in turns)
    counts["num_shards"] = len(writer.shards)
    counts["index"] = os.path.basename(writer.index_path)
    return counts, texts


def write_synthetic_dataset(
    out_dir: str,
    n_train: int = 2000,
    n_val: int = 200,
    image_size: int = 64,
    shard_size: int = 500,
    seed: int = 0,
    *,
    image_format: str = "jpg",
    multi_image_fraction: float = 0.1,
    text_only_fraction: float = 0.05,
    non_square_fraction: float = 0.25,
    vocab_size: int = 1024,
    show_progress: bool = False,
) -> dict:
    """Write the synthetic dataset, its tokenizer and `dataset_info.json` to `out_dir`.

    Args:
        out_dir: Output directory (created; existing files with the same names are replaced).
        n_train: Training samples.
        n_val: Held-out validation samples (drawn with different seeds than training).
        image_size: Side of the (square) images; non-square ones are 3/4 of it on one side.
        shard_size: Samples per shard.
        seed: Base seed; the same arguments give byte-identical output.
        image_format: `jpg` or `png`.
        multi_image_fraction: Fraction of two-image samples.
        text_only_fraction: Fraction of samples without images.
        non_square_fraction: Fraction of 4:3 / 3:4 images (the rest are square).
        vocab_size: Upper bound of the tokenizer's vocabulary.
        show_progress: Show a progress bar per split (stderr).

    Returns:
        The content written to `dataset_info.json`.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format={image_format!r}; choose jpg or png")
    if multi_image_fraction + text_only_fraction > 1:
        raise ValueError("multi_image_fraction + text_only_fraction must be <= 1")
    os.makedirs(out_dir, exist_ok=True)
    kw = {
        "image_size": image_size,
        "multi_image_fraction": multi_image_fraction,
        "text_only_fraction": text_only_fraction,
        "non_square_fraction": non_square_fraction,
    }
    splits, corpus = {}, []
    for split, n in (("train", n_train), ("val", n_val)):
        splits[split], texts = _write_split(
            out_dir, split, n, seed, shard_size, image_format, show_progress, **kw
        )
        corpus.extend(texts)
    corpus.extend(_template_texts() * 20)
    vocab = train_tiny_tokenizer(corpus, os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size)
    info = {
        "format": "mm_megatron-synthetic-v1",
        "seed": seed,
        "image_size": image_size,
        "image_format": image_format,
        "splits": splits,
        "template": "plain",
        "tokenizer": {
            "path": "tokenizer",
            "vocab_size": vocab,
            "special_tokens": {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)},
            "image_token": "<image>",
        },
        "labels": {
            "colours": sorted(COLOURS),
            "shapes": list(SHAPES),
            "positions": sorted(POSITIONS),
        },
    }
    with open(os.path.join(out_dir, "dataset_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def main(argv: list[str] | None = None) -> int:
    """Command line: `mm-megatron data synth --out DIR [--n-train N ...]`."""
    parser = argparse.ArgumentParser(
        prog="mm-megatron data synth", description="Write the synthetic shapes dataset."
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=2000, help="training samples")
    parser.add_argument("--n-val", type=int, default=200, help="validation samples")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--multi-image-fraction", type=float, default=0.1)
    parser.add_argument("--text-only-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocab bound")
    args = parser.parse_args(argv)
    info = write_synthetic_dataset(
        args.out,
        args.n_train,
        args.n_val,
        args.image_size,
        args.shard_size,
        args.seed,
        image_format=args.image_format,
        multi_image_fraction=args.multi_image_fraction,
        text_only_fraction=args.text_only_fraction,
        vocab_size=args.vocab_size,
        show_progress=True,
    )
    for split, counts in info["splits"].items():
        print(
            f"{split}: {counts['num_samples']} samples in {counts['num_shards']} shards, "
            f"{counts['num_images']} images, {counts['multi_image']} multi-image, "
            f"{counts['text_only']} text-only -> {os.path.join(args.out, counts['index'])}"
        )
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    print(f"tokenizer: {tokenizer_dir} (vocab {info['tokenizer']['vocab_size']})")
    return 0
