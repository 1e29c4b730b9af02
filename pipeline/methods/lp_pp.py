"""LP++: a linear probe blended with the text classifier, trained full-batch on cached
features with data-driven step sizes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import cached_features, image_free
from pipeline.models.losses import fp32_loss


@dataclass(frozen=True)
class LPPPHparams(BaseHparams):
    # a multiplier of both data-driven step sizes (1 = the paper's); the trainer's schedule
    # and clipping do not apply (LP++ has its own optimiser, `Method.optimizer`)
    lr: Float = 1.0
    weight_decay: Float = 0.0
    warmup_steps: Int = 0
    alpha_factor: Float = 250.0  # α_0 = alpha_factor · mean_c mean_{i: y_i = c} f_i·t_c
    alpha_every: Int = 10  # α takes a gradient step every `alpha_every` epochs
    momentum: Float = 0.9  # SGD momentum of W and b

    def __post_init__(self):
        super().__post_init__()
        if self.weight_decay != 0:
            raise ValueError(f"weight_decay: {self.weight_decay}: LP++ has none (its own optimiser); use 0")
        if self.warmup_steps != 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps}: LP++'s step sizes are fixed (no schedule); use 0")
        if self.alpha_every < 1:
            raise ValueError(f"alpha_every: {self.alpha_every} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


# ---- the pieces, as pure functions (tests/test_fewshot_baselines.py checks each) -----------


def blended_logits(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
    """LP++'s logits W f + b + α ⊙ (f Tᵀ) [N, C]: f [N, D] normalised image features, W [C, D],
    b [C] or None, α [C], T [C, D] the normalised text class embeddings (no logit scale)."""
    out = f @ weight.t() + alpha * (f @ text.t())
    return out if bias is None else out + bias


def class_sums(f: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """W's initialisation [C, D]: the per-class SUM of the support features (the official
    code's division by the count is commented out, and its step size is tuned to this scale)."""
    return torch.zeros(n_classes, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)


