"""The method contract, for every registered method on a tiny real open_clip model:
a few trainer steps with finite losses, exactly the intended parameters change, and the
checkpoint round trip (trained_state → safetensors → eval_model on a fresh pre-trained
model) reproduces the in-memory trained model's eval outputs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pipeline  # noqa: F401
import pytest
import torch

from pipeline import models
from pipeline.methods import METHODS
from pipeline.models.evalmodel import TunedClassifier
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

# coop: the tiny text tower's 16-token context holds no 16 context tokens and a class name
OVERRIDES = {"lpft": {"lp_steps": 3}, "coop": {"n_ctx": 4}}
STEPS = 3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, tmp_path):
    cls = METHODS[name]
    model = mf.fresh_for(cls)
    before = mf.snapshot(model)
    ctx = mf.context(model, reference=cls.needs_reference)
    hp = cls.Hparams(**OVERRIDES.get(name, {}))
    method = cls(hp, ctx)

    if cls.trains:
        if cls.trains_clip is None and cls.trains_extra is None:
            pytest.fail(f"{cls.__name__} trains but declares neither `trains_clip` nor `trains_extra`")
        train_set = ctx.train_set if cls.uses_images else mf.train_items(with_images=False)
        result = fit(method, train_set, steps=STEPS, batch_size=6, seed=0,
                     device=torch.device("cpu"), progress=False)
        assert len(result.history) == STEPS * cls.n_runs
        assert all(math.isfinite(h["loss"]) for h in result.history), result.history
        assert all(k.endswith("_loss") for h in result.history for k in h
                   if k not in ("step", "loss", "lr", "grad_norm"))
        assert result.trainable_params > 0
        assert result.total_params == sum(p.numel() for p in model.parameters())

        extra_pattern = cls.trains_extra
        after = mf.snapshot(model)
        assert set(after) == set(before), "the CLIP model's parameter names changed"
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        expected = (set() if cls.trains_clip is None
                    else {n for n in before if re.search(cls.trains_clip, n)})
        assert changed == expected, (
            f"unexpected changes {sorted(changed - expected)[:5]}, "
            f"missing changes {sorted(expected - changed)[:5]}")
        extra = dict(method.extra.named_parameters())
        if extra_pattern is None:
            assert not extra, sorted(extra)
        else:
            assert extra, "the method owns no parameter"
            for n, p in extra.items():
                assert re.search(extra_pattern, n), n
                assert p.requires_grad, n
        assert result.trainable_params == (
            sum(p.numel() for p in model.parameters() if p.requires_grad)
            + sum(p.numel() for p in method.extra.parameters() if p.requires_grad))
    else:
        method.setup()

    # checkpoint round trip through safetensors onto a fresh pre-trained model
    state = method.trained_state()
    path = tmp_path / "weights.safetensors"
    models.save_state_dict(state, path, meta={"method": name})
    loaded = models.load_state_dict(path)
    assert set(loaded) == set(state)
    reloaded = cls.eval_model(mf.fresh_for(cls), loaded, hp, mf.zeroshot_head(mf.fresh_model()), alpha=1.0).eval()
    live = method.live_eval_model().eval()
    x = mf.images(5, seed=7)
    tokens = mf.class_tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(x), live.encode_image(x), rtol=1e-5, atol=1e-5)
        assert reloaded.has_text == live.has_text == (cls.backbone == "clip")
        if live.has_text:
            torch.testing.assert_close(reloaded.encode_text(tokens[:, 0]), live.encode_text(tokens[:, 0]),
                                       rtol=1e-5, atol=1e-5)
        head, live_head = reloaded.task_head(tokens), live.task_head(tokens)
        if isinstance(head, TunedClassifier):  # a cache model: its logits, at every first-stage setting
            f = live.encode_image(x)
            for setting in [head.setting, *head.grid(0)]:
                logits = head.at(**setting)(f)
                torch.testing.assert_close(logits, live_head.at(**setting)(f), rtol=1e-5, atol=1e-4)
                assert logits.shape == (5, len(mf.CLASSES))
        elif callable(head):  # an image-conditioned head (CoCoOp): a function of the image features
            feats = live.encode_image(x)
            torch.testing.assert_close(head(feats), live_head(feats), rtol=1e-5, atol=1e-4)
            assert head(feats).shape == (5, len(mf.CLASSES))
        else:
            torch.testing.assert_close(head, live_head, rtol=1e-5, atol=1e-4)
            assert head.shape[0] == len(mf.CLASSES)
    if not cls.trains:
        # nothing trained: the saved state is what setup built (a cache model's buffers), the
        # CLIP weights untouched
        assert set(state) == {f"extra.{n}" for n, _ in method.extra.named_buffers()}
        assert not dict(method.extra.named_parameters())
        after = mf.snapshot(model)
        assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.weight_space))
def test_alpha_zero_is_pretrained(name):
    """WiSE-FT α = 0 (or the adapter scaled to 0) gives the pre-trained model back."""
    cls = METHODS[name]
    model = mf.fresh_model()
    ctx = mf.context(model, reference=cls.needs_reference)
    hp = cls.Hparams(**OVERRIDES.get(name, {}))
    method = cls(hp, ctx)
    train_set = ctx.train_set if cls.uses_images else mf.train_items(with_images=False)
    fit(method, train_set, steps=2, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    state = method.trained_state()
    zs = mf.zeroshot_head(mf.fresh_model())
    merged = cls.eval_model(mf.fresh_model(), state, hp, zs, alpha=0.0).eval()
    pre = mf.fresh_model()
    x = mf.images(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(x), torch.nn.functional.normalize(pre.encode_image(x), dim=-1),
                                   rtol=0, atol=0)
        expected_head = pre.logit_scale.exp() * zs
        torch.testing.assert_close(merged.task_head(mf.class_tokens()), expected_head, rtol=1e-6, atol=1e-5)


def test_every_trial_of_params_yaml_parses():
    """One source for every default: a method's `Hparams` field defaults; a trial (written in
    finetune.trials or drawn by finetune.search) changes exactly the keys it sets. Every trial
    parses, and no two trials of a method train the same hyper-parameters (a wasted run that
    would fake a choice)."""
    from pipeline.config import load_params
    from pipeline.core.validation import to_dict
    from pipeline.methods import parse_hparams

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    raw = {"finetune": {"methods": list(params.finetune.methods)}}
    trials = params.finetune.all_trials
    assert trials, "params.yaml gives a search space (finetune.search, finetune.trials)"
    seen: dict[str, list[dict]] = {}
    for name, spec in trials.items():
        spec = dict(spec)
        method = spec.pop("method")
        assert method in METHODS, f"trial {name}: unknown method {method!r}"
        hp = to_dict(parse_hparams(method, spec, f"trial {name}"))
        defaults = to_dict(METHODS[method].Hparams())
        for key, value in defaults.items():
            want = float(spec[key]) if key in spec and isinstance(value, float) else spec.get(key, value)
            assert hp[key] == want, f"trial {name}.{key}: {hp[key]!r} != {want!r}"
        assert hp not in seen.setdefault(method, []), f"trial {name}: same as another {method} trial"
        seen[method].append(hp)
    assert set(seen) == set(raw["finetune"]["methods"]), "each compared method has a trial, and only those"


class _CountingImages:
    """The part of a WILDS dataset `LabeledImages` reads, counting every image it decodes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.y_array, self.decoded = images, labels, 0

    def get_input(self, i: int) -> torch.Tensor:
        self.decoded += 1
        return self.images[i]


