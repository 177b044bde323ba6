"""GPU types the planner and MFU know: peak dense bf16 TFLOP/s, memory and bandwidths.

Numbers are the vendors' data-sheet values for the SXM parts (dense, no sparsity). The
inter-node figure is one 400 Gb/s NIC per GPU (200 Gb/s for A100 systems). Add a GPU by adding
a row to ``GPUS``; ``--peak-tflops`` overrides the peak anywhere MFU is computed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator type."""

    name: str
    """Registry key (``--gpu``)."""
    peak_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    memory_gib: float
    """Usable device memory, GiB."""
    hbm_gbps: float
    """Memory bandwidth, GB/s."""
    intra_node_gbps: float
    """NVLink bandwidth per GPU, one direction, GB/s."""
    inter_node_gbps: float
    """Network bandwidth per GPU, one direction, GB/s."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100-80gb", 989.4, 79.6, 3350, 450, 50),
        GpuSpec("h200", 989.4, 139.8, 4800, 450, 50),
        GpuSpec("a100-80gb", 312.0, 79.2, 2039, 300, 25),
        GpuSpec("b200", 2250.0, 178.0, 8000, 900, 50),
    )
}


def gpu_spec(name: str) -> GpuSpec:
    """Look up ``name`` (ValueError lists the known GPUs)."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


def detect_peak_tflops() -> float | None:
    """Peak of the local CUDA device when its name matches a known GPU, else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key, needle in (("h200", "h200"), ("h100-80gb", "h100"), ("b200", "b200")):
        if needle in name:
            return GPUS[key].peak_tflops
    if "a100" in name:
        return GPUS["a100-80gb"].peak_tflops
    return None
