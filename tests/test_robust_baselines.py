"""The robust fine-tuning baselines of issue 28 (reference/baselines.md): each loss against an
independent implementation of its formula written here (loops over rows, plain math, several
shapes, 1e-5), and the properties the issue names (SnD's single-task coefficient, the shared
reference sampler, ...). The method contract (a few trainer steps, what trains, the checkpoint
round trip) is tests/test_methods.py's, for every registered method."""

from __future__ import annotations

import math

import pipeline  # noqa: F401
import pytest
import torch

from pipeline.methods.dive import DiVE, DiVEHparams
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

SHAPES = [(1, 4), (5, 8), (16, 32)]


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def clip_loss_by_rows(f: torch.Tensor, g: torch.Tensor, s: float) -> float:
    """Symmetric InfoNCE written out per row: ½ mean_i[−log softmax_j(s f_i·g_j)_i] + the same
    for texts."""
    n = f.shape[0]
    total = 0.0
    for i in range(n):
        img = [s * float(f[i] @ g[j]) for j in range(n)]
        txt = [s * float(g[i] @ f[j]) for j in range(n)]
        total += -(img[i] - math.log(sum(math.exp(v) for v in img)))
        total += -(txt[i] - math.log(sum(math.exp(v) for v in txt)))
    return total / (2 * n)


# ---- FLYP+replay ---------------------------------------------------------------------------


def replay_method(seed: int = 0, **hp):
    from pipeline.methods.flyp_replay import FLYPReplay

    model = mf.fresh_model()
    ctx = mf.context(model, seed=seed, reference=True)
    method = FLYPReplay(FLYPReplay.Hparams(**hp), ctx)
    method.setup()
    return method


@pytest.mark.parametrize("seed", [0, 3])
def test_replay_draws_dives_reference_rows(seed):
    """Same seed, same step: FLYP+replay, SnD and DiVE embed the same reference rows."""
    from pipeline.methods.snd import SnD

    replay = replay_method(seed, ref_batch_size=4)
    dive = DiVE(DiVEHparams(ref_batch_size=4), mf.context(mf.fresh_model(), seed=seed, reference=True))
    snd = SnD(SnD.Hparams(ref_batch_size=4), mf.context(mf.fresh_model(), seed=seed, reference=True))
    for step in range(5):
        rows, size = replay.reference_rows(step)
        assert size == 4
        assert torch.equal(rows, dive.reference_rows(step)[0])
        assert torch.equal(rows, snd.reference_rows(step)[0])
    assert not all(torch.equal(replay.reference_rows(0)[0], replay.reference_rows(s)[0]) for s in range(1, 5))


@pytest.mark.parametrize("lam_r,ref", [(1.0, 4), (0.3, 6), (2.0, 1)])
def test_replay_loss_is_flyp_plus_lambda_clip_on_the_reference_batch(lam_r, ref):
    """The loss terms against an independent computation: FLYP's InfoNCE over the target rows
    with the sampled templates, and λ_r times a separate InfoNCE over the step's reference
    pairs (the model's own scale), by rows."""
    method = replay_method(lam_r=lam_r, ref_batch_size=ref)
    ctx = method.ctx
    model = ctx.model
    batch = {"image": mf.images(5, seed=2), "y": torch.tensor([0, 1, 2, 0, 1])}
    step = 3
    torch.manual_seed(11)
    terms = method.loss(batch, step)
    assert set(terms) == {"flyp_loss", "replay_loss"}

    s = float(model.logit_scale.exp().detach())
    with torch.no_grad():
        torch.manual_seed(11)  # the same template draw as the method's
        pick = torch.randint(ctx.class_tokens.shape[1], (5,))
        tokens = ctx.class_tokens[batch["y"], pick]
        norm = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
        f = norm(model.encode_image(batch["image"]).double())
        g = norm(model.encode_text(tokens).double())
        rows = DiVE.reference_rows(method, step)[0]
        x_ref = torch.stack([ctx.reference.images[int(j)] for j in rows])
        f_ref = norm(model.encode_image(x_ref).double())
        g_ref = norm(model.encode_text(ctx.reference.tokens[rows]).double())
    assert float(terms["flyp_loss"].detach()) == pytest.approx(clip_loss_by_rows(f, g, s), abs=1e-5)
    assert float(terms["replay_loss"].detach()) == pytest.approx(lam_r * clip_loss_by_rows(f_ref, g_ref, s), abs=1e-5)


