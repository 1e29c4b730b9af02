"""Vision-only baselines: a new linear head on an ImageNet-style backbone, fine-tuned end to end
(`vision_ft`) or linear-probed (`vision_lp`), as in the MIT LL few-shot WILDS study."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, unfreeze
from pipeline.methods.common import cached_features
from pipeline.models.losses import fp32_loss
from pipeline.models.vision import VisionBackbone, VisionEvalModel


@fp32_loss
def linear_ce(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(W f + b, y), in fp32."""
    return F.cross_entropy(F.linear(features, weight, bias), labels)


class _VisionMethod(Method):
    """A new linear head `nn.Linear(D, C)` (PyTorch's default initialisation, drawn under the
    run's seed) on the backbone's pooled, unnormalised features, cross-entropy: the MIT LL
    study's `model.fc = nn.Linear(num_ftrs, n_classes)`. There is no text tower, hence no
    zero-shot level and no WiSE-FT (α = 0 would be a random head: `weight_space` is False);
    zero-shot retention and RSA do not apply (the report says so).

    The saved state keeps the trainer's naming: `clip.<param>` for the trained backbone
    parameters (the root module is called `clip` whatever the model) and `extra.head.*`."""

    backbone = "vision"
    trains_extra = r"^head\.(weight|bias)$"
    weight_space = False
    family = "vision-only"
    # trials at one seed start from the same backbone and the same head draw (the run's seed)
    soups = True

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        if not isinstance(model, VisionBackbone):
            raise ValueError(f"{cls.name} trains a vision-only backbone (params `vision`), not "
                             f"{type(model).__name__}; the finetune stage gives it the model `vision.arch` names")

    def _new_head(self) -> None:
        if "head" not in self.extra:
            self.extra["head"] = nn.Linear(self.ctx.model.num_features, self.ctx.n_classes).to(self.ctx.device)
        for p in self.extra["head"].parameters():
            p.requires_grad_(True)

    def live_eval_model(self) -> VisionEvalModel:
        head = self.extra["head"]
        return VisionEvalModel(self.ctx.model, head.weight, head.bias)

    @classmethod
    def eval_model(cls, model: nn.Module, state: dict[str, torch.Tensor], hp, zeroshot_head: torch.Tensor,
                   alpha: float = 1.0) -> VisionEvalModel:
        """The saved backbone parameters loaded into `model` (the pre-trained backbone) and the
        saved head. Only α = 1 exists (no WiSE-FT)."""
        if alpha != 1.0:
            raise ValueError(f"{cls.name}: no WiSE-FT for a new head (α = {alpha}); only α = 1")
        trained = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        if trained:
            unknown = sorted(set(trained) - set(model.state_dict()))
            if unknown:
                raise KeyError(f"saved weights not in the model: {unknown[:5]}")
            model.load_state_dict(trained, strict=False)
        return VisionEvalModel(model, state["extra.head.weight"], state["extra.head.bias"])


@dataclass(frozen=True)
class VisionFTHparams(BaseHparams):
    lr: Float = 1e-4
    weight_decay: Float = 1e-4
    warmup_steps: Int = 6


@register
class VisionFinetune(_VisionMethod):
    """`vision_ft` (MIT LL "pretrained_finetune"): every backbone parameter and the new head
    train, cross-entropy.

    Paper recipe (MIT LL, ImageNet ViT-B/32 and ResNet-50): Adam, lr 1e-5, weight decay 1e-4
    (1e-2 on Camelyon17), batch 128, 30 epochs, StepLR(15, 0.1) after 5 warm-up epochs.
    Few-shot default (ours, `VisionFTHparams`): lr 1e-4 with 6 warm-up steps, as FT's (runs of
    tens of steps), the paper's weight decay 1e-4; AdamW and our cosine schedule (the
    project's one optimiser). OPEN (ours): the head takes the same lr as the backbone (the
    paper's single parameter group).

    Precision: the backbone in the trainer's precision (bf16 autocast on CUDA); head and
    cross-entropy in fp32 with autocast off. No random draw in the loss.
    BatchNorm backbones (ResNets) train their statistics in training mode, as in the paper."""

    name = "vision_ft"
    trains_clip = r""
    Hparams = VisionFTHparams

    def setup(self) -> None:
        freeze(self.root)
        unfreeze(self.ctx.model, lambda n, p: True)
        self._new_head()

    def loss(self, batch, step):
        head = self.extra["head"]
        feats = self.ctx.model.encode_image(batch["image"])
        return {"ce_loss": linear_ce(feats, head.weight, head.bias, batch["y"])}  # (upcast to fp32 inside)


@dataclass(frozen=True)
class VisionLPHparams(BaseHparams):
    lr: Float = 1e-2
    weight_decay: Float = 0.0
    warmup_steps: Int = 0


@register
class VisionLinearProbe(_VisionMethod):
    """`vision_lp` (MIT LL "pretrained_linearprob"): frozen backbone, only the new head
    trains, cross-entropy, on features cached once at setup (no image forward per step).

    OPEN (ours): features without augmentation (the eval transform, as `lp`); minibatch AdamW
    (the project's trainer) instead of the paper's Adam; lr 1e-2 by default, a head from
    scratch needing a larger step than `lp`'s zero-shot-initialised one (lr 1e-3), no weight
    decay. Precision: fp32 throughout (features cached before the autocast region)."""

    name = "vision_lp"
    Hparams = VisionLPHparams
    uses_images = False

    def setup(self) -> None:
        freeze(self.root)
        self.features = cached_features(self.ctx, self.ctx.model, "vision_lp features")
        self._new_head()

    def loss(self, batch, step):
        head = self.extra["head"]
        feats = self.features[batch["index"].to(self.features.device)]
        return {"ce_loss": linear_ce(feats, head.weight, head.bias, batch["y"])}
