"""Start-up noise: a debug-tiny run prints one summary line before its first log line, no more.

The CLI runs in a subprocess (a fresh interpreter, as a user starts it). Into that run the test
injects warnings that differ from the silenced ones by a few words, a log record from a silenced
logger with another message, and a warning of its own; all of them must still show, so the
filters are message-exact rather than blanket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from mm_megatron.runtime import startup_warnings

HEADER = "mm-megatron train: preset="
"""Start of the trainer's first log line."""

INJECT = """
import logging, sys, warnings
from mm_megatron import cli
from mm_megatron.runtime import startup_warnings

announce = startup_warnings.announce


def noisy_announce():
    announce()
    warnings.warn("Apex is not installed. Falling back to something new")
    warnings.warn("an unrelated user warning")
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel has a new problem")


startup_warnings.announce = noisy_announce
sys.exit(cli.main(sys.argv[1:]))
"""


def test_debug_tiny_prints_only_the_summary_before_its_first_log_line(tmp_path):
    argv = [
        "train", "--preset", "debug-tiny", "--run-dir", str(tmp_path / "run"),
        "--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0",
        "--train.synthetic_samples=32", "--data.num_workers=0",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run(
        [sys.executable, "-c", INJECT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    lines = run.stdout.splitlines()
    first_log = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    before = lines[:first_log]
    summary = startup_warnings.summary_line()
    injected = [
        "UserWarning: Apex is not installed. Falling back to something new",
        "UserWarning: an unrelated user warning",
        "GPTModel has a new problem",
    ]
    for text in injected:  # unrelated (or near-miss) warnings still show
        assert sum(text in line for line in before) == 1, (text, before)
    progress = ("[data] ", "synthesising ")  # the data synthesis says what it does: not warnings
    rest = [
        line
        for line in before
        if not any(text in line for text in injected)
        and "warnings.warn(" not in line
        and not line.startswith(progress)
        and line.strip()
    ]
    assert rest == ([summary] if summary else []), before
    assert all("warn" not in line.lower() for line in lines[first_log:]), lines[first_log:]


def test_filters_are_message_exact():
    startup_warnings.install()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        startup_warnings._installed.clear()
        startup_warnings.install()  # re-add the filters inside this context
        for category, text in startup_warnings.KNOWN_WARNINGS:
            warnings.warn(text, category, stacklevel=1)
            warnings.warn(text + " and something else", category, stacklevel=1)
            warnings.warn(text, RuntimeWarning, stacklevel=1)
    shown = [(w.category, str(w.message)) for w in caught]
    assert len(shown) == 2 * len(startup_warnings.KNOWN_WARNINGS)
    assert all(cat is RuntimeWarning or msg.endswith("something else") for cat, msg in shown)
