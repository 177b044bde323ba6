"""Local (PyTorch) LayerNorm / RMSNorm usable in megatron-core specs, sequence parallel included.

megatron-core's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``. Under sequence
parallelism a norm's weights stay replicated over the TP group while each rank normalises a
different slice of the sequence, so their gradients must be summed over TP. megatron does that in
``finalize_model_grads`` for every parameter carrying ``sequence_parallel = True``; this module
sets that attribute. The computation itself is identical with or without SP.

Not here: fused/zero-centred-gamma variants (use the TE spec for those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalNorm(torch.nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight), chosen by ``config.normalization``.

    Args:
        config: the stack's TransformerConfig (``normalization``, ``sequence_parallel``,
            ``params_dtype``).
        hidden_size: normalised width.
        eps: epsilon.
        sequence_parallel: whether this norm runs inside the SP region (its input is a sequence
            shard); default ``config.sequence_parallel``. Norms outside it (e.g. the ViT pre-LN)
            pass False.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,  # accepted for spec compatibility; unused
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
        sequence_parallel: bool | None = None,
        **unused,
    ):
        super().__init__()
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("LocalNorm does not implement zero_centered_gamma; use the TE spec")
        self.normalization = normalization or config.normalization
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"LocalNorm supports LayerNorm and RMSNorm, not {self.normalization}")
        self.eps = eps
        self.hidden_size = hidden_size
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        if self.normalization == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        sp = config.sequence_parallel if sequence_parallel is None else sequence_parallel
        for p in self.parameters():
            # NOTE: finalize_model_grads all-reduces grads of these over TP when SP is on.
            p.sequence_parallel = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [s, b, h] -> [s, b, h]
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalization}({self.hidden_size}, eps={self.eps})"
