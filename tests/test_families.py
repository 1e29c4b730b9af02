"""Model families beyond CLIP: SigLIP, CoCa and EVA-02, each through its real open_clip config
shrunk (the shipped `tiny-siglip`, `tiny-coca`, `tiny-eva02`) with random weights.

Each family builds and encodes to the right shapes; every registered method either refuses it
with a clear error at construction (and in the check stage) or trains on it for two trainer
steps with finite losses; FLYP on SigLIP trains with the sigmoid loss and the model's logit
bias; the checkpoint round trip holds per family; a hub tokenizer that cannot be loaded says
how to provide it as a local folder, and such a folder works.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (first, as everywhere)
import open_clip
import pytest
import torch
import yaml

from pipeline import models
from pipeline.methods import METHODS
from pipeline.models.evalmodel import TunedClassifier
from pipeline.methods.common import image_features, sample_class_prompts, text_features
from pipeline.models.losses import clip_loss, sigmoid_loss
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[1]
REAL = {"tiny-siglip": "ViT-B-16-SigLIP", "tiny-coca": "coca_ViT-B-32", "tiny-eva02": "EVA02-B-16"}
DROP = object()  # a key the shrunk config leaves out
# What each shipped config changes in the real one: sizes only (and the shrunk timm tower's
# name), plus tiny-siglip's one departure, open_clip's BPE tokenizer instead of the hub one.
SHRINK = {
    "tiny-siglip": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "timm_model_name": "tiny_vit_siglip"},
        "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2,
                     "vocab_size": 49408, "hf_tokenizer_name": DROP},
    },
    "tiny-coca": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8,
                       "attn_pooler_heads": 2},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
        "multimodal_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "attn_pooler_heads": 2},
    },
    "tiny-eva02": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "timm_model_name": "tiny_eva02_clip"},
        "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
    },
}
SIZE_KEYS = {"embed_dim", "image_size", "context_length", "width", "heads", "layers", "head_width",
             "patch_size", "attn_pooler_heads", "timm_model_name"}
TOKENIZER_KEYS = {"vocab_size", "hf_tokenizer_name"}
TIMM_SIZE_KEYS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "ref_feat_shape"}
# the block-level methods need open_clip's residual blocks in both towers: not a timm image tower
BLOCK_METHODS = {"bitfit", "aclip", "lora", "clip_lora", "radapter"}
# the methods that edit the ViT's internals need open_clip's own VisionTransformer: not a timm tower
VIT_METHODS = {"maple", "vpt_deep", "adaptformer"}
# lipsum_ft draws random texts from CLIP's BPE vocabulary: not SigLIP's tokenizer
TEXT_VOCAB_METHODS = {"lipsum_ft"}
# carot constrains open_clip's visual.proj (a ResNet's attnpool.c_proj): not a timm image tower
PROJECTION_METHODS = {"carot"}
REFUSES = {"tiny-siglip": BLOCK_METHODS | VIT_METHODS | TEXT_VOCAB_METHODS | PROJECTION_METHODS,
           "tiny-eva02": BLOCK_METHODS | VIT_METHODS | PROJECTION_METHODS, "tiny-coca": set()}
OVERRIDES = {"lpft": {"lp_steps": 2}, "coop": {"n_ctx": 4}}  # coop: its 16-token paper context fills a tiny tower's 16 positions
STEPS = 2


def _merge(real: dict, shrink: dict) -> dict:
    out = copy.deepcopy(real)
    for key, value in shrink.items():
        if value is DROP:
            out.pop(key)
        elif isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _keys(shrink: dict) -> set[str]:
    return {k for k, v in shrink.items() for k in ([k] if not isinstance(v, dict) else _keys(v))}


@functools.cache
def _state(arch: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):  # fixed weights without moving the global RNG
        torch.manual_seed(1234)
        model = models.create(arch).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh(arch: str) -> torch.nn.Module:
    """The family's tiny model with fixed random ("pre-trained") weights, in eval mode."""
    model = models.create(arch).model
    model.load_state_dict(_state(arch))
    return model.eval()


