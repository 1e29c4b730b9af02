"""Vision-only backbones (timm): the counterparts the MIT LL few-shot study compares CLIP with.

params.yaml `vision`:
- `arch`: `tiny-vit` (the built-in counterpart of the tiny CLIP: the same ViT shape as its image
  tower, `TINY_VIT`) or any timm model name (`python -c "import timm; print(timm.list_models())"`),
  e.g. `vit_base_patch32_224` or `resnet50` (the MIT LL study's ViT-B/32 and ResNet-50);
- `pretrained`: `builtin` (the `pretrained` stage pre-trains `tiny-vit` on the caption corpus's
  labels, `pipeline.training.pretrain.pretrain_vision`) or a path to a local state-dict file
  (timm's own keys, e.g. `timm.create_model(name, pretrained=True).state_dict()` saved with
  safetensors on a machine with internet): the same offline rule as the CLIP weights.

Why timm: it is the field's library of ImageNet backbones and open_clip already depends on it
(its EVA and ConvNeXt towers); torchvision's model zoo would be a second source of the same
architectures.

The backbone is built without its classifier (`num_classes=0`): `encode_image` returns the
pooled features (timm's `forward_head(pre_logits=True)`), on which a method puts a new linear
head. Images: the CLIP model's own transforms (the same resize, crop and training augmentation,
so the image cache serves both and both compare on the same pixels) with the normalisation
swapped for the backbone's (`normalisation`: the timm config's mean and std, i.e. ImageNet's for
`tiny-vit` and most ImageNet weights). A ViT is built at the CLIP model's image size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

BUILTIN = "builtin"
# The ViT of pipeline/models/configs/tiny-clip.json's image tower (width 128, 4 layers, 4 heads of
# 32, patch 8, class-token pooling) as a timm VisionTransformer; `img_size` comes from the CLIP.
TINY_VIT = {"model_name": "vit_tiny_patch16_224", "patch_size": 8, "embed_dim": 128, "depth": 4,
            "num_heads": 4, "global_pool": "token"}
ARCHS = {"tiny-vit": TINY_VIT}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionBackbone(nn.Module):
    """A timm backbone without classifier: `encode_image(x)` -> pooled features [B, D]
    (unnormalised). No text tower: `has_text` is False."""

    has_text = False

    def __init__(self, trunk: nn.Module, arch: str):
        super().__init__()
        self.visual = trunk
        self.arch = arch

    @property
    def num_features(self) -> int:
        return int(self.visual.num_features)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


@dataclass
class Vision:
    """A vision backbone with its transforms (the `models.Clip` fields a stage reads)."""

    model: VisionBackbone
    preprocess_train: Callable
    preprocess_val: Callable
    arch: str
    tokenizer: None = None


def known_arch(arch: str) -> bool:
    import timm

    return arch in ARCHS or timm.is_model(arch)


def check_arch(arch: str) -> None:
    if not known_arch(arch):
        raise ValueError(f"vision.arch: unknown architecture {arch!r}. Allowed: 'tiny-vit' (built in) or a timm "
                         "model name (`python -c \"import timm; print(timm.list_models())\"`), e.g. "
                         "'vit_base_patch32_224' or 'resnet50'.")


def build(arch: str, image_size: int) -> VisionBackbone:
    """`arch` with random weights and no classifier, at `image_size` where the model takes one."""
    import timm

    check_arch(arch)
    kwargs = dict(ARCHS.get(arch, {"model_name": arch}))
    name = kwargs.pop("model_name")
    try:
        trunk = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    except TypeError:  # convolutional nets take any size and no `img_size`
        trunk = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return VisionBackbone(trunk, arch)


def normalisation(model: VisionBackbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's weights expect: ImageNet's for `tiny-vit` (pre-trained
    here with them), else the timm config's (ImageNet's for most weights; 0.5 for timm's
    `augreg` ViTs)."""
    if model.arch in ARCHS:
        return IMAGENET_MEAN, IMAGENET_STD
    cfg = getattr(model.visual, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def renormalised(transform: Callable, mean, std) -> Callable:
    """A copy of a torchvision `Compose` whose `Normalize` uses `mean` and `std`."""
    from torchvision.transforms import Normalize

    out = copy.deepcopy(transform)
    found = False
    for t in getattr(out, "transforms", []):
        if isinstance(t, Normalize):
            t.mean, t.std = list(mean), list(std)
            found = True
    if not found:
        raise ValueError("the CLIP model's transform has no Normalize step to replace")
    return out


def create(arch: str, like, weights: Path | None = None, device: str | torch.device = "cpu") -> Vision:
    """`arch` at the image size of `like` (a `models.Clip`), with its transforms renormalised,
    and `weights` (a local state-dict file) loaded if given."""
    model = build(arch, like.image_size)
    if weights is not None:
        load_checked(model, Path(weights))
    mean, std = normalisation(model)
    model.to(device).eval()
    return Vision(model, renormalised(like.preprocess_train, mean, std), renormalised(like.preprocess_val, mean, std),
                  arch)


def load_checked(model: VisionBackbone, path: Path) -> None:
    """Load a state dict (timm's keys, or ours with the `visual.` prefix) into the backbone;
    the file's classifier (timm's `head.*` / `fc.*` / `classifier.*`) is dropped: the method
    puts its own head on. ValueError naming the file where the tensors do not fit."""
    from pipeline.models import read_weights

    try:
        state = read_weights(path)
    except ValueError as err:  # its sentence names the CLIP's key
        raise ValueError(str(err).replace("model.pretrained:", "vision.pretrained:", 1)) from err
    state = {k.removeprefix("visual."): v for k, v in state.items()}
    classifier = (getattr(model.visual, "pretrained_cfg", None) or {}).get("classifier", "head")
    names = {classifier} if isinstance(classifier, str) else set(classifier)
    state = {k: v for k, v in state.items() if k.split(".")[0] not in names | {"head", "fc", "classifier"}
             or k in model.visual.state_dict()}
    try:
        missing, unexpected = model.visual.load_state_dict(state, strict=False)
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise ValueError(f"vision.pretrained: {path} does not fit architecture {model.arch!r} "
                         f"({lines[1].strip() if len(lines) > 1 else err})") from err
    if missing or unexpected:
        raise ValueError(f"vision.pretrained: {path} does not fit architecture {model.arch!r} "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


class VisionEvalModel(nn.Module):
    """What evaluation reads (`EvalModel`'s interface) for a backbone with a linear head
    `logits = W φ(x) + b`: `encode_image` returns the pooled features with a constant 1 appended,
    [φ(x), 1], and `task_head` the head with its bias as the last column, [W | b], so that the
    pipeline's one classification rule, argmax(features · headᵀ), computes exactly the head's
    logits. The features are not normalised (a vision head is trained on raw features);
    nothing that needs normalised embeddings or a text tower (retention, RSA) runs on it:
    `has_text` is False."""

    has_text = False

    def __init__(self, model: VisionBackbone, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("head", torch.cat([weight.detach().float(), bias.detach().float()[:, None]], 1),
                             persistent=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        f = self.model.encode_image(images).float()
        return torch.cat([f, torch.ones_like(f[:, :1])], 1)

    def task_head(self, class_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.model.arch}: a vision-only model has no text tower")

    def zeroshot_head(self, class_tokens: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.model.arch}: a vision-only model has no text tower (no zero-shot head)")
