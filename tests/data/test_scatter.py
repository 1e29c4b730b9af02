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


# The real package's outputs, frozen: the forward cases of torch_scatter 2.1's own test suite
# (rusty1s/pytorch_scatter, test/test_scatter.py, `tests`, which its CI checks against the
# compiled kernels for every dtype; read at commit 11dc98c). The package has no wheel on PyPI
# (source only, a long compile), so it cannot run here. Per case: src, index, dim, then the
# expected output of each reduction (empty groups 0, or 1 for mul; an integer mean floors).
TORCH_SCATTER_TABLE = [
    ([1, 3, 2, 4, 5, 6], [0, 1, 0, 1, 1, 3], -1,
     {"sum": [3, 12, 0, 6], "mul": [2, 60, 1, 6], "mean": [1.5, 4, 0, 6],
      "min": [1, 3, 0, 6], "max": [2, 5, 0, 6]}),
    ([[1, 2], [5, 6], [3, 4], [7, 8], [9, 10], [11, 12]], [0, 1, 0, 1, 1, 3], 0,
     {"sum": [[4, 6], [21, 24], [0, 0], [11, 12]], "mul": [[3, 8], [315, 480], [1, 1], [11, 12]],
      "mean": [[2, 3], [7, 8], [0, 0], [11, 12]], "min": [[1, 2], [5, 6], [0, 0], [11, 12]],
      "max": [[3, 4], [9, 10], [0, 0], [11, 12]]}),
    ([[1, 5, 3, 7, 9, 11], [2, 4, 8, 6, 10, 12]], [[0, 1, 0, 1, 1, 3], [0, 0, 1, 0, 1, 2]], 1,
     {"sum": [[4, 21, 0, 11], [12, 18, 12, 0]], "mul": [[3, 315, 1, 11], [48, 80, 12, 1]],
      "mean": [[2, 7, 0, 11], [4, 9, 12, 0]], "min": [[1, 5, 0, 11], [2, 8, 12, 0]],
      "max": [[3, 9, 0, 11], [6, 10, 12, 0]]}),
    ([[[1, 2], [5, 6], [3, 4]], [[10, 11], [7, 9], [12, 13]]], [[0, 1, 0], [2, 0, 2]], 1,
     {"sum": [[[4, 6], [5, 6], [0, 0]], [[7, 9], [0, 0], [22, 24]]],
      "mul": [[[3, 8], [5, 6], [1, 1]], [[7, 9], [1, 1], [120, 143]]],
      "mean": [[[2, 3], [5, 6], [0, 0]], [[7, 9], [0, 0], [11, 12]]],
      "min": [[[1, 2], [5, 6], [0, 0]], [[7, 9], [0, 0], [10, 11]]],
      "max": [[[3, 4], [5, 6], [0, 0]], [[7, 9], [0, 0], [12, 13]]]}),
    ([[1, 3], [2, 4]], [[0, 0], [0, 0]], 1,
     {"sum": [[4], [6]], "mul": [[3], [8]], "mean": [[2], [3]], "min": [[1], [2]], "max": [[3], [4]]}),
    ([[[1, 1], [3, 3]], [[2, 2], [4, 4]]], [[0, 0], [0, 0]], 1,
     {"sum": [[[4, 4]], [[6, 6]]], "mul": [[[3, 3]], [[8, 8]]], "mean": [[[2, 2]], [[3, 3]]],
      "min": [[[1, 1]], [[2, 2]]], "max": [[[3, 3]], [[4, 4]]]}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64], ids=["float32", "int64"])
@pytest.mark.parametrize("reduce", ["sum", "add", "mean", "mul", "max", "min"])
@pytest.mark.parametrize("case", range(len(TORCH_SCATTER_TABLE)))
def test_fallback_gives_the_real_torch_scatters_outputs(case, reduce, dtype):
    src, index, dim, outputs = TORCH_SCATTER_TABLE[case]
    src, index = torch.tensor(src, dtype=dtype), torch.tensor(index)
    want = torch.tensor(outputs["sum" if reduce == "add" else reduce], dtype=dtype)
    got = fallback.scatter(src, index, dim, reduce=reduce)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if reduce in ("sum", "mean", "mul"):  # the named functions wilds may call
        torch.testing.assert_close(getattr(fallback, f"scatter_{reduce}")(src, index, dim), want, rtol=0, atol=0)


@pytest.mark.parametrize("reduce", ["sum", "max", "min"])
@pytest.mark.parametrize("case", range(len(TORCH_SCATTER_TABLE)))
def test_fallback_reduces_into_out_as_the_real_torch_scatter(case, reduce):
    """The same suite's `out=` expectations (out filled with -2 beforehand): sum adds to it,
    max keeps -2 where no element lands, min keeps -2 everywhere (every value here is > -2)."""
    src, index, dim, outputs = TORCH_SCATTER_TABLE[case]
    src, index = torch.tensor(src, dtype=torch.float32), torch.tensor(index)
    want = torch.tensor(outputs[reduce], dtype=torch.float32)
    out = torch.full_like(want, -2)
    fallback.scatter(src, index, dim, out=out, reduce=reduce)
    if reduce == "sum":
        want = want - 2
    elif reduce == "min":
        want = want.fill_(-2)
    else:
        want[want == 0] = -2
    torch.testing.assert_close(out, want, rtol=0, atol=0)