def test_lpft_linear_probe_phase_decodes_no_image_per_step(monkeypatch):
    """LP-FT's LP phase reads cached features: its steps decode no image (the one pass that
    caches the features decodes each image once), and the probed head is bit-identical to
    the head an LP phase iterating the images gives (the pre-fix behaviour)."""
    from pipeline.data.torchdata import LabeledImages

    items = mf.train_items()
    x = torch.stack([items[i]["image"] for i in range(len(items))])
    y = torch.stack([items[i]["y"] for i in range(len(items))])
    hp = METHODS["lpft"].Hparams(lp_steps=5, lp_batch_size=4)

    def lp_phase() -> tuple[torch.Tensor, int]:
        source = _CountingImages(x, y)
        train = LabeledImages(source, range(len(y)), None)
        ctx = mf.context()
        ctx.train_set = ctx.train_eval_set = train
        method = METHODS["lpft"](hp, ctx)
        method.setup()  # the LP phase runs here
        return method.extra["head"].weight.detach().clone(), source.decoded

    head, decoded = lp_phase()
    assert decoded == len(y)
    monkeypatch.setattr(LabeledImages, "without_images", lambda self: self)  # the images every step
    head_with_images, decoded_with_images = lp_phase()
    assert decoded_with_images == len(y) + hp.lp_steps * hp.lp_batch_size
    assert torch.equal(head, head_with_images)
    model = mf.fresh_model()
    initial = model.logit_scale.exp().detach() * mf.zeroshot_head(model)
    assert (head - initial).abs().max() > 1e-4  # the LP phase trained the head