def init_alpha(f: torch.Tensor, y: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """α's initial value (a scalar, every class starts at it): factor · the mean over the
    classes c present in y of (the mean of f_i·t_c over class c's own samples)."""
    n_classes = text.shape[0]
    own = (f @ text.t()).gather(1, y[:, None]).squeeze(1)  # f_i·t_{y_i}
    sums = torch.zeros(n_classes, dtype=own.dtype, device=own.device).index_add_(0, y, own)
    counts = torch.bincount(y, minlength=n_classes)
    present = counts > 0
    return factor * (sums[present] / counts[present]).mean()


def step_w(f: torch.Tensor) -> float:
    """W's and b's step size: 4N / λ_max(FᵀF) (F [N, D] the support features)."""
    gram = f.double().t() @ f.double()
    return float(4 * f.shape[0] / torch.linalg.eigvalsh(gram).max())


def step_alpha(f: torch.Tensor, text: torch.Tensor) -> float:
    """α's step size: N / (4 · max_c Σ_i (f_i·t_c)²)."""
    s = f.double() @ text.double().t()
    return float(f.shape[0] / (4 * (s ** 2).sum(0).max()))


@fp32_loss
def lp_pp_loss(f, weight, bias, alpha, text, y) -> torch.Tensor:
    return F.cross_entropy(blended_logits(f, weight, bias, alpha, text), y)


class BlockSGD(torch.optim.Optimizer):
    """SGD with heavy-ball momentum (torch.optim.SGD's rule, dampening 0: buf ← μ·buf + g,
    p ← p − lr·buf) whose groups may step only every `every`-th call (LP++'s α: plain
    gradient steps every 10 epochs, with the gradient of that epoch). Its state (step count,
    buffers) is in `state_dict`, so a resumed run continues exactly."""

    def __init__(self, groups: list[dict]):
        super().__init__(groups, dict(lr=1.0, momentum=0.0, every=1))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["calls"] = state.get("calls", 0) + 1
                if p.grad is None or state["calls"] % group["every"]:
                    continue
                d = p.grad
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
                    state["momentum_buffer"] = buf
                    d = buf
                p.add_(d, alpha=-group["lr"])


class BlendedProbe(nn.Module):
    """W [C, D] and α [C]; the text embeddings T come from the zero-shot head."""

    def __init__(self, weight: torch.Tensor, alpha: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.alpha = nn.Parameter(alpha.detach().clone().float())

    def head(self, text: torch.Tensor) -> torch.Tensor:
        """The equivalent head [C, D] (bias-free): W + diag(α) T, logits f·headᵀ."""
        return self.weight + self.alpha[:, None] * text.to(self.weight)


@register
class LPPlusPlus(Method):
    """LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig & Ben Ayed, "LP++: A Surprisingly Strong
    Linear Probe for Few-Shot CLIP", CVPR 2024, arXiv 2404.02285; code
    FereshteShakeri/FewShot-CLIP-Strong-Baseline, `methods/linear_probe_p2.py`):

        logits = W f + α ⊙ (f · Tᵀ),  L = CE(logits, y)

    on the frozen image encoder's normalised features (cached once at setup), T the
    normalised prompt-ensemble text embeddings (the zero-shot head, no logit scale), α one
    blending weight per class. Initialisation as the official code: W = the per-class SUMS
    of the support features; every α_c = 250 · mean_c (mean of f_i·t_c over class c's own
    samples). Full-batch training with the code's data-driven step sizes: W by SGD with
    momentum 0.9 at 4N/λ_max(FᵀF); α by plain gradient steps of N/(4·max_c Σ_i (f_i·t_c)²)
    every 10 epochs. Only W and α train (`trains_extra`).

    OPEN choices (ours):
    - no bias b: the code has a bias (nn.Linear's default, randomly initialised and trained
      with W); here every evaluated head is a [C, D] matrix on normalised features (logits
      f·Hᵀ), which cannot hold a per-class constant, so LP++ trains without it and its head
      is W + diag(α)·T exactly. Adding a bias would need the evaluation's head to carry one;
    - α's gradient step uses the gradient of its own epoch (the code never zeroes α's
      gradient, so its step accumulates every epoch since the start: a trap, not a recipe);
    - α_0's mean is over the classes present in the support set (the code divides by zero
      for an absent class; its later `lp_pp_solver` counts it as 0);
    - one trainer step is one full-batch epoch: the trainer's batch is ignored, and the
      number of epochs is the project's step budget (`finetune.train`), not the paper's 300;
      the epoch is not chosen on validation (the paper keeps the best validation epoch;
      the project selects among trials only: not implemented);
    - `lr` multiplies both step sizes (1 = the paper's rules); the trainer's warm-up, cosine
      schedule, weight decay and gradient clipping do not apply (`Method.optimizer`);
    - the features are computed without augmentation (the eval transform), as the code;
    - no WiSE-FT α: the head W + diag(α)·T does not live in the zero-shot head's space
      (`weight_space = False`).

    Precision: fp32 throughout (features cached before the trainer's autocast region; the
    loss in fp32 with autocast off); step sizes computed in float64.
    """

    name = "lp_pp"
    family = "probe"
    trains_extra = r"^probe\.(weight|alpha)$"
    Hparams = LPPPHparams
    uses_images = False

    def setup(self) -> None:
        freeze(self.root)
        ctx = self.ctx
        self.features = cached_features(ctx, EvalModel(ctx.model), "lp++ features").float()
        self.labels = torch.stack([torch.as_tensor(it["y"]) for it in image_free(ctx.train_eval_set)]).long()
        self.labels = self.labels.to(self.features.device)
        self.text = ctx.zeroshot_head.float().to(self.features.device)
        if "probe" not in self.extra:
            w0 = class_sums(self.features, self.labels, ctx.n_classes)
            a0 = init_alpha(self.features, self.labels, self.text, self.hp.alpha_factor)
            self.extra["probe"] = BlendedProbe(w0, a0.expand(ctx.n_classes)).to(ctx.device)
        self.steps = (step_w(self.features), step_alpha(self.features, self.text))

    def optimizer(self):
        probe = self.extra["probe"]
        lr_w, lr_alpha = self.steps
        return BlockSGD([
            {"params": [probe.weight], "lr": self.hp.lr * lr_w, "momentum": self.hp.momentum, "every": 1},
            {"params": [probe.alpha], "lr": self.hp.lr * lr_alpha, "momentum": 0.0, "every": self.hp.alpha_every},
        ])

    def loss(self, batch, step):
        probe = self.extra["probe"]
        text = self.text.to(probe.weight.device)
        loss = lp_pp_loss(self.features.to(probe.weight.device), probe.weight, None, probe.alpha, text,
                          self.labels.to(probe.weight.device))
        return {"ce_loss": loss}

    def live_eval_model(self) -> EvalModel:
        head = self.extra["probe"].head(self.ctx.zeroshot_head.float()).detach()
        return EvalModel(self.ctx.model, head=head)

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        expected = {"extra.probe.weight", "extra.probe.alpha"}
        if set(state) != expected:
            raise KeyError(f"{cls.name} state does not fit: differing keys {sorted(set(state) ^ expected)}")
        probe = BlendedProbe(state["extra.probe.weight"], state["extra.probe.alpha"])
        return EvalModel(model, head=probe.head(zeroshot_head.float().to(probe.weight.device)).detach())
