"""debug-tiny-anyres learns to name shape and colour through anyres tiling.

``mm-megatron train --preset debug-tiny-anyres`` on the synthetic shapes data with half of the
images 4:3 or 3:4 (``non_square_fraction=0.5``): every 64 px image becomes a base tile plus a
best-fit grid of 64 px tiles (1x2 or 2x1 for these sizes), unpadded to its aspect ratio with an
``image_newline`` per feature row. On held-out captions the model must name the colour and the
shape >= 90% of the time, as the LLaVA-1.5 path does in ``test_train_learning.py`` (which also
shows that blanked images stay at chance; the image path is the same here).

Measured (1500 steps, batch 32, lr 2e-3, seed 1234): colour 1.00 from step 250; shape 0.54,
0.65, 0.75, 0.88, 0.95, 0.96 at steps 250, 500, 750, 1000, 1250, 1500. ~4 min on a quiet 2-core
machine (150-190 ms per step; 8 min with the machine shared).
"""

from __future__ import annotations

import pytest

from mm_megatron.train.metrics import read_metrics
from tests.train_helpers import kill_session, train_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.learning, pytest.mark.timeout(1500)]

TRAIN = [
    "--micro-batch-size", "32",
    "--global-batch-size", "32",
    "--train-iters", "1500",
    "--lr", "2e-3",
    "--lr-warmup-iters", "30",
    "--log-interval", "100",
    "--eval-iters", "1",
    "--train.caption_eval=true",
    "--train.num_threads=1",
    "--data.template=plain",
    "--data.num_workers=1",
]  # fmt: skip
N_TRAIN, N_VAL = 6000, 400


def test_anyres_learns_colour_and_shape_words(tmp_path):
    from mm_megatron.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(
        str(data),
        n_train=N_TRAIN,
        n_val=N_VAL,
        image_size=64,
        shard_size=1000,
        vocab_size=512,
        non_square_fraction=0.5,
    )
    run_dir = tmp_path / "run"
    args = [
        "--preset", "debug-tiny-anyres",
        f"--data.train_shards={data}/train.index.json",
        f"--data.val_shards={data}/val.index.json",
        f"--data.tokenizer_path={data}/tokenizer",
        f"--run-dir={run_dir}",
        *TRAIN,
    ]  # fmt: skip
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = train_subprocess(args, stdout=log)
        try:
            proc.wait(timeout=1200)
        finally:
            kill_session(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    final = evals[max(evals)]
    print(f"\nanyres, with images: {final}")
    assert final["captions"] >= 150
    assert final["colour_acc"] >= 0.9 and final["shape_acc"] >= 0.9, final