@pytest.mark.parametrize("name,term", [("flyp_replay", "replay_loss"), ("snd", "distill_loss")])
def test_reference_term_once_per_step_under_grad_accum(name, term):
    """A later micro-batch of a step carries no reference term; the first carries it times
    the micro-batch count (the trainer divides each micro-batch's loss by the count)."""
    from pipeline.methods import METHODS
    from pipeline.methods.base import MicroBatch

    cls = METHODS[name]
    model = mf.fresh_model()
    ctx = mf.context(model, reference=True)  # the cached f_0 of the pre-trained weights
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # away from θ_0, so that SnD's distillation is not ~0
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    method = cls(cls.Hparams(ref_batch_size=4), ctx)
    method.setup()
    batch = {"image": mf.images(3, seed=2), "y": torch.tensor([0, 1, 2])}
    one = float(method.loss(batch, 1)[term].detach())
    assert one > 1e-6
    method.micro = MicroBatch(0, 3)
    assert float(method.loss(batch, 1)[term].detach()) == pytest.approx(3 * one, rel=1e-6)
    method.micro = MicroBatch(2, 3)
    assert float(method.loss(batch, 1)[term].detach()) == 0.0


# ---- SnD -----------------------------------------------------------------------------------


def snd_by_rows(f, f0, fp, r_prev, r_pre, kappa, tau) -> float:
    n = f.shape[0]
    prev = pre = 0.0
    for i in range(n):
        w = 1 / (1 + math.exp(-kappa * (math.sqrt(float(((f0[i] - fp[i]) ** 2).sum())) - tau)))
        prev += w * float(((f[i] - fp[i]) ** 2).sum())
        pre += (1 - w) * float(((f[i] - f0[i]) ** 2).sum())
    return r_prev * prev / n + r_pre * pre / n


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("hp", [(9.0, 0.5, 6.0, 0.2), (1.0, 2.0, 3.0, 0.7)])
def test_snd_distill_loss_matches_its_formula(n, d, hp):
    """General form, distinct teachers (per-sample weights, not their batch mean)."""
    from pipeline.methods.snd import snd_distill_loss

    f, f0, fp = unit_rows(n, d, 1), unit_rows(n, d, 2), unit_rows(n, d, 3)
    got = float(snd_distill_loss(f, f0, fp, *hp))
    assert got == pytest.approx(snd_by_rows(f, f0, fp, *hp), abs=1e-5)


def test_snd_single_task_coefficient_is_2_468():
    """With f_prev = f_0 every w_i = σ(−κτ) and the regulariser is 2.468 · mean ‖f − f_0‖²:
    the coefficient computed from the defaults, and the general loss with equal teachers."""
    from pipeline.methods.snd import SnDHparams, single_task_coefficient, snd_distill_loss

    hp = SnDHparams()
    c = single_task_coefficient(hp)
    assert c == pytest.approx(2.468, abs=5e-4)
    f, f0 = unit_rows(7, 16, 4), unit_rows(7, 16, 5)
    got = float(snd_distill_loss(f, f0, f0, hp.r_prev, hp.r_pre, hp.kappa, hp.tau))
    assert got == pytest.approx(2.468 * float(((f - f0) ** 2).sum(1).mean()), rel=2e-4)


