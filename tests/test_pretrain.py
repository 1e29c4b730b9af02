"""Contrastive pre-training of the built-in tiny CLIP (pipeline/pretrain.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import pipeline  # noqa: F401
from pipeline.data.synthetic import SyntheticConfig, generate_corpus, generate_dataset
from pipeline.pretrain import PretrainConfig, load_corpus, pretrain

ARCH = "tiny-clip"
DATA = SyntheticConfig.small()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    generate_dataset(root / "wilds", DATA)
    return root / "wilds", generate_corpus(root / "corpus", DATA)


@torch.no_grad()
def test_load_corpus(data):
    _, corpus = data
    images, titles = load_corpus(corpus, 32)
    assert images.dtype == torch.uint8 and images.shape == (DATA.n_corpus, 3, 32, 32)
    assert len(titles) == DATA.n_corpus
    resized, _ = load_corpus(corpus, 16)
    assert resized.shape[-2:] == (16, 16)


def test_pretrain_is_deterministic(data, tmp_path):
    _, corpus = data
    cfg = dataclasses.replace(PretrainConfig.small(), steps=4, warmup=1)
    first = pretrain(ARCH, corpus, cfg, tmp_path / "a.safetensors", progress=False)
    second = pretrain(ARCH, corpus, cfg, tmp_path / "b.safetensors", progress=False)
    assert first["sha256"] == second["sha256"]
    assert first["final_loss"] == second["final_loss"]
