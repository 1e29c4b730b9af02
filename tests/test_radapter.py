"""R-Adapter: placement, exact re-parameterisation, per-sample dropping, accumulation."""

from __future__ import annotations

import pipeline  # noqa: F401
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.radapter import Adapter, RAdapter, RAdapterHparams, adapter_sites, reparameterise
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

N_BLOCKS = mf.CONFIG["vision_cfg"]["layers"] + mf.CONFIG["text_cfg"]["layers"]


def randomised(rank, seed=0, **hp) -> RAdapter:
    """An R-Adapter on the tiny model with random non-zero adapters and EMA copies."""
    method = RAdapter(RAdapterHparams(rank=rank, **hp), mf.context())
    method.setup()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            for adapter in method.extra["adapters"].values():
                for p in adapter.own_params().values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            method.after_step(0)
    return method


def outputs(model, x, tokens):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tokens)


def test_sites_cover_both_towers_after_out_proj_and_c_proj():
    model = mf.fresh_model()
    sites = adapter_sites(model)
    assert len(sites) == 2 * N_BLOCKS
    linears = {s.linear for s in sites}
    for tower, n, width in (("visual.transformer", mf.CONFIG["vision_cfg"]["layers"], 48),
                            ("transformer", mf.CONFIG["text_cfg"]["layers"], 32)):
        for i in range(n):
            assert f"{tower}.resblocks.{i}.attn.out_proj" in linears
            assert f"{tower}.resblocks.{i}.mlp.c_proj" in linears
    assert {s.width for s in sites} == {48, 32}
    # open_clip 3.3 runs both towers batch-first; the drop mask follows the flag
    assert {s.batch_dim for s in sites} == {0}