def test_snd_loss_terms():
    """CE over the frozen scaled zero-shot head plus the distillation to the cached f_0 on the
    step's reference rows (f_prev = f_0), computed independently."""
    from pipeline.methods.snd import SnD, single_task_coefficient

    model = mf.fresh_model()
    ctx = mf.context(model, reference=True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # away from θ_0, so that the distillation is not ~0
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    method = SnD(SnD.Hparams(ref_batch_size=4), ctx)
    method.setup()
    batch = {"image": mf.images(5, seed=2), "y": torch.tensor([0, 1, 2, 0, 1])}
    terms = method.loss(batch, 2)
    with torch.no_grad():
        norm = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
        f = norm(model.encode_image(batch["image"]).double())
        logits = float(model.logit_scale.exp()) * f @ ctx.zeroshot_head.double().t()
        ce = sum(-(logits[i, y] - torch.logsumexp(logits[i], 0)) for i, y in enumerate(batch["y"].tolist())) / 5
        rows = DiVE.reference_rows(method, 2)[0]
        f_ref = norm(model.encode_image(torch.stack([ctx.reference.images[int(j)] for j in rows])).double())
        d0 = ((f_ref - ctx.reference.image_pre[rows].double()) ** 2).sum(1).mean()
    assert float(terms["ce_loss"].detach()) == pytest.approx(float(ce), abs=1e-5)
    assert float(d0) > 1e-3
    assert float(terms["distill_loss"].detach()) == pytest.approx(single_task_coefficient(method.hp) * float(d0), abs=1e-5)


# ---- Lipsum-FT -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,k,d", [(1, 1, 4), (5, 8, 8), (16, 80, 32)])
def test_lipsum_regulariser_matches_its_formula(n, k, d):
    from pipeline.methods.lipsum_ft import lipsum_regulariser

    f, f0, z = unit_rows(n, d, 1), unit_rows(n, d, 2), unit_rows(k, d, 3)
    s = 37.5
    want = 0.0
    for i in range(n):
        want += sum((s * float(f[i] @ z[j]) - s * float(f0[i] @ z[j])) ** 2 for j in range(k)) / (2 * k)
    got = float(lipsum_regulariser(f, f0, z, torch.tensor(s, dtype=torch.float64)))
    assert got == pytest.approx(want / n, abs=1e-5 * max(1.0, want / n))


def test_lipsum_random_texts_are_sot_random_eot():
    from pipeline.methods.lipsum_ft import EOT, SOT, random_texts

    t = random_texts(80, 8, 16, torch.Generator().manual_seed(0))
    assert t.shape == (80, 16)
    assert (t[:, 0] == SOT).all() and (t[:, 9] == EOT).all() and (t[:, 10:] == 0).all()
    body = t[:, 1:9]
    assert int(body.min()) >= 0 and int(body.max()) < SOT
    assert len(body.unique()) > 500  # uniform over ~49k ids: 640 draws are nearly all distinct


def lipsum_method(seed: int = 0, **hp):
    from pipeline.methods.lipsum_ft import LipsumFT

    model = mf.fresh_model()
    method = LipsumFT(LipsumFT.Hparams(**hp), mf.context(model, seed=seed))
    method.setup()
    return method


def test_lipsum_loss_terms_and_draws():
    """At θ_0 the regulariser is 0 up to rounding (f_0 is the same weights on the same pixels); after perturbing the
    image tower it equals the formula with an independent f_0 (a fresh pre-trained model) and
    z (the step's texts through the pre-trained text tower); the texts depend on (seed, step)
    only: the same for every micro-batch of a step, new at the next step."""
    from pipeline.methods.base import MicroBatch
    from pipeline.methods.lipsum_ft import lipsum_regulariser

    method = lipsum_method(n_texts=5, text_length=4, lam=0.7)
    model = method.ctx.model
    batch = {"image": mf.images(4, seed=2), "y": torch.tensor([0, 1, 2, 0])}
    assert float(method.loss(batch, 0)["lipsum_loss"].detach()) < 1e-10  # rounding: eval vs train kernels
    z0 = method.text_anchors(0, torch.device("cpu"))
    method.micro = MicroBatch(1, 2)
    torch.manual_seed(123)  # other RNG use does not change the texts
    assert torch.equal(method.text_anchors(0, torch.device("cpu")), z0)
    assert not torch.equal(method.text_anchors(1, torch.device("cpu")), z0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    terms = method.loss(batch, 3)
    pre = mf.fresh_model().eval()
    with torch.no_grad():
        norm = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
        f = norm(model.encode_image(batch["image"]).double())
        f0 = norm(pre.encode_image(batch["image"]).double())
        from pipeline.methods.lipsum_ft import random_texts
        gen = torch.Generator().manual_seed((0 * 0x9E3779B97F4A7C15 + 3 * 0xBF58476D1CE4E5B9 + 0x11F5) % 2**63)
        z = norm(pre.encode_text(random_texts(5, 4, 16, gen)).double())
        s = float(pre.logit_scale.exp())
    want = 0.7 * float(lipsum_regulariser(f, f0, z, torch.tensor(s, dtype=torch.float64)))
    assert want > 1e-4
    assert float(terms["lipsum_loss"].detach()) == pytest.approx(want, abs=1e-5)


def test_lipsum_refuses_a_non_clip_text_tower():
    from pipeline.methods.lipsum_ft import LipsumFT

    model = mf.fresh_model()
    model.text_pool_type = "first"
    with pytest.raises(ValueError, match="lipsum_ft draws random texts from CLIP's BPE vocabulary"):
        LipsumFT.check_model(model)
    LipsumFT.check_model(mf.fresh_model())


# ---- CLIPood -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,c,d", [(1, 2, 4), (6, 3, 8), (16, 10, 32)])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_clipood_margin_loss_matches_its_formula(n, c, d, lam):
    """CE with a margin s·λ·(1 − t_y·t_j) added to every wrong class's logit s·f·t_j (the
    margin form, written independently of the method's subtracted-feature form)."""
    from pipeline.methods.clipood import margin_metric_loss

    f, t = unit_rows(n, d, 1), unit_rows(c, d, 2)
    y = torch.arange(n) % c
    s = 50.0
    want = 0.0
    for i in range(n):
        yi = int(y[i])
        logits = []
        for j in range(c):
            margin = 0.0 if j == yi else s * lam * (1 - float(t[yi] @ t[j]))
            logits.append(s * float(f[i] @ t[j]) + margin)
        # the true class's logit s·(f·t_y − λ) shifts every logit by the same −s·λ: CE unchanged
        want += -(logits[yi] - math.log(sum(math.exp(v) for v in logits)))
    got = float(margin_metric_loss(f, t, y, torch.tensor(s, dtype=torch.float64), lam))
    assert got == pytest.approx(want / n, abs=1e-5)


@pytest.mark.parametrize("total,beta", [(1, 0.5), (7, 0.5), (60, 0.1), (5, 2.0)])
def test_clipood_beta_weights_sum_to_one_with_the_pretrained_start(total, beta):
    """The online average over iterates 0…T (0 = the pre-trained start) equals the explicit
    mean Σ w_i θ_i / Σ w_i, whose normalised weights sum to one and give θ_0 its Beta weight."""
    from scipy import stats

    from pipeline.methods.clipood import BetaAverage, beta_weight

    w = [stats.beta(beta, beta).pdf((i + 0.5) / (total + 1)) for i in range(total + 1)]
    assert [beta_weight(i, total, beta) for i in range(total + 1)] == pytest.approx(w, rel=1e-12)
    norm = [x / sum(w) for x in w]
    assert sum(norm) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(total + 1)]
    bma = BetaAverage([("p", thetas[0])], beta_weight(0, total, beta))
    for i in range(1, total + 1):
        bma.add([thetas[i]], beta_weight(i, total, beta))
    want = sum(wi * th for wi, th in zip(norm, thetas))
    torch.testing.assert_close(bma.average("p").double(), want, rtol=0, atol=1e-6)
    assert int(bma.count) == total
    assert bma.average("p").dtype == torch.float32


def test_clipood_saves_the_beta_average_of_its_iterates():
    """After a real training run the saved state is the Beta-weighted mean of θ_0 and every
    optimiser step's weights (recorded independently), not the last iterate."""
    from scipy import stats

    from pipeline.methods.clipood import CLIPood
    from pipeline.training.train import fit

    iterates = []

    class Recording(CLIPood):
        def after_step(self, step):
            iterates.append({n: p.detach().clone() for n, p in self._visual()})
            super().after_step(step)

    model = mf.fresh_model()
    ctx = mf.context(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("visual.")}
    method = Recording(CLIPood.Hparams(lr=1e-3), ctx)
    steps = 4
    fit(method, ctx.train_set, steps=steps, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    state = method.trained_state()
    w = [stats.beta(0.5, 0.5).pdf((i + 0.5) / (steps + 1)) for i in range(steps + 1)]
    w = [x / sum(w) for x in w]
    seq = [start] + iterates
    moved = 0.0
    for n in start:
        want = sum(w[i] * seq[i][n].double() for i in range(steps + 1))
        torch.testing.assert_close(state[f"clip.{n}"].double(), want, rtol=0, atol=1e-6)
        moved = max(moved, float((state[f"clip.{n}"] - iterates[-1][n]).abs().max()))
    assert moved > 1e-4  # the average is not the last iterate


# ---- Model Stock's merge (pipeline.models.weights) -----------------------------------------


def _t(values):
    return torch.tensor(values, dtype=torch.float32)


def test_model_stock_ratio_on_hand_made_tensors():
    from pipeline.models.weights import model_stock_ratio

    w0 = _t([[1.0, 2.0]])
    same = model_stock_ratio(w0, w0 + _t([[1.0, 0.0]]), w0 + _t([[3.0, 0.0]]))  # cos = 1 → t = 1
    assert float(same) == pytest.approx(1.0, abs=1e-6)
    c = 1 / math.sqrt(2)  # 45°: t = 2c/(1 + c)
    assert float(model_stock_ratio(w0, w0 + _t([[1.0, 0.0]]), w0 + _t([[1.0, 1.0]]))) == pytest.approx(
        2 * c / (1 + c), abs=1e-6)
    assert float(model_stock_ratio(w0, w0 + _t([[1.0, 0.0]]), w0 + _t([[0.0, 2.0]]))) == 0.0  # orthogonal
    # cos < 0: the notebook's t = 2cos/(cos + 1) is negative (−2.1 seen); clamped to 0
    d1, d2 = _t([[1.0, 0.0]]), _t([[-1.0, 0.4]])
    cos = float((d1 * d2).sum() / (d1.norm() * d2.norm()))
    assert cos < 0 and 2 * cos / (cos + 1) < -1
    assert float(model_stock_ratio(w0, w0 + d1, w0 + d2)) == 0.0
    t = model_stock_ratio(w0, w0 + d1, w0 - d1)  # cos = −1: no division by zero
    assert float(t) == 0.0 and torch.isfinite(t)
    assert float(model_stock_ratio(w0, w0, w0)) == 0.0  # no movement: the pre-trained tensor


def test_model_stock_merge_on_hand_made_state_dicts():
    """Per tensor t·(w1 + w2)/2 + (1 − t)·w0 (values worked out by hand), the plain average on
    the ignored keys even where the merge would give w0, `visual.positional_embedding`
    merged, the plain average for a key missing from w0 or of another shape, w1's dtype."""
    from pipeline.models.weights import model_stock_merge

    c = 1 / math.sqrt(2)
    t45 = 2 * c / (1 + c)
    opposite = (_t([[1.0, 0.0]]), _t([[-1.0, 0.4]]))  # cos < 0
    w0 = {"visual.proj": _t([[0.0, 0.0]]), "visual.positional_embedding": _t([[1.0, 1.0]]),
          "positional_embedding": _t([[0.0, 0.0]]), "text_projection": _t([[0.0, 0.0]]),
          "logit_scale": _t([[0.0, 0.0]]), "token_embedding.weight": _t([[0.0, 0.0]]),
          "ln_final.weight": _t([[0.0, 0.0]]), "ln_final.bias": _t([[0.0, 0.0]]),
          "head": _t([1.0, 1.0, 1.0])}
    w1 = {k: v.clone() for k, v in w0.items()}
    w2 = {k: v.clone() for k, v in w0.items()}
    w1["visual.proj"], w2["visual.proj"] = _t([[1.0, 0.0]]), _t([[1.0, 1.0]])  # 45°
    w1["visual.positional_embedding"] = w0["visual.positional_embedding"] + opposite[0]
    w2["visual.positional_embedding"] = w0["visual.positional_embedding"] + opposite[1]
    for k in ("positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
              "ln_final.weight", "ln_final.bias"):
        w1[k], w2[k] = opposite[0].clone(), opposite[1].clone()
    w1["head"], w2["head"] = _t([2.0, 1.0, 1.0]), _t([3.0, 1.0, 1.0])  # cos = 1: t = 1
    w1["extra.only_fine_tuned"], w2["extra.only_fine_tuned"] = _t([1.0]), _t([3.0])
    w0_other_shape = dict(w0, **{"visual.proj": _t([0.0, 0.0, 0.0])})

    merged = model_stock_merge(w0, w1, w2)
    torch.testing.assert_close(merged["visual.proj"], _t([[t45 * 1.0, t45 * 0.5]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["visual.positional_embedding"], w0["visual.positional_embedding"])
    for k in ("positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
              "ln_final.weight", "ln_final.bias"):
        torch.testing.assert_close(merged[k], (opposite[0] + opposite[1]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged["head"], _t([2.5, 1.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["extra.only_fine_tuned"], _t([2.0]))
    assert set(merged) == set(w1)
    other = model_stock_merge(w0_other_shape, w1, w2)
    torch.testing.assert_close(other["visual.proj"], _t([[1.0, 0.5]]))
    half = model_stock_merge({k: v.half() for k, v in w0.items()}, {k: v.half() for k, v in w1.items()},
                             {k: v.half() for k, v in w2.items()})
    assert half["visual.proj"].dtype == torch.float16
    with pytest.raises(KeyError, match="differ"):
        model_stock_merge(w0, w1, {k: v for k, v in w2.items() if k != "head"})


# ---- resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clipood", "lipsum_ft", "snd", "flyp_replay", "ftp", "model_stock"])
def test_resumed_run_ends_with_the_same_saved_state(name, tmp_path):
    """A run resumed from its step-2 checkpoint saves what the uninterrupted run saves:
    CLIPood's Beta average (its buffers are in the checkpoint), Lipsum-FT's f_0 (rebuilt from
    the pre-trained weights before the checkpoint loads), the reference draws of SnD and
    FLYP+replay (seeded by seed and step), FTP's projection state (checkpointed buffers), Model
    Stock's first run (kept in the checkpoint of its second run, the one resumed here)."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]

    def run(ckpt):
        model = mf.fresh_model()
        ctx = mf.context(model, reference=cls.needs_reference)
        method = cls(cls.Hparams(lr=1e-3, warmup_steps=0), ctx)
        fit(method, ctx.train_set, steps=4, batch_size=6, seed=1, device=torch.device("cpu"), progress=False,
            checkpoint_dir=ckpt, checkpoint_every=2)
        return method.trained_state()

    full = run(tmp_path / "a")
    assert (tmp_path / "a" / "last.pt").exists()  # the step-2 checkpoint
    resumed = run(tmp_path / "a")  # resumes from step 2
    fresh = mf.fresh_model().state_dict()
    assert max(float((full[k].float() - fresh[k[5:]].float()).abs().max()) for k in full if k.startswith("clip.")) > 1e-4
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)


# ---- FTP (pipeline.methods.ftp) -----------------------------------------------------------


def ftp_by_hand(w0, proposals, grads, k):
    """FTP's projection written out (float64, one tensor), from the official `util/FTP.py`'s
    order of operations: per step t = 1, 2, ...: c = w̃ − w0; n per row (Σ|c| over the
    other dims; the whole tensor for 1-D and 0-D) + 1e-8; γ = 1e-8 at t = 1, else one Adam step
    (lr 1e-2, betas 0.9/0.999, bias-corrected with t) on g = Σ grad·c_prev/n_prev (×k if > 0),
    clipped to [1e-8, max n]; w = w0 + min(max(γ/n, 0), 1)·c. `proposals[t]` is a function of
    the previous projected weights (the base step), `grads[t]` the gradient at them. Returns
    the weights after each step and the hyper-gradients before scaling (None at t = 1)."""
    w = w0.clone()
    gamma = m = v = 0.0
    c_prev = n_prev = None
    out, hyper = [], [None]
    for t, (propose, grad) in enumerate(zip(proposals, grads), start=1):
        c = propose(w) - w0
        if c.dim() >= 2:
            rows = c.reshape(c.shape[0], -1)
            n = torch.tensor([float(r.abs().sum()) for r in rows], dtype=c.dtype) + 1e-8
            n = n.reshape((c.shape[0],) + (1,) * (c.dim() - 1))
        else:
            n = torch.tensor(float(c.abs().sum()) + 1e-8, dtype=c.dtype)
        if t == 1:
            gamma = 1e-8
        else:
            g = float((grad * c_prev / n_prev).sum())
            hyper.append(g)
            g = g * k if g > 0 else g
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            gamma = gamma - 1e-2 * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            gamma = min(max(gamma, 1e-8), float(n.max()))
        w = w0 + (gamma / n).clamp(0, 1) * c
        c_prev, n_prev = c, n
        out.append(w.clone())
    return out, hyper


@pytest.mark.parametrize("shape", [(4, 3), (5,), (), (2, 3, 4)])
@pytest.mark.parametrize("k", [1.0, 0.3])
def test_ftp_projection_matches_its_formula(shape, k):
    from pipeline.methods.ftp import Projection

    g = torch.Generator().manual_seed(len(shape) * 7 + int(k * 10))
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    steps = 6
    # the base optimiser's step w̃ = w − 0.05·grad; gradients mostly along one direction (the
    # radius grows: g < 0), and against it at step 4 (g > 0: the k-scaled branch)
    drift = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = [0.3 * torch.randn(shape, generator=g, dtype=torch.float64).clamp(-2, 2) for _ in range(steps)]
    grads = [drift * (1 + noise[i]) * (-1 if i == 3 else 1) for i in range(steps)]
    proposals = [lambda w, gr=gr: w - 0.05 * gr for gr in grads]
    expected, hyper = ftp_by_hand(w0, proposals, grads, k)

    p = torch.nn.Parameter(w0.clone())
    proj = Projection([("w", p)])
    gammas = []
    for t in range(steps):
        with torch.no_grad():
            p.copy_(proposals[t](p.detach()))
        p.grad = grads[t].clone()
        proj.project([("w", p)], k)
        gammas.append(float(proj.get("gamma", "w")))
        torch.testing.assert_close(p.detach(), expected[t], rtol=0, atol=1e-10)
    assert gammas[0] == pytest.approx(1e-8)
    assert gammas[2] > 1e-3  # the radius was learned, not left at its start
    assert hyper[2] < 0 < hyper[3]  # both branches of the hyper-gradient were taken (k > 0 scaled)
    assert int(proj.count) == steps


def test_ftp_first_step_leaves_the_weights_at_pretrained():
    """The first step's radius is 1e-8: the image tower stays at θ_0 to 1e-6 (FT with the same
    step moves it by far more); the head, not projected, moves as FT's does."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    pre = mf.snapshot(mf.fresh_model())

    def one_step(name):
        model = mf.fresh_model()
        ctx = mf.context(model)
        cls = METHODS[name]
        method = cls(cls.Hparams(lr=1e-2, warmup_steps=0, weight_decay=0.0), ctx)
        fit(method, ctx.train_set, steps=1, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
        moved = max(float((p.detach() - pre[n]).abs().max()) for n, p in model.named_parameters()
                    if n.startswith("visual."))
        return moved, method.extra["head"].weight.detach().clone()

    ftp_moved, ftp_head = one_step("ftp")
    ft_moved, ft_head = one_step("ft")
    assert ftp_moved <= 1e-6
    assert ft_moved > 1e-3
    torch.testing.assert_close(ftp_head, ft_head)


def test_ftp_trains_with_the_projection_of_each_step_and_saves_only_the_weights():
    """Through the trainer: each step's weights are the projection of the trainer's AdamW
    proposal from the previous step's weights (replayed here with `ftp_by_hand` on the
    recorded proposals and gradients); the saved state holds the weights, not the
    projection's state."""
    from pipeline.methods import METHODS
    from pipeline.methods.ftp import Projection
    from pipeline.training.train import fit

    recorded = []  # per step: {name: (proposal, grad, projected)}
    original = Projection.project

    def recording(self, params, k):
        before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in params}
        original(self, params, k)
        recorded.append({n: (*before[n], p.detach().clone()) for n, p in params})

    model = mf.fresh_model()
    ctx = mf.context(model)
    cls = METHODS["ftp"]
    method = cls(cls.Hparams(lr=1e-3, warmup_steps=0), ctx)
    Projection.project = recording
    try:
        fit(method, ctx.train_set, steps=5, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    finally:
        Projection.project = original
    pre = mf.snapshot(mf.fresh_model())
    names = [n for n in recorded[0] if pre[n].dim() in (1, 2)][:6]
    for name in names:
        w0 = pre[name].double()
        proposals = [lambda w, r=r: r[name][0].double() for r in recorded]
        grads = [r[name][1].double() for r in recorded]
        expected, _ = ftp_by_hand(w0, proposals, grads, 1.0)
        for t, r in enumerate(recorded):
            torch.testing.assert_close(r[name][2].double(), expected[t], rtol=0, atol=1e-6)
    assert max(float((r[names[0]][2] - pre[names[0]]).abs().max()) for r in recorded) > 1e-5
    state = method.trained_state()
    assert not any(k.startswith("extra.ftp.") for k in state)
    assert {k for k in state if k.startswith("clip.")} == {f"clip.{n}" for n in pre if n.startswith("visual.")}


@pytest.mark.parametrize("k", [-0.1, 1.5])
def test_ftp_refuses_k_outside_0_1(k):
    from pipeline.methods.ftp import FTPHparams

    with pytest.raises(ValueError, match="k: .* must lie in"):
        FTPHparams(k=k)


# ---- Model Stock (pipeline.methods.model_stock, the trainer's n_runs) -----------------------


def merge_by_hand(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    d1, d2 = (w1 - w0).double().flatten(), (w2 - w0).double().flatten()
    cos = float(d1 @ d2) / (float(d1.norm()) * float(d2.norm()) + 1e-8)
    cos = min(max(cos, -1.0), 1.0)
    t = min(max(2 * cos / (cos + 1), 0.0), 1.0) if cos > -1 else 0.0
    return (t * (w1.double() + w2.double()) / 2 + (1 - t) * w0.double()).to(w1.dtype)


def test_model_stock_merges_two_ft_runs_with_derived_seeds():
    """Model Stock's saved state = the per-tensor merge of two FT runs (the entry's seed and
    `run_seed_of(seed, 1)`, each from θ_0 and the zero-shot head) with w0 = θ_0 and s·H_zs."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit, run_seed_of

    seed, steps = 2, 3

    def train(name, train_seed):
        model = mf.fresh_model()
        ctx = mf.context(model, seed=seed)
        cls = METHODS[name]
        method = cls(cls.Hparams(lr=1e-3, warmup_steps=0), ctx)
        result = fit(method, ctx.train_set, steps=steps, batch_size=6, seed=train_seed, device=torch.device("cpu"),
                     progress=False)
        return method, result

    stock, result = train("model_stock", seed)
    merged = stock.trained_state()
    run0 = train("ft", seed)[0].trained_state()
    run1 = train("ft", run_seed_of(seed, 1))[0].trained_state()
    assert run_seed_of(seed, 0) == seed and run_seed_of(seed, 1) not in (seed, seed + 1)
    assert result.runs == 2 and [h["step"] for h in result.history] == list(range(1, 2 * steps + 1))

    model = mf.fresh_model()
    w0 = {f"clip.{n}": p.detach() for n, p in model.named_parameters()}
    w0["extra.head.weight"] = model.logit_scale.exp().detach() * mf.zeroshot_head(model)
    assert set(merged) == set(run0) == set(run1)
    ratios = []
    for key in merged:
        expected = merge_by_hand(w0[key], run0[key], run1[key])
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
        d0, d1 = (run0[key] - w0[key]).flatten(), (run1[key] - w0[key]).flatten()
        if d0.norm() > 0 and d1.norm() > 0:
            ratios.append(float(d0 @ d1 / (d0.norm() * d1.norm())))
    assert any(not torch.equal(run0[k], run1[k]) for k in run0)  # two different runs
    assert 0 < min(r for r in ratios) < 0.999  # the merge is neither run nor their plain average
    # the live model is the merged one
    head = stock.live_eval_model().head
    torch.testing.assert_close(head, merged["extra.head.weight"])


def test_model_stock_resumes_inside_either_run(tmp_path):
    """Killed in its first run or in its second (an exception from the log callback, after the
    step-2 checkpoint), a Model Stock run resumes there and saves what the uninterrupted run
    saves; a kill in the second run never trains the first again."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS["model_stock"]

    class Killed(Exception):
        pass

    def run(ckpt=None, kill_at=None):
        ctx = mf.context(mf.fresh_model())
        method = cls(cls.Hparams(lr=1e-3, warmup_steps=0), ctx)
        steps_seen = []

        def log(step, record):
            steps_seen.append(step)
            if step == kill_at:
                raise Killed

        try:
            fit(method, ctx.train_set, steps=4, batch_size=6, seed=1, device=torch.device("cpu"), progress=False,
                checkpoint_dir=ckpt, checkpoint_every=2, log=log)
        except Killed:
            return None, steps_seen
        return method.trained_state(), steps_seen

    full, _ = run()
    for kill_at, resumed_steps in ((3, [3, 4, 5, 6, 7, 8]), (7, [7, 8])):
        ckpt = tmp_path / f"kill{kill_at}"
        assert run(ckpt, kill_at)[0] is None
        saved = torch.load(ckpt / "last.pt", weights_only=True)
        assert (saved["run"], saved["step"], len(saved["finished"])) == ((0, 2, 0) if kill_at == 3 else (1, 2, 1))
        state, seen = run(ckpt)
        assert seen == resumed_steps
        assert set(state) == set(full)
        for k in full:
            torch.testing.assert_close(state[k], full[k], rtol=0, atol=1e-6)


def test_model_stock_refuses_swa():
    from pipeline.methods import METHODS
    from pipeline.training.train import fit, swa_refusal

    assert "trains 2" in swa_refusal(METHODS["model_stock"])
    assert swa_refusal(METHODS["ft"]) is None
    ctx = mf.context()
    method = METHODS["model_stock"](METHODS["model_stock"].Hparams(), ctx)
    with pytest.raises(ValueError, match="swa_start.*model_stock trains 2"):
        fit(method, ctx.train_set, steps=2, batch_size=6, seed=0, device=torch.device("cpu"), progress=False,
            swa_start=0.5)


@pytest.mark.parametrize("name", ["ftp", "model_stock"])
def test_bf16_autocast_steps_are_finite_and_losses_fp32(name):
    """Under the trainer's bf16 autocast (CPU here): finite losses computed in fp32; the weights
    (FTP's projection, Model Stock's merge) stay fp32."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]
    ctx = mf.context()
    method = cls(cls.Hparams(lr=1e-3), ctx)
    res = fit(method, ctx.train_set, steps=3, batch_size=6, seed=0, device=torch.device("cpu"),
              precision="bf16", progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert all(v.dtype == torch.float32 for v in method.trained_state().values())
    batch = {"image": mf.images(6), "y": torch.arange(6) % 3, "index": torch.arange(6)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.loss(batch, 0)
    assert all(t.dtype == torch.float32 for t in terms.values()), {k: t.dtype for k, t in terms.items()}


@pytest.mark.parametrize("name", ["ftp", "model_stock"])
def test_grad_accum_gives_the_same_weights(name):
    """grad_accum 2 (two micro-batches of 3) trains the same weights as one batch of 6 (float64:
    only summation order differs): FTP projects once per optimiser step, on the accumulated
    gradient; Model Stock's two runs accumulate alike."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]

    def run(accum):
        model = mf.fresh_model().double()
        ctx = mf.context(model)
        ctx.train_set = mf.ListDataset([{k: (v.double() if v.is_floating_point() else v) for k, v in item.items()}
                                        for item in ctx.train_set.items])
        method = cls(cls.Hparams(lr=1e-3, warmup_steps=0), ctx)
        method.setup()
        method.extra.double()
        fit(method, ctx.train_set, steps=3, batch_size=6, seed=0, device=torch.device("cpu"), progress=False,
            grad_accum=accum)
        return method.trained_state()

    one, two = run(1), run(2)
    pre = mf.fresh_model().state_dict()
    assert max(float((one[k] - pre[k[5:]].double()).abs().max()) for k in one if k.startswith("clip.")) > 1e-4
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-9)
