"""The synthetic task learns through every new image path: anyres tiling (LLaVA-NeXT), the
Perceiver resampler (MiniCPM-V) and the Q-Former (BLIP-2): each debug-tiny model names the colour
and the shape of held-out images >= 90% of the time, as the LLaVA-1.5 path does in
``test_train_learning.py`` (whose blanked-image control shows the captions cannot be guessed from
the text; the pipeline is the same here).

The three ``mm-megatron train`` runs (one CPU thread each, 64 px images, batch 32, lr 2e-3) start
together and are awaited together: on the 2-core CI machine that takes about half the time of
running them one after another.

- **debug-tiny-anyres**, half of the images 4:3 or 3:4: every image becomes a base tile plus a
  best-fit grid (1x2 or 2x1), unpadded, an ``image_newline`` per feature row. Measured alone
  (1500 steps): shape 0.54 / 0.65 / 0.75 / 0.88 / 0.95 / 0.96 at steps 250..1500, colour 1.00.
- **debug-tiny-resampler** (``--model.tiling.type=none``: slicing triples the encoder work and
  is proven by ``test_tiling_minicpm.py`` and ``test_parity_resampler.py``): every image reaches
  the LM only as 16 query tokens. Measured alone (2000 steps): shape 0.65 / 0.80 / 0.77 / 0.92 /
  0.93 at steps 1000..2000; 1500-step schedules stopped at 0.83-0.88.
- **debug-tiny-qformer**: 8 query outputs per image. Measured alone (1500 steps): colour 0.95 /
  shape 0.47 at step 250, 1.00 / 0.82 at 1000, 1.00 / 0.93 at 1500.
"""

from __future__ import annotations

import pytest

from tests.train_helpers import start_learning

pytestmark = [pytest.mark.slow, pytest.mark.learning, pytest.mark.timeout(2400)]

RUNS = {
    "anyres": ("debug-tiny-anyres", (), 0.5),
    "resampler": (
        "debug-tiny-resampler",
        ("--train-iters", "2000", "--model.tiling.type=none"),
        0.25,
    ),
    "qformer": ("debug-tiny-qformer", (), 0.25),
}


@pytest.fixture(scope="module")
def finals(tmp_path_factory):
    runs = {}
    try:
        for name, (preset, extra, non_square) in RUNS.items():
            tmp = tmp_path_factory.mktemp(name)
            runs[name] = start_learning(tmp, preset, *extra, non_square_fraction=non_square)
        out = {}
        for name, run in runs.items():
            try:
                out[name] = run.finish(timeout=2000)
            except AssertionError as e:  # one failed run fails its own test only
                out[name] = e
        return out
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()


@pytest.mark.parametrize("name", list(RUNS))
def test_learns_colour_and_shape_words(finals, name):
    final = finals[name]
    if isinstance(final, AssertionError):
        raise final
    print(f"\n{name}: {final}")
    assert final["captions"] >= 150
    assert final["colour_acc"] >= 0.9 and final["shape_acc"] >= 0.9, final
