import importlib
import importlib.metadata
import sys

import pytest
import torch

import pipeline  # noqa: F401  (stub `outdated` before wilds)
from pipeline.data import scatter as fallback


def _real_package_installed() -> bool:
    # Not importlib.util.find_spec: the fallback may already sit in sys.modules without a spec.
    try:
        importlib.metadata.distribution("torch_scatter")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _loop(src: torch.Tensor, index: torch.Tensor, n: int, reduce: str) -> torch.Tensor:
    """Reference: reduce the rows of src (along dim 0) that share an index, one group at a time."""
    out = torch.zeros((n,) + tuple(src.shape[1:]), dtype=src.dtype)
    for g in range(n):
        members = src[index == g]
        if len(members) == 0:
            continue  # torch_scatter leaves empty groups at 0
        if reduce == "sum":
            out[g] = members.sum(0)
        elif reduce == "mean":
            out[g] = members.sum(0) / len(members) if src.is_floating_point() else members.sum(0) // len(members)
        elif reduce == "max":
            out[g] = members.max(0).values
        elif reduce == "min":
            out[g] = members.min(0).values
        elif reduce == "mul":
            out[g] = members.prod(0)
    if reduce == "mul":
        counts = torch.bincount(index, minlength=n)
        out[counts == 0] = 1
    return out


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "mul"])
def test_scatter_matches_loop_with_empty_groups(reduce):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, generator=g)
    index = torch.randint(0, 7, (50,), generator=g)
    index[index == 3] = 4  # group 3 empty; groups 7..9 empty via dim_size
    got = fallback.scatter(src=src, index=index, dim_size=10, reduce=reduce)
    want = _loop(src, index, 10, reduce)
    assert got.shape == (10,)
    torch.testing.assert_close(got, want)
    assert got[3] == (1 if reduce == "mul" else 0)
    assert torch.all(got[7:] == (1 if reduce == "mul" else 0))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_scatter_broadcasts_1d_index_over_rows(reduce):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(30, 4, generator=g)
    index = torch.randint(0, 5, (30,), generator=g)
    got = fallback.scatter(src, index, dim=0, dim_size=6, reduce=reduce)
    torch.testing.assert_close(got, _loop(src, index, 6, reduce))


def test_scatter_defaults_last_dim_size_from_index_and_integer_mean():
    src = torch.tensor([[1, 2, 3, 4, 5]])
    index = torch.tensor([0, 0, 2, 2, 2])
    assert fallback.scatter(src, index).tolist() == [[3, 0, 12]]  # dim=-1, size max+1
    assert fallback.scatter(src, index, reduce="mean").tolist() == [[1, 0, 4]]  # floor division


def test_scatter_into_out():
    out = torch.ones(3)
    fallback.scatter(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 2]), out=out, reduce="sum")
    assert out.tolist() == [4.0, 1.0, 4.0]


def test_scatter_rejects_unknown_reduce():
    with pytest.raises(ValueError, match="reduce"):
        fallback.scatter(torch.ones(2), torch.zeros(2, dtype=torch.long), reduce="median")


def test_wilds_avg_over_groups_uses_fallback(monkeypatch):
    """wilds' group-wise eval helper gives the loop's numbers through the fallback module."""
    from wilds.common.utils import avg_over_groups

    monkeypatch.setitem(sys.modules, "torch_scatter", fallback._fallback_module())
    v = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    grp = torch.tensor([0, 0, 2, 2, 2, 4])
    avgs, counts = avg_over_groups(v, grp, 6)
    torch.testing.assert_close(avgs, torch.tensor([0.5, 0.0, 2 / 3, 0.0, 0.0, 0.0]))
    assert counts.tolist() == [2.0, 0.0, 3.0, 0.0, 1.0, 0.0]


def test_install_is_idempotent_and_importable(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_scatter", raising=False)
    first = fallback.install_scatter_fallback()
    assert fallback.install_scatter_fallback() is first
    import torch_scatter

    assert torch_scatter is first
    if not _real_package_installed():
        assert fallback.using_fallback()


@pytest.mark.skipif(not _real_package_installed(), reason="real torch_scatter not installed")
@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min"])
def test_fallback_matches_real_torch_scatter(reduce, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_scatter", raising=False)
    real = importlib.import_module("torch_scatter")
    g = torch.Generator().manual_seed(2)
    src = torch.randn(40, 3, generator=g)
    index = torch.randint(0, 6, (40,), generator=g)
    torch.testing.assert_close(
        fallback.scatter(src, index, dim=0, dim_size=8, reduce=reduce),
        real.scatter(src, index, dim=0, dim_size=8, reduce=reduce),
    )