# ---- the configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(REAL))
def test_shipped_config_is_the_real_one_with_sizes_shrunk(arch):
    shipped = json.loads((models.CONFIG_DIR / f"{arch}.json").read_text())
    real = open_clip.get_model_config(REAL[arch])
    assert shipped == _merge(real, SHRINK[arch])
    assert _keys(SHRINK[arch]) <= SIZE_KEYS | (TOKENIZER_KEYS if arch == "tiny-siglip" else set())
    tower = shipped["vision_cfg"].get("timm_model_name")
    if tower is not None:  # the shrunk timm tower is the real one with smaller sizes
        base, sizes = models.TIMM_TOWERS[tower]
        assert base == real["vision_cfg"]["timm_model_name"]
        assert set(sizes) <= TIMM_SIZE_KEYS
        assert sizes["img_size"] == shipped["vision_cfg"]["image_size"]


@pytest.mark.parametrize("arch", sorted(REAL))
def test_family_builds_offline_and_encodes(arch):
    clip = models.create(arch)
    model, cfg = clip.model, open_clip.get_model_config(arch)
    tokens = clip.tokenizer(["a photo of a circle.", "a drawing of a square.", "a triangle"])
    assert tokens.shape == (3, cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        f, g = model.encode_image(mf.images(3)), model.encode_text(tokens)
    assert f.shape == g.shape == (3, cfg["embed_dim"])
    assert torch.isfinite(f).all() and torch.isfinite(g).all()
    assert clip.image_size == cfg["vision_cfg"]["image_size"]
    if arch == "tiny-siglip":
        import timm

        assert float(model.logit_bias.detach()) == cfg["init_logit_bias"] == -10
        assert isinstance(model.visual.trunk, timm.models.VisionTransformer)
        assert model.visual.trunk.attn_pool is not None and model.visual.trunk.cls_token is None  # MAP head
        assert model.text.attn_mask is None and model.text.pool_type == "last"  # bidirectional text tower
    elif arch == "tiny-coca":
        assert isinstance(model, open_clip.CoCa) and model.logit_bias is None
        assert model.visual.attn_pool is not None and len(model.text_decoder.resblocks) == 1
    else:
        from timm.models.eva import Eva

        assert isinstance(model.visual.trunk, Eva) and model.visual.trunk.rope is not None
        assert model.logit_bias is None
    if hasattr(model.visual, "trunk"):
        assert tuple(model.visual.trunk.patch_embed.img_size) == (clip.image_size,) * 2


# ---- the methods on each family --------------------------------------------------------------


CLIP_METHODS = sorted(n for n, c in METHODS.items() if c.backbone == "clip")  # vision-only ones take no CLIP


@pytest.mark.parametrize("arch,name", [(a, n) for a in sorted(REAL) for n in CLIP_METHODS])
def test_every_method_trains_or_refuses(arch, name):
    cls = METHODS[name]
    model = fresh(arch)
    before = mf.snapshot(model)
    if name in REFUSES[arch]:
        with pytest.raises(ValueError) as err:
            cls.check_model(model)
        msg = str(err.value)
        assert msg.startswith(name) and "Allowed" in msg and "\n" not in msg, msg
        assert "timm" in msg or name in TEXT_VOCAB_METHODS, msg
        with pytest.raises(ValueError, match=f"^{name} "):  # at construction: before any work
            cls(cls.Hparams(), mf.context(model, reference=cls.needs_reference))
        after = mf.snapshot(model)
        assert all(torch.equal(before[n], after[n]) for n in before)
        return
    cls.check_model(model)
    ctx = mf.context(model, reference=cls.needs_reference)
    method = cls(cls.Hparams(**OVERRIDES.get(name, {})), ctx)
    if not cls.trains:
        method.setup()
        _check_evaluates_the_pretrained_zero_shot_head(arch, cls, method, ctx, before)
        return
    train_set = ctx.train_set if cls.uses_images else mf.train_items(with_images=False)
    result = fit(method, train_set, steps=STEPS, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    assert len(result.history) == STEPS * cls.n_runs
    assert all(math.isfinite(h["loss"]) for h in result.history), result.history
    after = mf.snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    extra_changed = any(p.requires_grad for p in method.extra.parameters())
    assert changed or extra_changed, "nothing trained"
    if name in ("flyp", "dive"):
        assert not {n for n in changed if n.startswith("text_decoder.")}  # CoCa's decoder stays frozen
        if arch == "tiny-siglip":
            assert "logit_bias" in changed


def _check_evaluates_the_pretrained_zero_shot_head(arch, cls, method, ctx, before) -> None:
    """A method that does not train (zero-shot; tip_adapter): nothing trainable, the model
    untouched; its eval model, in memory and rebuilt from the saved state (empty, or a cache
    model's buffers), is the pre-trained image tower with the prompt-ensemble head, computed
    here without `build_head`: per class the mean of the normalised template embeddings,
    renormalised, times the logit scale (a cache model: its logits with the cache weighted 0)."""
    trainable = [n for n, p in method.root.named_parameters() if p.requires_grad]
    assert not trainable, f"{cls.name} leaves parameters trainable: {trainable[:5]}"
    state = method.trained_state()
    # the finetune stage saves only what setup built: nothing (zero-shot), or a cache model's
    # buffers (tip_adapter)
    assert set(state) == {f"extra.{n}" for n, _ in method.extra.named_buffers()}, sorted(state)[:5]
    after = mf.snapshot(ctx.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    pre = fresh(arch)
    tokens = ctx.class_tokens
    x = mf.images(4, seed=11)
    with torch.no_grad():
        c, t, length = tokens.shape
        g = torch.nn.functional.normalize(pre.encode_text(tokens.reshape(c * t, length)).float(), dim=-1)
        head = torch.nn.functional.normalize(g.view(c, t, -1).mean(1), dim=-1)
        want_head = pre.logit_scale.exp().float() * head
        want_image = torch.nn.functional.normalize(pre.encode_image(x).float(), dim=-1)
        for where, ev in (("live", method.live_eval_model()),
                          ("saved", cls.eval_model(fresh(arch), state, method.hp, ctx.zeroshot_head))):
            ev = ev.eval()
            head = ev.task_head(tokens)
            if isinstance(head, TunedClassifier):  # a cache model: its cache weighted 0 = zero-shot
                torch.testing.assert_close(head.at(alpha=0.0)(want_image), want_image @ want_head.t(), rtol=1e-5,
                                           atol=1e-5, msg=lambda m, w=where: f"{w} eval model: {m}")
                assert not torch.allclose(head(want_image), want_image @ want_head.t())  # the cache counts
            else:
                torch.testing.assert_close(head, want_head, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, w=where: f"{w} eval model: {m}")
            torch.testing.assert_close(ev.encode_image(x), want_image, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, w=where: f"{w} eval model: {m}")


def test_flyp_on_siglip_is_the_sigmoid_loss_with_the_model_bias():
    model = fresh("tiny-siglip")
    ctx = mf.context(model)
    method = METHODS["flyp"](METHODS["flyp"].Hparams(), ctx)
    method.setup()
    batch = {k: torch.stack([ctx.train_set[i][k] for i in range(6)]) for k in ("image", "y")}
    torch.manual_seed(5)
    got = method.loss(batch, 0)["flyp_loss"]
    torch.manual_seed(5)
    tokens = sample_class_prompts(ctx.class_tokens, batch["y"])
    f, g = image_features(model, batch["image"]), text_features(model, tokens)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(got, sigmoid_loss(f, g, scale, model.logit_bias), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, clip_loss(f, g, scale))
    got.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


@pytest.mark.parametrize("arch,name", [(a, "flyp") for a in sorted(REAL)] + [("tiny-coca", "radapter")])
def test_checkpoint_round_trip(arch, name, tmp_path):
    cls = METHODS[name]
    model = fresh(arch)
    ctx = mf.context(model)
    hp = cls.Hparams()
    method = cls(hp, ctx)
    fit(method, ctx.train_set, steps=STEPS, batch_size=6, seed=0, device=torch.device("cpu"), progress=False)
    path = tmp_path / "weights.safetensors"
    models.save_state_dict(method.trained_state(), path)
    reloaded = cls.eval_model(fresh(arch), models.load_state_dict(path), hp, mf.zeroshot_head(fresh(arch))).eval()
    live = method.live_eval_model().eval()
    x, tokens = mf.images(4, seed=7), mf.class_tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(x), live.encode_image(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded.encode_text(tokens[:, 0]), live.encode_text(tokens[:, 0]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded.task_head(tokens), live.task_head(tokens), rtol=1e-5, atol=1e-4)
        pre = mf.zeroshot_head(fresh(arch))
        assert not torch.allclose(live.task_head(tokens) / live.scale, pre, atol=1e-6)  # it trained


# ---- the check stage -----------------------------------------------------------------------


def _params(tmp: Path, arch: str, methods: list[str], **model) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(arch=arch, **model)
    ft = raw["finetune"]
    ft["methods"] = methods
    ft["search"] = {s: spec for s, spec in ft["search"].items() if spec.get("method", s) in methods}
    ft["trials"] = {t: spec for t, spec in ft["trials"].items() if spec["method"] in methods}
    ft["trials"].update({f"{m}-default": {"method": m} for m in methods
                         if not any(s["method"] == m for s in ft["trials"].values())})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_check_stage_refuses_a_method_that_cannot_adapt_the_family(tmp_path):
    from pipeline.stages.check import check_params

    with pytest.raises(ValueError, match=r"^bitfit trains the biases .* image tower \(TimmModel \(timm Eva\)\)"):
        check_params(_params(tmp_path, "tiny-eva02", ["lp", "bitfit"]))
    params = check_params(_params(tmp_path, "tiny-siglip", ["lp", "ft", "flyp", "dive"]))
    assert params.model.arch == "tiny-siglip"


# ---- tokenizers ----------------------------------------------------------------------------


@functools.cache
def _register(name: str, config: str) -> str:
    folder = Path(tempfile.mkdtemp(prefix="families-configs-"))
    (folder / f"{name}.json").write_text(config)
    open_clip.add_model_config(folder)
    return name


def hub_siglip() -> str:
    """tiny-siglip with the real SigLIP config's Hugging Face tokenizer (vocab 32,000)."""
    real = open_clip.get_model_config("ViT-B-16-SigLIP")["text_cfg"]
    cfg = json.loads((models.CONFIG_DIR / "tiny-siglip.json").read_text())
    cfg["text_cfg"].update({k: real[k] for k in ("hf_tokenizer_name", "tokenizer_kwargs", "vocab_size")})
    return _register("families-test-siglip-hub", json.dumps(cfg))


def test_hub_tokenizer_offline_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch = hub_siglip()
    clip = models.create(arch)  # the model and its transforms need no tokenizer
    with pytest.raises(ValueError) as err:
        clip.tokenizer
    msg = str(err.value)
    assert msg.startswith("model.tokenizer: ") and "timm/ViT-B-16-SigLIP" in msg, msg
    assert "save_pretrained" in msg and "set model.tokenizer to its path" in msg and "\n" not in msg, msg
    from pipeline.stages.check import check_params

    with pytest.raises(ValueError, match=r"^model\.tokenizer: .*timm/ViT-B-16-SigLIP"):
        check_params(_params(tmp_path, arch, ["lp"]))
    with pytest.raises(ValueError, match=r"^model\.tokenizer: .*nope: not found"):
        models.create(arch, tokenizer=str(tmp_path / "nope")).tokenizer


NEEDS_TRANSFORMERS = ("a local Hugging Face tokenizer needs `transformers`, not installed: "
                      "`pip install transformers` to run this test")


def _save_word_tokenizer(folder: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(str(folder))


def test_a_local_tokenizer_folder_tokenises_for_the_model(tmp_path):
    """A saved Hugging Face tokenizer folder tokenises for the model. Needs `transformers`,
    which is not a dependency (installed, open_clip imports it in every process that imports
    open_clip, which would slow every stage of the end-to-end tests): without it the test is
    reported as skipped (`-ra`), with the command that runs it."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    folder = tmp_path / "tokenizer"
    _save_word_tokenizer(folder, ["a", "photo", "drawing", "of", *mf.CLASSES])
    clip = models.create(hub_siglip(), tokenizer=str(folder))
    tokens = clip.tokenizer(["a photo of a circle.", "a drawing of a square."])
    assert tokens.shape == (2, 16)
    # "a photo of a circle", then padding: SigLIP's `tokenizer_kwargs` (clean: canonicalize)
    # apply to the local tokenizer too, and drop the "."
    assert tokens[0, :6].tolist() == [3, 4, 6, 3, 7, 0]
    assert tokens[1, :6].tolist() == [3, 5, 6, 3, 8, 0]
    with torch.no_grad():
        assert clip.model.encode_text(tokens).shape == (2, 64)
    # a file in the folder stands for the folder
    assert torch.equal(models.create(hub_siglip(), tokenizer=str(folder / "tokenizer.json")).tokenizer(
        ["a photo of a circle."]), tokens[:1])


def test_a_local_tokenizer_larger_than_the_text_tower_is_refused(tmp_path):
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    folder = tmp_path / "tokenizer"
    _save_word_tokenizer(folder, ["a", "photo", "drawing", "of", *mf.CLASSES])  # 10 tokens
    cfg = json.loads((models.CONFIG_DIR / "tiny-siglip.json").read_text())
    cfg["text_cfg"].update(vocab_size=8, hf_tokenizer_name="nowhere/none")
    small = _register("families-test-siglip-vocab8", json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^model\.tokenizer: .* has 10 tokens, more than the 8 .*vocab_size"):
        models.create(small, tokenizer=str(folder)).tokenizer
    cfg["text_cfg"].update(vocab_size=10)  # exactly the tokenizer's size fits
    fits = _register("families-test-siglip-vocab10", json.dumps(cfg))
    assert models.create(fits, tokenizer=str(folder)).tokenizer(["a circle"]).shape == (1, 16)


def test_a_local_tokenizer_vocab_check_runs_without_transformers(tmp_path, monkeypatch):
    """The vocabulary-size refusal of a local tokenizer, with open_clip's `HFTokenizer`
    replaced by a stand-in with 10 tokens, so that it runs where the test above skips."""

    class TenTokens:
        def __init__(self, folder, context_length, tokenizer_mode=None, **kwargs):
            self.tokenizer = [f"t{i}" for i in range(10)]

    monkeypatch.setattr(models, "HFTokenizer", TenTokens)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    cfg = json.loads((models.CONFIG_DIR / "tiny-siglip.json").read_text())
    cfg["text_cfg"].update(vocab_size=9, hf_tokenizer_name="nowhere/none")
    small = _register("families-test-siglip-standin-vocab9", json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^model\.tokenizer: .* has 10 tokens, more than the 9 .*vocab_size"):
        models.load_tokenizer(small, str(folder))
    cfg["text_cfg"].update(vocab_size=10)  # exactly the tokenizer's size fits
    fits = _register("families-test-siglip-standin-vocab10", json.dumps(cfg))
    assert isinstance(models.load_tokenizer(fits, str(folder)), TenTokens)


def test_a_local_tokenizer_folder_without_transformers_names_the_package(tmp_path, monkeypatch):
    """Without `transformers` (hidden here: `import transformers` fails as when it is not
    installed) a folder is refused with the package to install."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match=r"^model\.tokenizer: .*needs the `transformers` package"):
        models.create(hub_siglip(), tokenizer=str(folder)).tokenizer


def test_a_tag_brings_its_image_transform():
    """SigLIP's webli weights expect mean = std = 0.5 and a squashing resize, not the OpenAI
    defaults of an untagged build; `builtin` and a weights file keep the config's defaults."""
    assert models._tag_transform("ViT-B-16-SigLIP", "webli") == {
        "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "image_interpolation": "bicubic",
        "image_resize_mode": "squash"}
    assert models._tag_transform("tiny-siglip", "builtin") == {}
    assert models._tag_transform("ViT-B-16-SigLIP", "weights/model.safetensors") == {}
    assert models._tag_transform("ViT-B-16-SigLIP", None) == {}
