"""Known-harmless start-up warnings of our dependencies: silenced, and summarised in one line.

What this file does: `install()` adds message-exact filters (installed once, by the CLI entry
point before megatron-core is imported) for the warnings megatron-core 0.19.2 and torch print on
every start of a run that are not the user's to act on:

- Transformer Engine / Apex fallbacks (optimizer, multi-tensor kernels, norms), which
  `summary_line()` replaces with one line naming the absent optional kernels;
- "GPTModel IS DEPRECATED" (megatron's own notice in favour of HybridModel; the LM is a
  GPTModel on purpose, see ``mm_megatron.model.llava``);
- "MimoModelConfig is experimental" (printed when megatron's model package is imported; we do
  not use MIMO);
- "full scope is deprecated" (megatron's own default of ``cuda_graph_modules``; we do not
  capture CUDA graphs);
- torch's FutureWarnings that ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are
  deprecated (megatron's sequence-parallel collectives call them, once per call site and rank);
- torch's "No CUDA runtime is found, using CUDA_HOME=..." (only relevant to building C++
  extensions, which we never do).

Every other warning stays visible: the filters match the whole message text and category
(warnings) or the exact format string and logger (log records), never a category or a module
alone. (megatron's advice to set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` with sequence parallelism is
kept: on a GPU it is the launcher's to act on.)

What it does not do: silence anything in library use (only ``mm_megatron.cli`` calls
`install()`), or fix the causes (the "Rewrapping ModuleSpec" notice is fixed at its source in
``mm_megatron.model.specs``).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings

KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (
        UserWarning,
        "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    ),
    (
        UserWarning,
        "Transformer Engine and Apex are not installed. Falling back to local implementations of "
        "multi_tensor_applier and multi_tensor_scale",
    ),
    (
        UserWarning,
        "Transformer Engine and Apex are not installed. Falling back to local implementations of "
        "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    ),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (
        UserWarning,
        "MimoModelConfig is experimental and still under active development. The API may change "
        "without notice in future releases.",
    ),
    (
        UserWarning,
        "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
    ),
    (
        FutureWarning,
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
        "`torch.distributed.all_gather_single` instead.",
    ),
    (
        FutureWarning,
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
        "`torch.distributed.reduce_scatter_single` instead.",
    ),
)
"""(category, full text) of the `warnings.warn` messages silenced."""

KNOWN_LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED. ",
    "torch.utils.cpp_extension": "No CUDA runtime is found, using CUDA_HOME='%s'",
}
"""Logger name -> the start of the (unformatted) log message silenced on that logger."""

OPTIONAL_KERNELS = {"Transformer Engine": "transformer_engine.pytorch", "Apex": "apex"}
"""Optional kernel packages megatron-core falls back from: name -> module to import."""

_installed: list[bool] = []


def _drop_known_record(record: logging.LogRecord) -> bool:
    start = KNOWN_LOG_RECORDS.get(record.name)
    return not (start is not None and str(record.msg).startswith(start))


def install() -> None:
    """Silence the known-harmless start-up warnings (idempotent; call before importing megatron)."""
    if _installed:
        return
    for category, text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text) + r"\Z", category=category)
    for name in KNOWN_LOG_RECORDS:
        logging.getLogger(name).addFilter(_drop_known_record)
    _installed.append(True)


def importable(module: str) -> bool:
    """Whether `module` imports here (a broken install counts as absent)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def absent_kernels() -> list[str]:
    """Names of the optional kernel packages that do not import on this machine."""
    return [name for name, module in OPTIONAL_KERNELS.items() if not importable(module)]


def summary_line() -> str | None:
    """The one line that replaces the fallback warnings (None when nothing is absent)."""
    absent = absent_kernels()
    if not absent:
        return None
    return (
        f"mm-megatron: optional kernels absent: {', '.join(absent)} (megatron-core uses its "
        "PyTorch fallbacks)"
    )


def announce() -> None:
    """Print `summary_line()` to stderr on global rank 0 (or a single process)."""
    if os.environ.get("RANK", "0") != "0":
        return
    line = summary_line()
    if line:
        print(line, flush=True, file=sys.stderr)
