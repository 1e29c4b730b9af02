"""ARF and CaRot (issue 28, reference/baselines.md): each loss against an independent
implementation of its formula written here (loops over rows and entries, several shapes,
1e-5), CaRot's EMA teacher schedule through a real training run, ARF's retrieval and
sampler (DiVE's draw), its captions (file, built-in descriptions, the refusal in `check`),
bf16 autocast and resume. The method contract is tests/test_methods.py's; DDP is
tests/test_ddp.py's."""

from __future__ import annotations

import math

import pipeline  # noqa: F401
import pytest
import torch
import yaml

from pipeline.methods.dive import DiVE, DiVEHparams
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)
from tests.test_robust_baselines import clip_loss_by_rows, unit_rows

SHAPES = [(1, 4), (5, 8), (16, 32)]


def matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---- CaRot: the losses ----------------------------------------------------------------------


@pytest.mark.parametrize("width,embed", [(4, 2), (8, 8), (48, 24)])
def test_carot_orthogonality_matches_its_formula(width, embed):
    """sqrt(Σ_ab ((W_vᵀW_v)_ab − δ_ab)²) with W_v stored [width, embed], entry by entry."""
    from pipeline.methods.carot import orthogonality_loss

    w = matrix(width, embed, 1) / math.sqrt(width)
    total = 0.0
    for a in range(embed):
        for b in range(embed):
            gram = sum(float(w[k, a]) * float(w[k, b]) for k in range(width))
            total += (gram - (1.0 if a == b else 0.0)) ** 2
    assert float(orthogonality_loss(w)) == pytest.approx(math.sqrt(total), abs=1e-5)


@pytest.mark.parametrize("wv,wt,embed", [(4, 3, 2), (8, 6, 8), (48, 32, 24)])
def test_carot_cross_projection_matches_its_formula(wv, wt, embed):
    """sqrt(Σ_ab (Σ_k W_v[a,k] W_t[b,k])²): the tower widths differ, the embedding is shared."""
    from pipeline.methods.carot import cross_projection_loss

    v, t = matrix(wv, embed, 2), matrix(wt, embed, 3)
    total = sum(sum(float(v[a, k]) * float(t[b, k]) for k in range(embed)) ** 2 for a in range(wv) for b in range(wt))
    assert float(cross_projection_loss(v, t)) == pytest.approx(math.sqrt(total), abs=1e-5 * max(1.0, math.sqrt(total)))


