"""The synthetic task learns through the Q-Former: ``mm-megatron train --preset
debug-tiny-qformer`` names the colour and the shape of held-out images.

Every image reaches the LM only as the Q-Former's 8 query outputs (16 patch features in), so
naming the shape >= 90% of the time (teacher-forced argmax over the word's tokens, as in
``test_train_learning.py``) means the queries carry what the image shows. That test's blanked-
image control already shows the captions cannot be guessed from the text.

Measured (1500 steps, batch 32, lr 2e-3, one CPU thread, seed 1234): colour 0.95 / shape 0.47
at step 250, 1.00 / 0.68 at 750, 1.00 / 0.82 at 1000, 1.00 / 0.93 at 1500 (5.3 min on
the shared 2-core machine, 160-330 ms per step).
"""

from __future__ import annotations

import pytest

from tests.train_helpers import learn_captions

pytestmark = [pytest.mark.slow, pytest.mark.learning, pytest.mark.timeout(1500)]


def test_qformer_learns_colour_and_shape_words(tmp_path):
    final = learn_captions(tmp_path, "debug-tiny-qformer")
    print(f"\nthrough the Q-Former: {final}")
    assert final["captions"] >= 150
    assert final["colour_acc"] >= 0.9 and final["shape_acc"] >= 0.9, final
