"""Shared pytest set-up: tiers, the CPU runtime, a single-rank megatron fixture, suite options.

Tiers are folders, and each folder's tests get the tier's markers here:

- ``tests/unit``: one process, in-process calls; the quick ones are ``make test-fast``;
- ``tests/integration``: whole trainer/CLI runs, subprocesses, signals, the learning test (slow);
- ``tests/distributed``: spawned gloo worlds (slow);
- ``tests/slurm``: a real two-node SLURM cluster (slow);
- ``tests/gpu``: skipped without CUDA.

A unit test that takes more than a few seconds carries ``@pytest.mark.slow`` itself.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from mm_megatron.runtime import startup_warnings

logging.getLogger("megatron").setLevel(logging.ERROR)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_configure(config):
    # The CLI's message-exact filters of known-harmless start-up warnings, as pytest filters
    # (filters set while conftest is imported do not outlive pytest's warnings capture).
    startup_warnings.install()  # the log-record filters
    for category, text in startup_warnings.KNOWN_WARNINGS:
        line = f"ignore:{re.escape(text)}\\Z:{category.__name__}"
        config.addinivalue_line("filterwarnings", line)


def pytest_addoption(parser):
    parser.addoption("--full-matrix", action="store_true", help="run the full layout parity matrix")


TIER_MARKERS = {
    "integration": ("integration", "slow"),
    "distributed": ("distributed", "slow"),
    "slurm": ("slurm", "slow"),
    "gpu": ("gpu",),
}
"""tests/<folder> -> markers every test in it gets."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        tier = parts[parts.index("tests") + 1] if "tests" in parts else ""
        for name in TIER_MARKERS.get(tier, ()):
            item.add_marker(getattr(pytest.mark, name))
    run_full = config.getoption("--full-matrix") or "full_matrix" in (config.option.markexpr or "")
    skip_full = pytest.mark.skip(reason="full parity matrix: pass --full-matrix")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "full_matrix" in item.keywords and not run_full:
            item.add_marker(skip_full)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def single_rank():
    """megatron parallel state at world size 1 (TP=PP=CP=1), torn down afterwards."""
    from mm_megatron.config import ParallelConfig
    from mm_megatron.runtime import distributed

    pg = distributed.initialize(ParallelConfig(), seed=1234)
    yield pg
    distributed.destroy()