def distill_by_rows(f, g, s, ft, gt, st) -> float:
    n = f.shape[0]

    def softmax(row):
        top = max(row)
        e = [math.exp(v - top) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for i in range(n):
        s_img = [s * float(f[i] @ g[j]) for j in range(n)]
        s_txt = [s * float(g[i] @ f[j]) for j in range(n)]
        t_img = softmax([st * float(ft[i] @ gt[j]) for j in range(n)])
        t_txt = softmax([st * float(gt[i] @ ft[j]) for j in range(n)])
        p_img, p_txt = softmax(s_img), softmax(s_txt)
        total -= sum(t_img[j] * math.log(p_img[j]) + t_txt[j] * math.log(p_txt[j]) for j in range(n))
    return total / n


@pytest.mark.parametrize("n,d", SHAPES)
def test_carot_self_distillation_matches_its_formula(n, d):
    from pipeline.methods.carot import self_distillation_loss

    f, g, ft, gt = unit_rows(n, d, 1), unit_rows(n, d, 2), unit_rows(n, d, 3), unit_rows(n, d, 4)
    s, st = torch.tensor(20.0, dtype=torch.float64), torch.tensor(35.0, dtype=torch.float64)
    got = float(self_distillation_loss(f, g, s, ft, gt, st))
    assert got == pytest.approx(distill_by_rows(f, g, 20.0, ft, gt, 35.0), abs=1e-5)


def test_carot_self_distillation_has_no_gradient_through_the_teacher():
    from pipeline.methods.carot import self_distillation_loss

    f, g = unit_rows(5, 8, 1).requires_grad_(), unit_rows(5, 8, 2).requires_grad_()
    ft, gt = unit_rows(5, 8, 3).requires_grad_(), unit_rows(5, 8, 4).requires_grad_()
    self_distillation_loss(f, g, torch.tensor(10.0), ft, gt, torch.tensor(10.0)).backward()
    assert f.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    assert ft.grad is None and gt.grad is None


# ---- CaRot: the method -------------------------------------------------------------------------


def carot_method(model=None, **hp):
    from pipeline.methods.carot import CaRot

    method = CaRot(CaRot.Hparams(**hp), mf.context(model if model is not None else mf.fresh_model()))
    method.total_steps = 10
    method.setup()
    return method


def test_carot_loss_terms():
    """At step > 0: FLYP's InfoNCE, β_o ‖W_vᵀW_v − I‖_F, β_x ‖W_v W_tᵀ‖_F and β_d D against an
    independent computation, the teacher a perturbed copy of the pre-trained model (its own
    scale); at step 0 no distillation (as the official code)."""
    hp = {"beta_orth": 0.3, "beta_cross": 0.07, "beta_distill": 1.7}
    method = carot_method(**hp)
    model = method.ctx.model
    teacher = mf.fresh_model()
    perturb(teacher, 5)
    with torch.no_grad():
        teacher.logit_scale.fill_(math.log(30.0))
        for t, p in zip(method.extra["teacher"].tensors(method._names), teacher.parameters()):
            t.copy_(p)
    perturb(model, 6, 0.02)
    batch = {"image": mf.images(5, seed=2), "y": torch.tensor([0, 1, 2, 0, 1]), "index": torch.arange(5)}
    torch.manual_seed(11)
    terms = method.loss(batch, 3)
    assert set(terms) == {"flyp_loss", "orth_loss", "cross_loss", "distill_loss"}
    with torch.no_grad():
        torch.manual_seed(11)
        pick = torch.randint(method.ctx.class_tokens.shape[1], (5,))
        tokens = method.ctx.class_tokens[batch["y"], pick]
        f, g = norm(model.encode_image(batch["image"]).double()), norm(model.encode_text(tokens).double())
        teacher.eval()
        ft, gt = norm(teacher.encode_image(batch["image"]).double()), norm(teacher.encode_text(tokens).double())
        s = float(model.logit_scale.exp())
        w_v, w_t = model.visual.proj.double(), model.text_projection.double()
        e = w_v.shape[1]
        orth = math.sqrt(sum((float(w_v[:, a] @ w_v[:, b]) - (a == b)) ** 2 for a in range(e) for b in range(e)))
        cross = math.sqrt(sum(float(w_v[a] @ w_t[b]) ** 2 for a in range(w_v.shape[0]) for b in range(w_t.shape[0])))
    assert float(terms["flyp_loss"].detach()) == pytest.approx(clip_loss_by_rows(f, g, s), abs=1e-5)
    assert float(terms["orth_loss"].detach()) == pytest.approx(0.3 * orth, abs=1e-5)
    assert float(terms["cross_loss"].detach()) == pytest.approx(0.07 * cross, abs=1e-5)
    want = 1.7 * distill_by_rows(f, g, s, ft, gt, 30.0)
    assert float(terms["distill_loss"].detach()) == pytest.approx(want, abs=1e-5)
    assert float(method.loss(batch, 0)["distill_loss"]) == 0.0


@pytest.mark.parametrize("start,end,warmup,total", [(0.05, 0.9, 0.2, 100), (0.1, 0.5, 0.5, 7)])
def test_carot_teacher_momentum_by_hand(start, end, warmup, total):
    from pipeline.methods.carot import teacher_momentum

    ramp = warmup * total
    for step in range(total):
        want = start + (end - start) * step / ramp if step < ramp else end
        assert teacher_momentum(step, total, start, end, warmup) == pytest.approx(want, abs=1e-12)
    assert teacher_momentum(0, total, start, end, warmup) == start
    assert teacher_momentum(total - 1, total, start, end, warmup) == end
    assert teacher_momentum(0, 10, 0.05, 0.9, 0.0) == 0.9  # no ramp


def test_carot_teacher_follows_its_schedule_in_a_training_run():
    """After a real run of T = 6 steps with 3 teacher updates (every 2 steps: after steps 0, 2,
    4), the teacher equals the EMA of the recorded student iterates with m ramped from 0.05
    to 0.9 over the first half (written out here), and the student is what is saved."""
    from pipeline.methods.carot import CaRot
    from pipeline.training.train import fit

    iterates = []

    class Recording(CaRot):
        def after_step(self, step):
            super(CaRot, self).after_step(step)  # FLYP's clamp first, as CaRot does
            iterates.append({n: p.detach().clone() for n, p in self.ctx.model.named_parameters()})
            CaRot.after_step(self, step)

    model = mf.fresh_model()
    ctx = mf.context(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Recording(CaRot.Hparams(lr=1e-3, warmup_steps=0, teacher_updates=3, momentum_warmup=0.5), ctx)
    fit(method, ctx.train_set, steps=6, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    assert method.every() == 2
    teacher = {n: t.clone() for n, t in zip(method._names, method.extra["teacher"].tensors(method._names))}
    want = {n: v.double() for n, v in start.items()}
    for step, m in ((0, 0.05), (2, 0.05 + 0.85 * 2 / 3), (4, 0.9)):
        want = {n: m * want[n] + (1 - m) * iterates[step][n].double() for n in want}
    moved = 0.0
    for n in want:
        torch.testing.assert_close(teacher[n].double(), want[n], rtol=0, atol=1e-6)
        moved = max(moved, float((teacher[n] - iterates[-1][n]).abs().max()))
    assert moved > 1e-4  # the teacher is not the student
    state = method.trained_state()
    assert not any("teacher" in k for k in state)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(state[f"clip.{n}"], p.detach())


def test_carot_refuses_a_tower_without_projection_and_accepts_resnet():
    import open_clip

    from pipeline.methods.carot import CaRot, projections

    model = mf.fresh_model()
    del model.visual.proj
    model.visual.proj = None
    with pytest.raises(ValueError, match=r"^carot constrains .* Allowed"):
        CaRot.check_model(model)
    CaRot.check_model(mf.fresh_model())
    rn = open_clip.create_model("RN50")
    w_v, w_t = projections(rn)
    assert w_v.shape == (2048, 1024) and torch.equal(w_v, rn.visual.attnpool.c_proj.weight.t())
    assert w_t.shape == (512, 1024)


# ---- ARF: retrieval and sampler -----------------------------------------------------------------


def arf_method(seed: int = 0, model=None, **hp):
    from pipeline.methods.arf import ARF

    model = model if model is not None else mf.fresh_model()
    method = ARF(ARF.Hparams(**hp), mf.context(model, seed=seed, reference=True))
    method.setup()
    return method


@pytest.mark.parametrize("r,c,d,fraction,minimum", [(10, 3, 4, 0.1, 2), (40, 5, 8, 0.25, 4), (7, 2, 4, 0.5, 6)])
def test_arf_retrieval_pool_is_the_top_rows_by_class_similarity(r, c, d, fraction, minimum):
    from pipeline.methods.arf import retrieval_pool

    t, h = unit_rows(r, d, 1), unit_rows(c, d, 2)
    size = min(r, max(minimum, math.ceil(fraction * r)))
    scores = [max(float(t[j] @ h[k]) for k in range(c)) for j in range(r)]
    want = sorted(sorted(range(r), key=lambda j: -scores[j])[:size])
    assert retrieval_pool(t, h, fraction, minimum).tolist() == want


def test_arf_retrieval_ties_keep_row_order():
    from pipeline.methods.arf import retrieval_pool

    t = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)
    assert retrieval_pool(t, torch.tensor([[1.0, 0.0]]), 0.5, 1).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 3])
