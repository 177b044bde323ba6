"""Measure what the memory model predicts: bytes autograd saves, and model-state bytes.

What this file does:
- `SavedActivations`: a context manager around ``torch.autograd.graph.saved_tensors_hooks``
  that sums the storage bytes of every tensor saved for backward while a model chunk's
  ``forward`` runs (each storage once; parameters and their buffers excluded; tensors saved by
  recomputation inside backward are not counted, they are transient);
- `model_state_bytes`: weights, megatron gradient buffer (``main_grad``) and optimizer state
  bytes actually held by this rank.

Used by the memory-model validation test and the GPU check. What it does not do: model anything
(`memory.py`) or launch processes.
"""

from __future__ import annotations

import torch


class SavedActivations:
    """Count bytes saved for backward during the forward passes of ``modules``.

    Args:
        modules: The model chunks (their parameters are excluded; forward hooks mark when a
            forward pass is running).
    """

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.bytes = 0
        self._seen: set[int] = set()
        self._active = 0
        self._exclude = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._active and isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += storage.nbytes()
        return t

    def _enter(self, *args, **kwargs) -> None:
        self._active += 1

    def _leave(self, *args, **kwargs) -> None:
        self._active -= 1

    def __enter__(self) -> SavedActivations:
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._leave))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state tensors (Adam moments, momentum, fp32 main copies)."""
    total = 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", sub)
        for state in inner.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(sub, name, None) or []:
                total += sum(p.numel() * p.element_size() for p in group)
    return total


def model_state_bytes(chunks: list, optimizer) -> dict[str, int]:
    """{weights, grads, optimizer} bytes this rank holds (after at least one optimizer step)."""
    params = [p for c in chunks for p in c.parameters()]
    grads = 0
    for p in params:
        g = getattr(p, "main_grad", None)
        if p.requires_grad and g is not None:
            grads += g.numel() * g.element_size()
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": grads,
        "optimizer": optimizer_state_bytes(optimizer),
    }
