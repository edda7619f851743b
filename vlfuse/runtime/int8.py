"""int8 weights for linear layers (dynamic quantization, a scale per output row)."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


def int8_linears(decoder: nn.Module) -> nn.Module:
    """``decoder`` with its ``nn.Linear`` layers replaced by int8 ones (dynamic quantization, in place)."""
    with warnings.catch_warnings():  # eager-mode quantization is marked for migration to torchao; it works
        warnings.simplefilter("ignore")
        # a scale per output row: closer to float than one per matrix (greedy captions equal to the float
        # model's on 143 vs 141 of 150 val photos), and the fused q/kv rows keep their own ranges
        quantized = quantize_dynamic(decoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                     inplace=True)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear) and child._packed_params.dtype == torch.qint8:
                setattr(module, name, _Int8Linear(child))
    return quantized


class _Int8Linear(nn.Module):
    """A dynamically quantized Linear called through its operator directly: the same kernel and result as
    torch's module (``reduce_range`` as its version 4 sets it), without the Python dispatch checks of each call,
    which cost about as much as the kernel for the one-row inputs of decoding (~15 % of a greedy caption)."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.packed = quantized._packed_params._packed_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)