def test_arf_draws_dives_rows_from_the_whole_pool_and_pool_rows_otherwise(seed):
    dive = DiVE(DiVEHparams(ref_batch_size=4), mf.context(mf.fresh_model(), seed=seed, reference=True))
    whole = arf_method(seed, ref_batch_size=4, retrieval_fraction=1.0)
    part = arf_method(seed, ref_batch_size=2, retrieval_fraction=0.5, retrieval_min_batches=1)
    assert len(whole.pool) == len(whole.ctx.reference) and len(part.pool) == 3
    for step in range(5):
        assert torch.equal(whole.reference_rows(step)[0], dive.reference_rows(step)[0])
        rows, size = part.reference_rows(step)
        assert size == 2 and set(rows.tolist()) <= set(part.pool.tolist())
    assert len({tuple(part.reference_rows(s)[0].tolist()) for s in range(8)}) > 1


# ---- ARF: the loss --------------------------------------------------------------------------


@pytest.mark.parametrize("lam_c,lam_r,ref", [(1.0, 1.0, 4), (0.3, 2.0, 2)])
def test_arf_loss_terms(lam_c, lam_r, ref):
    """FLYP's InfoNCE with the sampled templates, λ_c · InfoNCE(images, their captions) and
    λ_r · InfoNCE over the step's retrieved reference pairs, each by rows."""
    method = arf_method(lam_c=lam_c, lam_r=lam_r, ref_batch_size=ref, retrieval_fraction=0.5,
                        retrieval_min_batches=1)
    ctx, model = method.ctx, method.ctx.model
    perturb(model, 3, 0.02)
    index = torch.tensor([4, 0, 7, 2, 9])
    batch = {"image": mf.images(5, seed=2), "y": ctx.train_set.items[0]["y"].new_tensor([1, 0, 1, 2, 0]),
             "index": index}
    torch.manual_seed(11)
    terms = method.loss(batch, 3)
    assert set(terms) == {"flyp_loss", "caption_loss", "anchor_loss"}
    s = float(model.logit_scale.exp().detach())
    with torch.no_grad():
        torch.manual_seed(11)
        pick = torch.randint(ctx.class_tokens.shape[1], (5,))
        f = norm(model.encode_image(batch["image"]).double())
        g = norm(model.encode_text(ctx.class_tokens[batch["y"], pick]).double())
        cap = norm(model.encode_text(mf.train_captions()[index]).double())
        rows = method.reference_rows(3)[0]
        assert set(rows.tolist()) <= set(method.pool.tolist())
        f_ref = norm(model.encode_image(torch.stack([ctx.reference.images[int(j)] for j in rows])).double())
        g_ref = norm(model.encode_text(ctx.reference.tokens[rows]).double())
    assert float(terms["flyp_loss"].detach()) == pytest.approx(clip_loss_by_rows(f, g, s), abs=1e-5)
    assert float(terms["caption_loss"].detach()) == pytest.approx(lam_c * clip_loss_by_rows(f, cap, s), abs=1e-5)
    assert float(terms["anchor_loss"].detach()) == pytest.approx(lam_r * clip_loss_by_rows(f_ref, g_ref, s), abs=1e-5)


