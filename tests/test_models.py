"""Model factory: real open_clip architectures from local files, offline tag errors."""

import time

import open_clip
import pytest
import torch

from pipeline import models


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("w") / "vitb32.safetensors"
    models.save_state_dict(model.state_dict(), path)
    return model.eval(), path


def test_real_arch_from_local_safetensors_is_identical(vit_b32_file):
    model, path = vit_b32_file
    clip = models.create("ViT-B-32", path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = clip.tokenizer(["a photo of a cat", "a photo of a dog"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), clip.model.encode_image(x))
        assert torch.equal(model.encode_text(tokens), clip.model.encode_text(tokens))


def test_fetch_pretrained_copies_a_local_file(vit_b32_file, tmp_path):
    _, path = vit_b32_file
    info = models.fetch_pretrained("ViT-B-32", str(path), tmp_path / "out.safetensors")
    assert info["sha256"] == models.file_sha256(tmp_path / "out.safetensors")
    a = models.load_state_dict(path)
    b = models.load_state_dict(tmp_path / "out.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_that_do_not_fit_are_rejected(vit_b32_file, tmp_path):
    _, path = vit_b32_file
    with pytest.raises(ValueError, match="does not fit"):
        models.fetch_pretrained("RN50", str(path), tmp_path / "out.safetensors")


def test_offline_tag_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        models.fetch_pretrained("ViT-B-32", "openai", tmp_path / "w.safetensors")
    assert time.perf_counter() - t < 2.0
    msg = str(err.value)
    assert "model.pretrained" in msg and "file path" in msg
    assert not (tmp_path / "w.safetensors").exists()


def test_unknown_tag_and_arch_named(tmp_path):
    with pytest.raises(ValueError, match="model.pretrained"):
        models.fetch_pretrained("ViT-B-32", "not-a-tag", tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="model.arch"):
        models.create("ViT-Q-99")