def test_zero_init_adapters_leave_the_model_unchanged():
    model = mf.fresh_model()
    model.requires_grad_(False)  # as setup leaves it: torch picks attention kernels by it
    x, tok = mf.images(3), mf.class_tokens()[:, 0]
    before = outputs(model, x, tok)
    method = RAdapter(RAdapterHparams(), mf.context(model))
    method.setup()
    model.eval()
    for a, b in zip(before, outputs(model, x, tok)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, None, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_merged_equals_unmerged(rank, alpha):
    method = randomised(rank)
    if rank == 4:
        assert all(a.low_rank and a.up.shape[1] == 4 for a in method.extra["adapters"].values())
    else:
        assert not any(a.low_rank for a in method.extra["adapters"].values())
    for a in method.extra["adapters"].values():
        a.eval_scale = alpha * method.hp.rescale  # the live model at the sweep's α
    live = method.live_eval_model().eval()
    merged = RAdapter.eval_model(mf.fresh_model(), method.trained_state(), method.hp,
                                 mf.zeroshot_head(mf.fresh_model()), alpha=alpha).eval()
    x, tok = mf.images(4, seed=2), mf.class_tokens()[:, 1]
    pre = outputs(mf.fresh_model(), x, tok)
    for got, want, p in zip(outputs(merged.model, x, tok), outputs(live.model, x, tok), pre):
        assert (want - p).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the merged model is a plain open_clip model: same keys, no hooks
    assert set(merged.model.state_dict()) == set(mf.fresh_model().state_dict())
    assert not any(m._forward_hooks for m in merged.model.modules())


def test_alpha_zero_merge_is_the_pretrained_model():
    method = randomised(0)
    merged = RAdapter.eval_model(mf.fresh_model(), method.trained_state(), method.hp,
                                 mf.zeroshot_head(mf.fresh_model()), alpha=0.0)
    pre = mf.fresh_model().state_dict()
    for k, v in merged.model.state_dict().items():
        assert torch.equal(v, pre[k]), k


def test_reparameterise_is_exact_on_a_linear_layer():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(7, 5)
    fmap, c = torch.randn(5, 5, generator=g), 0.37
    x = torch.randn(3, 7, generator=g)
    y = lin(x)
    w, b = reparameterise(lin.weight, lin.bias, fmap, c)
    torch.testing.assert_close(F.linear(x, w, b), y + c * y @ fmap.t(), rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_only_the_accumulated_adapter_weights():
    method = randomised(4)
    state = method.trained_state()
    for key, a in method.extra["adapters"].items():
        for n in ("up", "down", "sigma"):
            torch.testing.assert_close(state[f"extra.adapters.{key}.{n}"], a.averaged()[n])
    assert all(k.startswith("extra.adapters.") and k.rsplit(".", 1)[1] in ("up", "down", "sigma")
               for k in state)


def test_trained_run_only_moves_adapters_and_merges():
    """A few real steps (MPM-NCE, drop, EMA) then the merge agrees with the live model."""
    model = mf.fresh_model()
    before = mf.snapshot(model)
    method = RAdapter(RAdapterHparams(lr=1e-2, rank=4), mf.context(model))
    fit(method, method.ctx.train_set, steps=4, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(int(a.ema_steps) == 4 for a in method.extra["adapters"].values())
    live = method.live_eval_model().eval()
    merged = RAdapter.eval_model(mf.fresh_model(), method.trained_state(), method.hp,
                                 mf.zeroshot_head(model), alpha=1.0).eval()
    x, tok = mf.images(3, seed=4), mf.class_tokens()[:, 0]
    for got, want in zip(outputs(merged.model, x, tok), outputs(live.model, x, tok)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- adapter dropping ---------------------------------------------------------------------


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_drop_is_per_sample_rescaled_and_off_in_eval(batch_dim):
    torch.manual_seed(0)
    p, d = 0.5, 6
    adapter = Adapter(d, rank=0, sigma_init=1.0, drop=p, momentum=0.0)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(d))  # F y = y: the branch is visible directly
    n, length = 64, 5
    y = torch.randn(n, length, d) if batch_dim == 0 else torch.randn(length, n, d)
    out = adapter.adapt(y, batch_dim, training=True)
    branch = (out - y) / y  # per element: 0 (dropped) or 1/(1−p) (kept)
    per_sample = branch.movedim(batch_dim, 0).reshape(n, -1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5), \
        "the drop mask must be constant over the tokens and channels of a sample"
    values = per_sample[:, 0]
    assert set(torch.round(values, decimals=4).tolist()) <= {0.0, round(1 / (1 - p), 4)}
    assert 0 < int((values == 0).sum()) < n
    # eval: deterministic, no drop, the re-scaled branch α·σ̃·F̃ y (EMA with m = 0 and no
    # step: the live weights)
    adapter.eval_scale = 0.5
    ev1 = adapter.adapt(y, batch_dim, training=False)
    ev2 = adapter.adapt(y, batch_dim, training=False)
    torch.testing.assert_close(ev1, ev2, rtol=0, atol=0)
    torch.testing.assert_close(ev1, y + 0.5 * y)


def test_drop_zero_is_deterministic():
    adapter = Adapter(4, rank=0, sigma_init=0.3, drop=0.0)
    with torch.no_grad():
        adapter.weight.normal_()
    y = torch.randn(8, 3, 4)
    torch.testing.assert_close(adapter.adapt(y, 0, True), y + 0.3 * y @ adapter.weight.detach().t())


def test_model_eval_mode_switches_off_drop():
    method = randomised(0, drop=0.9)
    model = method.ctx.model
    x = mf.images(4, seed=5)
    model.train()
    torch.manual_seed(0)
    a = model.encode_image(x).detach()
    torch.manual_seed(1)
    b = model.encode_image(x).detach()
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.encode_image(x), model.encode_image(x), rtol=0, atol=0)


# ---- accumulation -------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.999])
def test_ema_update(momentum, bias_correction):
    adapter = Adapter(3, rank=2, sigma_init=0.1, momentum=momentum, bias_correction=bias_correction)
    init = {n: p.detach().clone() for n, p in adapter.own_params().items()}
    zero_start = {n: torch.zeros_like(v) for n, v in init.items()}
    ema = zero_start if bias_correction else {n: v.clone() for n, v in init.items()}
    g = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        with torch.no_grad():
            for n, p in adapter.own_params().items():
                p.add_(torch.randn(p.shape, generator=g))
        adapter.update_ema()
        for n, p in adapter.own_params().items():
            ema[n] = momentum * ema[n] + (1 - momentum) * p.detach()
        norm = 1 - momentum ** t if bias_correction else 1.0
        for n, v in adapter.averaged().items():
            torch.testing.assert_close(v, ema[n] / norm, rtol=1e-5, atol=1e-6)
    if momentum == 0.0:  # accumulation off: the last weights
        for n, p in adapter.own_params().items():
            torch.testing.assert_close(adapter.averaged()[n], p.detach())


def test_bias_corrected_ema_of_a_constant_is_the_constant():
    adapter = Adapter(2, rank=0, sigma_init=0.1, momentum=0.999)
    with torch.no_grad():
        adapter.weight.fill_(0.5)
    for _ in range(3):
        adapter.update_ema()
    torch.testing.assert_close(adapter.averaged()["weight"], torch.full((2, 2), 0.5))
    torch.testing.assert_close(adapter.averaged()["sigma"], torch.tensor(0.1))


def test_low_rank_switch_is_not_inverted():
    assert Adapter(8, rank=3).low_rank
    assert not Adapter(8, rank=0).low_rank
    assert not Adapter(8, rank=None).low_rank
    assert not Adapter(8, rank=8).low_rank  # r >= d: full rank is the same map, fewer weights
    a = Adapter(8, rank=3)
    assert a.up.shape == (8, 3) and a.down.shape == (3, 8)
    assert torch.count_nonzero(a.up) == 0 and torch.count_nonzero(a.down) > 0


@pytest.mark.parametrize("bad", [{"rank": -1}, {"drop": 1.0}, {"ema_momentum": 1.0},
                                 {"loss": "nce"}, {"tau": 0.0}, {"rescale": -0.1}])
def test_hparams_reject_bad_values(bad):
    with pytest.raises(ValueError):
        RAdapterHparams(**bad)


@pytest.mark.parametrize("loss,key", [("mpm_nce", "mpm_nce_loss"), ("clip", "clip_loss"), ("ce", "ce_loss")])
def test_loss_switches(loss, key):
    method = RAdapter(RAdapterHparams(loss=loss), mf.context())
    res = fit(method, method.ctx.train_set, steps=1, batch_size=6, seed=0, device=torch.device("cpu"),
              progress=False)
    assert set(res.history[0]) >= {key}
    assert torch.isfinite(torch.tensor(res.history[0][key]))


def test_resume_restores_the_accumulation(tmp_path):
    """A run resumed from the trainer's checkpoint ends with the same EMA as an
    uninterrupted one (the EMA copies and step counts are method buffers)."""
    def run(ckpt=None):
        torch.manual_seed(0)  # the stage seeds before setup (the low-rank D is drawn there)
        method = RAdapter(RAdapterHparams(lr=1e-2, rank=4, ema_momentum=0.9), mf.context())
        fit(method, method.ctx.train_set, steps=4, batch_size=6, seed=0, device=torch.device("cpu"),
            progress=False, checkpoint_dir=ckpt, checkpoint_every=2)
        return method.trained_state()

    full = run()
    run(tmp_path)  # leaves the step-2 checkpoint behind (as a killed run would)
    assert (tmp_path / "last.pt").exists()
    resumed = run(tmp_path)
    assert set(resumed) == set(full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