def test_arf_reference_term_once_per_step_under_grad_accum():
    from pipeline.methods.base import MicroBatch

    method = arf_method(ref_batch_size=4)
    batch = {"image": mf.images(3, seed=2), "y": torch.tensor([0, 1, 2]), "index": torch.tensor([0, 1, 2])}
    one = method.loss(batch, 1)
    method.micro = MicroBatch(0, 3)
    first = method.loss(batch, 1)
    assert float(first["anchor_loss"]) == pytest.approx(3 * float(one["anchor_loss"]), rel=1e-6)
    assert float(first["caption_loss"]) == pytest.approx(float(one["caption_loss"]), rel=1e-6)
    method.micro = MicroBatch(2, 3)
    later = method.loss(batch, 1)
    assert float(later["anchor_loss"]) == 0.0 and float(later["caption_loss"]) > 0


def test_arf_without_captions_refuses_at_setup():
    from pipeline.methods.arf import ARF

    ctx = mf.context(reference=True)
    ctx.train_captions = None
    with pytest.raises(ValueError, match="arf needs a caption of every training image"):
        ARF(ARF.Hparams(), ctx).setup()


# ---- ARF: captions -----------------------------------------------------------------------------


class _Listed:
    """A dataset that lists its images' file names, as WILDS datasets do."""

    _input_array = [f"img/{i:03d}.jpg" for i in range(6)]


def test_captions_file_maps_training_images(tmp_path):
    from pipeline.data.captions import training_captions
    from pipeline.data.datasets import get_spec

    spec = get_spec("iwildcam")
    path = tmp_path / "captions.csv"
    path.write_text("filepath,title\n" + "".join(f"img/{i:03d}.jpg,caption {i}\n" for i in (5, 1, 3, 0)))
    assert training_captions(_Listed(), [3, 0, 5], str(path), spec) == ["caption 3", "caption 0", "caption 5"]
    with pytest.raises(ValueError, match=r"no caption for 1 of the 2 training images, e.g. 'img/002.jpg'"):
        training_captions(_Listed(), [2, 1], str(path), spec)
    with pytest.raises(ValueError, match="has no built-in descriptions"):
        training_captions(_Listed(), [1], "", spec)


@pytest.mark.parametrize("text,match", [("path,caption\na,b\n", "needs columns filepath and title"),
                                        ("filepath,title\n", "no rows"),
                                        ("filepath,title\na,b\na,c\n", "two different captions"),
                                        ("filepath,title\na,\n", "line 2 has an empty")])
def test_captions_file_format_errors(tmp_path, text, match):
    from pipeline.data.captions import read_captions

    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_captions(path)


