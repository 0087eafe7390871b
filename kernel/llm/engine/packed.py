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

Before packing, `fuse_projections` concatenates the products that read the same input — a
Llama layer's q, k and v projections, and its MLP's gate and up — into one layer each
(`qkv_proj`, `gate_up_proj`), again only where the fused product's columns are bit for bit the
separate ones. At one row the three small q/k/v products cost 2.4x the fused one in bfloat16
here (70 vs 29 µs), gate and up 1.5x (85 vs 58 µs): at a few agents each call's fixed cost is
a good part of its time. The old layers become slices of the fused one's output, so the model's
own forward still computes the same (a little slower: it runs the fused product once per
slice); the engine's lean pass (lean.py) calls the fused layers once.
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


class _Slice(nn.Module):
    """A projection fused into another: columns start..end of the fused layer's output."""

    def __init__(self, fused: nn.Linear, start: int, end: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent holds it once
        self.start, self.end = start, end
        self.in_features, self.out_features = fused.in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.end]

    def extra_repr(self) -> str:
        return f"columns {self.start}..{self.end} of the fused projection"


# (parent's attribute for the fused layer, the projections it replaces), per module kind.
_FUSIONS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
            ("gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(model: nn.Module) -> int:
    """Fuse each module's q/k/v and gate/up `nn.Linear`s that read the same input into one
    layer, where its product equals theirs bit for bit; the count of fused layers made.
    Fusing twice is a no-op; weights already packed (dropped) are left alone."""
    fused_count = 0
    generator = torch.Generator().manual_seed(1)
    shared = _shared_weights(model)
    with torch.no_grad():
        for module in list(model.modules()):
            for name, parts in _FUSIONS:
                layers = [getattr(module, part, None) for part in parts]
                if hasattr(module, name) or not all(
                        type(m) is nn.Linear and m.weight is not None
                        and "forward" not in m.__dict__ and id(m.weight) not in shared
                        for m in layers):
                    continue
                fused = _fused(layers, generator)
                if fused is None:
                    continue
                setattr(module, name, fused)
                start = 0
                for part, layer in zip(parts, layers, strict=True):
                    setattr(module, part, _Slice(fused, start, start + layer.out_features))
                    start += layer.out_features
                fused_count += 1
    return fused_count


def _fused(layers: list[nn.Linear], generator: torch.Generator) -> nn.Linear | None:
    """One layer computing `layers` side by side, or None where they cannot be fused or the
    fused product's columns differ from theirs on the probes."""
    first = layers[0]
    weights = [m.weight for m in layers]
    if (len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1
            or len({m.bias is None for m in layers}) != 1):
        return None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in layers),
                      bias=first.bias is not None, device=first.weight.device,
                      dtype=first.weight.dtype)
    fused.weight.copy_(_concat_weights(weights))
    if first.bias is not None:
        fused.bias.copy_(torch.cat([m.bias for m in layers]))
    fused.requires_grad_(first.weight.requires_grad)
    for rows in _PROBE_ROWS:
        x = torch.randn(1, rows, first.in_features, generator=generator).to(first.weight.dtype)
        if not torch.equal(fused(x), torch.cat([m(x) for m in layers], dim=-1)):
            return None
    return fused


def _concat_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(weights)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied embeddings and heads)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
