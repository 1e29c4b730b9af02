"""The trainer's two off-by-default options: SWA (the average equals the mean of the snapshots
taken at the averaging steps, survives a resume, refuses methods it cannot apply to) and
group-balanced batches (uniform over groups in expectation on a skewed set, deterministic,
and the default plan untouched when off)."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.config import ParamsError, TrainParams
from pipeline.methods import METHODS
from pipeline.methods.base import trainable
from pipeline.training.train import balanced_plan, batch_plan, fit, swa_steps

from .methods_fixtures import context, single_thread  # noqa: F401

CPU = torch.device("cpu")
SKEWED = torch.tensor([0] * 90 + [1] * 9 + [2])  # groups of sizes 90 / 9 / 1


def _weights(m) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(m.root)}


# ---- SWA ----------------------------------------------------------------------------------


def test_swa_steps_end_at_the_last_step():
    assert swa_steps(10, 0.0) == []                      # off
    assert swa_steps(10, 0.75) == [8, 9, 10]             # after floor(7.5) = 7 steps
    assert swa_steps(6, 0.5, every=2) == [4, 6]
    assert swa_steps(5, 0.9, every=3) == [5]             # always the last step, at least one


def test_swa_average_is_the_mean_of_the_snapshots():
    """Snapshots of the trainable parameters at the averaging steps (taken through the `log`
    callback, which runs after each optimiser step), averaged by hand, equal the saved state."""
    steps, start, every = 7, 0.4, 2
    at = swa_steps(steps, start, every)
    assert at == [3, 5, 7]
    ctx = context()
    m = METHODS["ft"](METHODS["ft"].Hparams(lr=1e-3, warmup_steps=0), ctx)
    snaps = []
    result = fit(m, ctx.train_set, steps=steps, batch_size=6, seed=0, device=CPU, progress=False,
                 swa_start=start, swa_every=every,
                 log=lambda step, rec: snaps.append(_weights(m)) if step in at else None)
    assert result.swa_count == len(snaps) == 3
    state = m.trained_state()
    last = snaps[-1]
    assert set(last) <= set(state)
    moved = 0
    for k in last:
        mean = torch.stack([s[k] for s in snaps]).mean(0)
        torch.testing.assert_close(state[k], mean, rtol=1e-5, atol=1e-7)
        moved += not torch.equal(state[k], last[k])
    assert moved > 0, "the average equals the last weights: nothing was averaged"


class _Stop(Exception):
    pass


def _stop_at(step_to_stop: int):
    def log(step, rec):
        if step == step_to_stop:
            raise _Stop

    return log


def test_swa_and_balanced_batches_resume_to_the_same_weights(tmp_path):
    """A run stopped after a checkpoint inside the averaging phase and resumed ends with the
    weights of an uninterrupted run (the SWA mean and its count are in the checkpoint)."""
    kw = dict(steps=8, batch_size=6, seed=3, device=CPU, progress=False, swa_start=0.25, swa_every=1,
              groups=torch.tensor([0] * 9 + [1] * 2 + [2]))

    def method():
        ctx = context()
        return METHODS["ft"](METHODS["ft"].Hparams(lr=1e-3, warmup_steps=0), ctx), ctx

    ref, ctx = method()
    fit(ref, ctx.train_set, **kw)
    m, ctx = method()
    with pytest.raises(_Stop):
        fit(m, ctx.train_set, checkpoint_dir=tmp_path, checkpoint_every=4, log=_stop_at(5), **kw)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["swa"]["count"] == 2  # steps 3 and 4 averaged
    m, ctx = method()
    result = fit(m, ctx.train_set, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    assert result.resumed_from == 4 and result.swa_count == 6
    a, b = ref.trained_state(), m.trained_state()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class NotWeightSpaceFT(METHODS["ft"]):
    name = "not_weight_space_ft"
    weight_space = False


class BatchNormFT(METHODS["ft"]):
    def setup(self) -> None:
        super().setup()
        self.extra["bn"] = nn.BatchNorm1d(4)


@pytest.mark.parametrize("cls, fragment", [
    (NotWeightSpaceFT, "not_weight_space_ft is not a weight-space method"),
    (METHODS["radapter"], "radapter saves something else"),
    (METHODS["model_stock"], "model_stock trains 2 and combines them"),
    (BatchNormFT, "BatchNorm layers .*extra.bn"),
])
def test_swa_refuses_methods_it_cannot_apply_to_before_any_step(cls, fragment):
    ctx = context()
    m = cls(cls.Hparams(), ctx)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    logged = []
    with pytest.raises(ValueError, match=rf"^finetune\.train\.swa_start: .*{fragment}"):
        fit(m, ctx.train_set, steps=3, batch_size=6, seed=0, device=CPU, progress=False, swa_start=0.5,
            log=lambda step, rec: logged.append(step))
    assert logged == []
    assert all(torch.equal(p, before[n]) for n, p in ctx.model.named_parameters())


def test_check_refuses_swa_for_a_method_it_cannot_apply_to():
    from pipeline.stages.check import check_swa

    params = SimpleNamespace(finetune=SimpleNamespace(methods=("lp", "ft"), train=TrainParams(swa_start=0.75)))
    check_swa(params, METHODS)  # the default methods are weight-space
    with pytest.raises(ParamsError, match=r"^finetune\.train\.swa_start: 0\.75 is not allowed; .*"
                                          r"not a weight-space method.*remove ft from finetune\.methods"):
        check_swa(params, {**METHODS, "ft": NotWeightSpaceFT})
    stock = SimpleNamespace(finetune=SimpleNamespace(methods=("ft", "model_stock"), train=TrainParams(swa_start=0.75)))
    with pytest.raises(ParamsError, match=r"^finetune\.train\.swa_start: .*model_stock trains 2.*"
                                          r"remove model_stock from finetune\.methods"):
        check_swa(stock, METHODS)
    off = SimpleNamespace(finetune=SimpleNamespace(methods=("ft",), train=TrainParams()))
    check_swa(off, {**METHODS, "ft": NotWeightSpaceFT})  # off: nothing to refuse


def test_check_stage_refuses_swa_with_radapter(tmp_path):
    import yaml

    from pipeline.stages.check import check_params

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    data["finetune"]["methods"] = ["ft", "radapter"]
    data["finetune"]["trials"] = {"ft-a": {"method": "ft"}, "radapter-a": {"method": "radapter"}}
    data["finetune"]["search"] = {}
    data["finetune"]["train"]["swa_start"] = 0.75
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"^finetune\.train\.swa_start: .*radapter"):
        check_params(path)


@pytest.mark.parametrize("key, value, fragment", [
    ("swa_start", 1.0, "in \\(0, 1\\)"), ("swa_start", -0.1, "0 \\(off\\)"), ("swa_every", 0, "positive"),
    ("group_balanced", 1, "true/false"),
])
def test_bad_option_values_name_the_key(key, value, fragment):
    from pipeline.core.validation import parse

    with pytest.raises(ParamsError, match=rf"^finetune\.train\.{key}: .*{fragment}"):
        parse(TrainParams, {key: value}, "finetune.train")


def test_both_options_are_off_by_default():
    tp = TrainParams()
    assert tp.swa_start == 0.0 and tp.group_balanced is False


# ---- group-balanced batches -----------------------------------------------------------------


def test_balanced_batches_are_uniform_over_groups_in_expectation():
    """Groups of 90, 9 and 1 samples: each draw lands in group g with probability 1/3. Over N
    draws the count of g is Binomial(N, 1/3), standard deviation sqrt(N·(1/3)·(2/3)); the
    frequencies must lie within 5 of them of 1/3 (a false alarm has probability < 1e-6 per
    group), where the default plan gives 0.90 / 0.09 / 0.01."""
    steps, batch = 300, 32
    plan = balanced_plan(SKEWED, batch, steps, seed=0)
    assert [len(b) for b in plan] == [batch] * steps
    n_draws = steps * batch
    freq = torch.bincount(SKEWED[torch.tensor(plan).flatten()], minlength=3).double() / n_draws
    tol = 5 * math.sqrt((1 / 3) * (2 / 3) / n_draws)
    assert tol < 0.03
    assert torch.all((freq - 1 / 3).abs() < tol), freq
    # within a group every sample is equally likely: group 1's 9 samples share its third
    counts = torch.bincount(torch.tensor(plan).flatten(), minlength=100)[90:99].double()
    expected = n_draws / 3 / 9
    assert torch.all((counts - expected).abs() < 5 * math.sqrt(expected)), counts
    # with replacement: the one sample of group 2 fills a third of every batch on average
    assert max(b.count(99) for b in plan) > 1
    default = torch.bincount(SKEWED[torch.tensor(batch_plan(100, batch, steps, seed=0)).flatten()], minlength=3)
    assert default[2] / n_draws < 0.02


def test_balanced_batches_are_deterministic_and_follow_the_batch_rule():
    assert balanced_plan(SKEWED, 32, 20, seed=4) == balanced_plan(SKEWED, 32, 20, seed=4)
    assert balanced_plan(SKEWED, 32, 20, seed=4) != balanced_plan(SKEWED, 32, 20, seed=5)
    # a step's batch does not depend on the length of the run (resume replays it)
    assert balanced_plan(SKEWED, 32, 30, seed=4)[:20] == balanced_plan(SKEWED, 32, 20, seed=4)
    # DDP: the batch is rounded down to a multiple of the processes, as batch_plan's
    assert {len(b) for b in balanced_plan(SKEWED, 30, 5, seed=0, multiple=4)} == {28}
    assert {len(b) for b in balanced_plan(SKEWED[:10], 32, 5, seed=0)} == {10}  # min(B, n)
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        balanced_plan(SKEWED[:3], 8, 1, seed=0, multiple=4)


class RecordingLP(METHODS["lp"]):
    """LP that records the sample indices of every batch it is given."""

    seen: list

    def loss(self, batch, step):
        self.seen.append(batch["index"].tolist())
        return super().loss(batch, step)


@pytest.mark.parametrize("balanced", [False, True])
def test_fit_trains_on_the_plan_of_its_option(balanced):
    """Off (groups=None): exactly `batch_plan`'s batches, the trainer as before; on: the
    balanced plan of the groups passed in."""
    ctx = context()
    m = RecordingLP(RecordingLP.Hparams(), ctx)
    m.seen = []
    groups = torch.tensor([0] * 9 + [1] * 2 + [2]) if balanced else None
    fit(m, ctx.train_set, steps=5, batch_size=6, seed=2, device=CPU, progress=False, groups=groups)
    want = balanced_plan(groups, 6, 5, seed=2) if balanced else batch_plan(12, 6, 5, seed=2)
    assert m.seen == want
    if balanced:
        assert m.seen != batch_plan(12, 6, 5, seed=2)


@pytest.mark.parametrize("balanced", [False, True])
def test_lpft_probe_phase_draws_the_batches_of_the_option(balanced):
    """LP-FT's inner LP phase runs through the same trainer with the context's groups
    (`TaskContext.train_groups`, what finetune.train.group_balanced sets): balanced batches
    when on, the plain epochs when off."""
    ctx = context()
    ctx.train_groups = torch.tensor([0] * 9 + [1] * 2 + [2]) if balanced else None
    seen = []

    def recording_fit(method, *args, **kwargs):
        loss = method.loss
        method.loss = lambda batch, step: (seen.append(batch["index"].tolist()), loss(batch, step))[1]
        return fit(method, *args, **kwargs)

    ctx.fit = recording_fit
    hp = METHODS["lpft"].Hparams(lp_steps=4, lp_batch_size=6)
    METHODS["lpft"](hp, ctx).setup()  # the LP phase runs here
    want = (balanced_plan(ctx.train_groups, 6, 4, seed=ctx.seed) if balanced
            else batch_plan(12, 6, 4, seed=ctx.seed))
    assert seen == want


def test_domain_groups_follow_the_wilds_grouper():
    """The dataset's domain grouper (wilds' CombinatorialGrouper over DatasetSpec.domain_fields)
    on a minimal WILDS-like dataset: one group per domain, or per (background, y) pair."""
    from pipeline.data.datasets import DATASETS, domain_groups

    meta = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [0, 0], [2, 1]])
    ds = SimpleNamespace(metadata_fields=["domain", "y"], metadata_array=meta,
                         metadata_map={"domain": ["a", "b", "c"], "y": ["p", "q"]})
    rows = [5, 0, 4, 1]
    assert domain_groups(ds, ("domain",), rows).tolist() == [2, 0, 0, 1]
    pairs = domain_groups(ds, ("domain", "y"), range(6)).tolist()
    assert len(set(pairs)) == 5 and pairs[0] == pairs[4]
    with pytest.raises(ValueError, match=r"domain fields \['location'\] are not metadata fields"):
        domain_groups(ds, ("location",), rows)
    assert DATASETS["synthetic"].domain_fields == ("domain",)
    assert DATASETS["waterbirds"].domain_fields == ("background", "y")
