"""CLAP: class prototypes initialised to the text embeddings, held near them by a
class-adaptive constraint, trained on cached features of augmented views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import view_batch
from pipeline.models.losses import fp32_loss


@dataclass(frozen=True)
class CLAPHparams(BaseHparams):
    lr: Float = 0.1  # SGD (momentum 0.9), cosine
    weight_decay: Float = 0.0
    warmup_steps: Int = 0
    views: Int = 20  # augmented views of each training image, encoded once at setup
    momentum: Float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if self.views < 1:
            raise ValueError(f"views: {self.views} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


# ---- the pieces, as pure functions (tests/test_fewshot_baselines.py checks each) -----------


def clap_logits(f: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """s · f̂ · ŵᵀ [N, C]: normalised features against the normalised prototypes."""
    return scale * F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).t()


def constraint_weights(logits: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """λ [C]: for each class c, the mean zero-shot softmax probability of c over the rows
    (support samples, every view) labelled c; 1 for a class with no row."""
    prob = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)  # p(y_i | x_i)
    sums = torch.zeros(n_classes, dtype=prob.dtype, device=prob.device).index_add_(0, y, prob)
    counts = torch.bincount(y, minlength=n_classes).to(prob.dtype)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums))


def constraint(prototypes: torch.Tensor, anchors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_c λ_c ‖w_c − t̄_c‖² (squared L2 summed over the dimensions)."""
    return (weights * (prototypes - anchors).pow(2).sum(-1)).mean()


@fp32_loss
def clap_loss(f, prototypes, anchors, weights, y, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of s·f̂·ŵᵀ, the constraint)."""
    return F.cross_entropy(clap_logits(f, prototypes, scale), y), constraint(prototypes, anchors, weights)


class Prototypes(nn.Module):
    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())


@torch.no_grad()
def raw_text_means(model: nn.Module, class_tokens: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """t̄ [C, D]: per class, the mean over its templates of the UNnormalised text embeddings."""
    from pipeline.models.zeroshot import encode_text_with_grad

    c, t, length = class_tokens.shape
    flat = class_tokens.reshape(c * t, length).to(device)
    emb = torch.cat([encode_text_with_grad(model, flat[i:i + batch_size]).float()
                     for i in range(0, flat.shape[0], batch_size)])
    return emb.view(c, t, -1).mean(1)


@register
class CLAP(Method):
    """CLAP (Silva-Rodríguez, Hajimiri, Ben Ayed & Dolz, "A Closer Look at the Few-Shot
    Adaptation of Large Vision-Language Models", CVPR 2024, arXiv 2312.12730; code
    jusiro/CLAP, `trainers/adapters.py`, its `ZS` initialisation with the `l2` constraint):

        logits = s · f̂ · ŵ_cᵀ,  L = CE(logits, y) + mean_c λ_c ‖w_c − t̄_c‖²

    the prototypes w_c initialised to t̄_c, the template-averaged UNnormalised text
    embeddings of the frozen text tower (the code's `_get_base_text_features`), λ_c fixed at
    setup to the mean zero-shot softmax probability of class c over its own support rows
    (every augmented view; zero-shot logits s·f̂·normalise(t̄)ᵀ, the head at initialisation).
    Trained on image features cached once at setup: `views` = 20 augmented passes (the
    training transform) over every training image, as the code's `epochs_aumentation`. Only
    the prototypes train; s is the model's frozen logit scale. SGD lr 0.1, momentum 0.9, no
    weight decay, cosine. The paper argues for no validation at all: its recipe is the
    `none` selection protocol (a trial list of one).

    OPEN choices (ours):
    - a trainer step takes every view of each sample of its batch (B·views rows), so an
      epoch over the samples is an epoch over the cached rows, as in the code (its batch is
      256 rows of the shuffled views); batch size and number of steps are the project's
      (`finetune.train`), not the paper's 300 epochs;
    - the views are drawn with the project's training transform (the dataset's
      `preprocess_train`), not the code's Dassl augmentation (random resized crop and flip);
      the draw is seeded by the run's seed and the view number, outside the global RNG;
    - the templates are the dataset's prompt file (the code: the CoOp custom template, plus
      ImageNet's selected ones for ImageNet);
    - λ_c = 1 (fully held) for a class with no support row (the code divides by zero);
    - no WiSE-FT α (`weight_space = False`): the constraint already keeps each prototype near
      its zero-shot value;
    - the evaluated head is s·ŵ (the prototypes normalised), on the same normalised image
      features as every other method.

    Precision: fp32 throughout (features and text embeddings cached at setup, before the
    trainer's autocast; logits, cross-entropy and constraint in fp32 with autocast off).
    """

    name = "clap"
    family = "probe"
    trains_extra = r"^prototypes\.weight$"
    Hparams = CLAPHparams
    uses_images = False

    def setup(self) -> None:
        freeze(self.root)
        ctx, hp = self.ctx, self.hp
        model = ctx.model.to(ctx.device)
        was_training = model.training
        model.eval()
        self.anchors = raw_text_means(model, ctx.class_tokens, ctx.device)
        self.features = self._views(model)  # [V, N, D], normalised
        self.labels = torch.stack([torch.as_tensor(it["y"]) for it in _labels_only(ctx.train_set)]).long().to(ctx.device)
        model.train(was_training)
        self.scale = model.logit_scale.exp().detach().float()
        v, n, d = self.features.shape
        zs = clap_logits(self.features.reshape(v * n, d), self.anchors, self.scale)
        self.weights = constraint_weights(zs, self.labels.repeat(v), ctx.n_classes)
        if "prototypes" not in self.extra:
            self.extra["prototypes"] = Prototypes(self.anchors).to(ctx.device)

    def _views(self, model) -> torch.Tensor:
        from pipeline.models.encode import encode_images

        ctx = self.ctx
        if ctx.train_set is None:
            raise ValueError("clap needs the training images (train_set)")
        out = []
        for view in range(self.hp.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_view_seed(ctx.seed, view))
                out.append(encode_images(EvalModel(model), ctx.train_set, ctx.device,
                                         desc=f"clap view {view + 1}/{self.hp.views}"))
        return torch.stack(out).to(ctx.device)

    def optimizer(self):
        return torch.optim.SGD([{"params": [self.extra["prototypes"].weight], "lr_scale": 1.0}],
                               lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay)

    def loss(self, batch, step):
        w = self.extra["prototypes"].weight
        f, y = view_batch(self.features, batch, w.device)
        ce, reg = clap_loss(f, w, self.anchors.to(w.device), self.weights.to(w.device), y, self.scale)
        return {"ce_loss": ce, "constraint_loss": reg}

    @staticmethod
    def build_eval(model, prototypes: torch.Tensor) -> EvalModel:
        scale = model.logit_scale.exp().detach().float()
        return EvalModel(model, head=scale * F.normalize(prototypes.detach().float(), dim=-1))

    def live_eval_model(self) -> EvalModel:
        return self.build_eval(self.ctx.model, self.extra["prototypes"].weight)

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        if set(state) != {"extra.prototypes.weight"}:
            raise KeyError(f"{cls.name} state does not fit: keys {sorted(state)}")
        return cls.build_eval(model, state["extra.prototypes.weight"].to(zeroshot_head.device))


def _view_seed(seed: int, view: int) -> int:
    return (seed * 1_000_003 + view * 7919 + 0xC1A9) % (2 ** 63)


def _labels_only(dataset):
    from pipeline.methods.common import image_free

    return image_free(dataset)
