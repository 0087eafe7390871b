"""Linear layers on weights laid out once for oneDNN, where that changes no output.

At the batch sizes of a few agents a decode step is mostly matrix-vector products (70% of a
1-agent SmolLM2 step in torch's profiler), and `F.linear` in bfloat16 on a CPU hands oneDNN the
weight in its stored layout every call, so oneDNN reorders it each time. Reordered once at load
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU freezing does), the same
products take 0.5-0.7x the time at 1-16 rows and 0.7x for the LM head, measured here
(docs/benchmarks.md).

A layer is packed only if its packed product is bit for bit the plain one on probe inputs of
one and of many rows, so greedy outputs stay identical: in bfloat16 on this CPU every layer
qualifies; in float32 none does (oneDNN's sum order differs from MKL's), and they are left as
they are. The original weight is dropped unless another module shares it (a tied embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PROBE_ROWS = (1, 37)  # a decode step's one row, and a prefill's many (odd: no aligned case)


class _Packed:
    """A packed layer's forward: `module.forward` on the instance, so the module stays in the
    model's tree (names, hooks, repr) and computes through the reordered weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias,
                                                  "none", [], "")


def available() -> bool:
    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: nn.Module) -> int:
    """Pack each `nn.Linear` of a CPU model whose packed product is identical to its own; the
    count packed. Packing twice is a no-op. The model must not change dtype or device after."""
    if not available():
        return 0
    shared = _shared_weights(model)
    packed = 0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear or isinstance(module.__dict__.get("forward"), _Packed):
                continue
            weight, bias = module.weight, module.bias
            if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
                continue
            try:
                candidate = _Packed(torch.ops.mkldnn._reorder_linear_weight(weight, 1),
                                    None if bias is None else bias.detach())
            except RuntimeError:  # a dtype or shape oneDNN does not take
                continue
            if not all(torch.equal(F.linear(x, weight, bias), candidate(x)) for x in (
                    torch.randn(1, rows, module.in_features, generator=generator).to(weight.dtype)
                    for rows in _PROBE_ROWS)):
                continue
            module.forward = candidate
            if id(weight) not in shared:
                module.weight = None  # the packed copy is the layer's weight from here
            packed += 1
    return packed


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
