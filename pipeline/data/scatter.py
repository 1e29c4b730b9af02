"""A pure-torch stand-in for `torch_scatter`, used only when the real package is absent.

wilds' group-wise `eval` (every dataset but iWildCam) does `import torch_scatter` and calls
`torch_scatter.scatter(src=v, index=g, dim_size=n_groups, reduce='mean')` in
`wilds.common.utils.avg_over_groups`. The real package is source-only on PyPI (a long compile),
so when it cannot be imported we register this module under its name. It follows
torch_scatter's semantics, which differ from a bare `Tensor.scatter_reduce` in two ways that
matter for eval: a 1-D index is broadcast along `dim`, and groups that receive no element
come out as 0 (not the reduction's identity) for every reduction but `mul`.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch

__all__ = [
    "scatter",
    "scatter_sum",
    "scatter_add",
    "scatter_mean",
    "scatter_mul",
    "install_scatter_fallback",
    "using_fallback",
]

_REDUCTIONS = ("sum", "add", "mean", "mul", "max", "min")
_FALLBACK_MODULE_NAME = "torch_scatter"


def _broadcast(index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    # torch_scatter lets a 1-D index address dimension `dim` of a many-dimensional src.
    if index.dim() == 1:
        for _ in range(dim):
            index = index.unsqueeze(0)
    for _ in range(index.dim(), src.dim()):
        index = index.unsqueeze(-1)
    return index.expand_as(src)


def _output_size(src: torch.Tensor, index: torch.Tensor, dim: int, dim_size: int | None) -> list[int]:
    size = list(src.size())
    if dim_size is not None:
        size[dim] = int(dim_size)
    elif index.numel() == 0:
        size[dim] = 0
    else:
        size[dim] = int(index.max()) + 1
    return size


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce all values of `src` that share an `index` along `dim` (torch_scatter semantics).

    reduce: 'sum' / 'add', 'mean', 'mul', 'max', 'min'. Positions no element maps to are 0
    (1 for 'mul'); with `out` given, values are reduced into it in place, as torch_scatter does.
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"scatter: reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if dim < 0:
        dim = src.dim() + dim
    index = _broadcast(index.long(), src, dim)

    if reduce in ("sum", "add"):
        if out is None:
            out = torch.zeros(_output_size(src, index, dim, dim_size), dtype=src.dtype, device=src.device)
        return out.scatter_add_(dim, index, src)

    if reduce == "mean":
        summed = scatter(src, index, dim, out, dim_size, reduce="sum")
        ones = torch.ones(index.size(), dtype=src.dtype, device=src.device)
        count = torch.zeros(summed.size(), dtype=src.dtype, device=src.device).scatter_add_(dim, index, ones)
        # Empty groups divide 0 by 1 and so stay 0, as in torch_scatter.
        count = count.clamp(min=1)
        if summed.is_floating_point() or summed.is_complex():
            return summed.true_divide_(count)
        return summed.div_(count, rounding_mode="floor")

    if reduce == "mul":
        if out is None:
            out = torch.ones(_output_size(src, index, dim, dim_size), dtype=src.dtype, device=src.device)
        return out.scatter_reduce_(dim, index, src, reduce="prod", include_self=True)

    amode = "amax" if reduce == "max" else "amin"
    if out is None:
        # include_self=False leaves untouched positions at their initial 0.
        out = torch.zeros(_output_size(src, index, dim, dim_size), dtype=src.dtype, device=src.device)
        return out.scatter_reduce_(dim, index, src, reduce=amode, include_self=False)
    return out.scatter_reduce_(dim, index, src, reduce=amode, include_self=True)


def scatter_sum(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="sum")


def scatter_add(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="sum")


def scatter_mean(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="mean")


def scatter_mul(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="mul")


def _fallback_module() -> types.ModuleType:
    module = types.ModuleType(
        _FALLBACK_MODULE_NAME,
        "Pure-torch stand-in for torch_scatter registered by pipeline.data.scatter.",
    )
    for name in ("scatter", "scatter_sum", "scatter_add", "scatter_mean", "scatter_mul"):
        setattr(module, name, globals()[name])
    module.IS_PIPELINE_FALLBACK = True  # type: ignore[attr-defined]
    return module


def install_scatter_fallback() -> types.ModuleType:
    """Make `import torch_scatter` work: the real package if it imports, else this module.

    Idempotent; returns the module that `import torch_scatter` now yields.
    """
    existing = sys.modules.get(_FALLBACK_MODULE_NAME)
    if existing is not None:
        return existing
    try:
        return importlib.import_module(_FALLBACK_MODULE_NAME)
    except (ImportError, OSError):
        # OSError: an installed wheel whose compiled library does not match this torch.
        module = _fallback_module()
        sys.modules[_FALLBACK_MODULE_NAME] = module
        return module


def using_fallback() -> bool:
    """True when `torch_scatter` resolves to the pure-torch stand-in."""
    module = sys.modules.get(_FALLBACK_MODULE_NAME)
    return bool(getattr(module, "IS_PIPELINE_FALLBACK", False))