def _params(tmp_path, dataset: str, trial: dict):
    from tests.test_e2e import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"]["name"] = dataset
    raw["finetune"]["methods"] = ["arf"]
    raw["finetune"]["trials"] = {"arf-a": {"method": "arf", **trial}}
    raw["finetune"]["search"] = {}  # the default's searches are of other methods
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_check_refuses_arf_without_captions_before_any_work(tmp_path):
    """On a dataset that cannot describe its images, an ARF trial without a captions file is
    refused by the check stage, naming the key, what is missing and the file format; a
    missing file is named too. The built-in data needs no file (its generator describes)."""
    from pipeline.core.validation import ParamsError
    from pipeline.stages.check import check_params

    with pytest.raises(ParamsError, match=r"^finetune\.trials\.arf-a\.captions: arf needs a caption of every training "
                                          r"image, and dataset iwildcam has no built-in descriptions.*filepath,title"):
        check_params(_params(tmp_path, "iwildcam", {}))
    with pytest.raises(ParamsError, match=r"^finetune\.trials\.arf-a\.captions: .*nope\.csv: captions file not found"):
        check_params(_params(tmp_path, "iwildcam", {"captions": str(tmp_path / "nope.csv")}))
    assert not (tmp_path / "data").exists()
    check_params(_params(tmp_path, "synthetic", {}))


def test_trial_record_carries_the_captions_file_digest(tmp_path):
    from pipeline.core.hashing import file_sha256
    from pipeline.methods import trial_record

    path = tmp_path / "c.csv"
    path.write_text("filepath,title\na,b\n")
    record = trial_record("arf-a", "arf", {"captions": str(path)})
    assert record["captions_sha256"] == file_sha256(path)
    path.write_text("filepath,title\na,c\n")
    assert trial_record("arf-a", "arf", {"captions": str(path)})["captions_sha256"] != record["captions_sha256"]
    assert "captions_sha256" not in trial_record("arf-b", "arf", {})


def test_builtin_data_describes_each_image(tmp_path):
    """The generator's description names the image's class (its shape) and its other
    attributes, read from the dataset's own metadata."""
    import dataclasses

    from pipeline.data.synthetic import SyntheticConfig, SyntheticDataset, generate_dataset
    from pipeline.data.datasets import get_spec

    cfg = dataclasses.replace(SyntheticConfig.small(), n_corpus=50)
    generate_dataset(tmp_path, cfg, workers=1)
    ds = SyntheticDataset(root_dir=str(tmp_path))
    spec = get_spec("synthetic")
    rows = [0, 1, 2, len(ds) - 1]
    fields = ds._metadata_fields
    for r in rows:
        text = spec.describe(ds, r)
        meta = dict(zip(fields, ds._metadata_array[r].tolist()))
        assert ds.attributes["y"][int(ds.y_array[r])] in text
        assert ds.attributes["colour"][meta["colour"]] in text and ds.attributes["size"][meta["size"]] in text
        assert f"on a {ds.attributes['domain'][meta['domain']]} background" in text
    assert len({spec.describe(ds, r) for r in range(min(len(ds), 40))}) > 5


# ---- both: bf16 autocast and resume -----------------------------------------------------------


@pytest.mark.parametrize("name", ["arf", "carot"])
def test_bf16_autocast_steps_are_finite_and_losses_fp32(name):
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]
    ctx = mf.context(reference=cls.needs_reference)
    method = cls(cls.Hparams(ref_batch_size=4) if name == "arf" else cls.Hparams(), ctx)
    res = fit(method, ctx.train_set, steps=3, batch_size=6, seed=0, device=torch.device("cpu"),
              precision="bf16", progress=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    batch = {"image": mf.images(6), "y": torch.arange(6) % 3, "index": torch.arange(6)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.loss(batch, 1)
    assert all(t.dtype == torch.float32 for t in terms.values()), {k: t.dtype for k, t in terms.items()}
    assert float(terms.get("distill_loss", terms.get("anchor_loss"))) > 0


@pytest.mark.parametrize("name", ["arf", "carot"])
def test_resumed_run_ends_with_the_same_saved_state(name, tmp_path):
    """A run resumed from its step-2 checkpoint saves what the uninterrupted run saves (CaRot's
    teacher is in the checkpoint; ARF's draws are seeded by seed and step)."""
    from pipeline.methods import METHODS
    from pipeline.training.train import fit

    cls = METHODS[name]

    def run(ckpt):
        ctx = mf.context(mf.fresh_model(), reference=cls.needs_reference)
        method = cls(cls.Hparams(lr=1e-3, warmup_steps=0, **({"ref_batch_size": 4} if name == "arf" else {})), ctx)
        fit(method, ctx.train_set, steps=4, batch_size=6, seed=1, device=torch.device("cpu"), progress=False,
            checkpoint_dir=ckpt, checkpoint_every=2)
        return method.trained_state()

    full = run(tmp_path / "a")
    assert (tmp_path / "a" / "last.pt").exists()
    if name == "carot":
        saved = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state"]
        assert any(k.startswith("extra.teacher.") for k in saved)
    resumed = run(tmp_path / "a")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
