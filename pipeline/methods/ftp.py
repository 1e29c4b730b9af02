"""FTP: Fast Trainable Projection (Tian et al., NeurIPS 2023, arXiv 2310.19182; code GT-RIPL/FTP)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.ft import FTHparams, FullFinetune

# the radius's own Adam (fixed in the official code, `util/FTP.py::FTP.__init__`)
GAMMA_LR, GAMMA_BETAS, GAMMA_EPS = 1e-2, (0.9, 0.999), 1e-8
GAMMA_MIN = 1e-8  # γ's start and lower bound; also the norms' epsilon


def row_l1(c: torch.Tensor) -> torch.Tensor:
    """FTP's norm of an offset c = w̃ − w0: per row (Σ over every dim but the first, kept for
    broadcasting) for a tensor of 2+ dims, the L1 norm of the whole tensor otherwise (biases,
    norm gains, scalars); + 1e-8."""
    if c.dim() >= 2:
        return c.abs().sum(dim=tuple(range(1, c.dim())), keepdim=True) + GAMMA_MIN
    return c.abs().sum() + GAMMA_MIN


def gamma_gradient(grad: torch.Tensor, c_prev: torch.Tensor, n_prev: torch.Tensor, k: float) -> torch.Tensor:
    """The hyper-gradient of the radius: Σ ∇_w L ⊙ c_prev / n_prev (n_prev broadcast per row),
    its positive part scaled by k. (Per-row dot products first, then divided by the row norms:
    one pass over the tensor.)"""
    if grad.dim() >= 2:
        g = ((grad * c_prev).sum(dim=tuple(range(1, grad.dim())), keepdim=True) / n_prev).sum()
    else:
        g = (grad * c_prev).sum() / n_prev
    return torch.where(g > 0, g * k, g)


class Projection(nn.Module):
    """FTP's state for a set of tensors, as buffers (the trainer checkpoints them, so a resumed
    run continues them; `Method.checkpoint_only` keeps them out of the saved weights): the
    anchor w0, the radius γ and its Adam moments, the previous offset c and its norm n, and
    the number of projections made."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        super().__init__()
        self.names = [n for n, _ in named]
        for n, p in named:
            key = self._key(n)
            self.register_buffer(f"w0__{key}", p.detach().clone())
            self.register_buffer(f"c__{key}", torch.zeros_like(p))
            self.register_buffer(f"n__{key}", torch.ones_like(row_l1(p.detach())))
            for s in ("gamma", "m", "v"):
                self.register_buffer(f"{s}__{key}", torch.zeros((), dtype=p.dtype))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def get(self, what: str, name: str) -> torch.Tensor:
        return getattr(self, f"{what}__{self._key(name)}")

    @torch.no_grad()
    def project(self, params: list[tuple[str, torch.Tensor]], k: float) -> None:
        """One FTP step on tensors the base optimiser has just stepped (each holds its proposal
        w̃ and the step's gradient): c = w̃ − w0, n = row_l1(c); at the first step γ = 1e-8,
        later γ ← Adam(γ, gamma_gradient(∇L, c_prev, n_prev, k)) with the bias correction of
        the optimiser's global step t (2 at the first update), clipped to [1e-8, max n];
        w ← w0 + clip(γ/n, 0, 1)·c."""
        t = int(self.count) + 1
        b1, b2 = GAMMA_BETAS
        for name, p in params:
            if p.grad is None:  # not stepped (the base optimiser skips it too)
                continue
            w0, gamma, m, v = self.get("w0", name), self.get("gamma", name), self.get("m", name), self.get("v", name)
            c, n_prev = self.get("c", name), self.get("n", name)
            if t == 1:
                gamma.fill_(GAMMA_MIN)
            else:  # the hyper-gradient reads the previous c and n: before c is overwritten
                g = gamma_gradient(p.grad.to(p.dtype), c, n_prev, k)
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
                gamma.sub_(GAMMA_LR * m_hat / (v_hat.sqrt() + GAMMA_EPS))
            torch.sub(p, w0, out=c)  # c = w̃ − w0, in its buffer (in place: no copy of the tower per step)
            n = row_l1(c)
            if t > 1:
                gamma.copy_(torch.minimum(gamma.clamp(min=GAMMA_MIN), n.max()))
            p.copy_(w0).addcmul_((gamma / n).clamp(0, 1), c)
            n_prev.copy_(n)
        self.count += 1


@dataclass(frozen=True)
class FTPHparams(FTHparams):
    weight_decay: Float = 0.0  # the official launches pass weight_decay 0.0 to AdamP / SGDP
    warmup_steps: Int = 6
    k: Float = 1.0  # the positive hyper-gradient's scale (1: the strongest constraint, the default)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.k <= 1:
            raise ValueError(f"k: {self.k} must lie in [0, 1] (1 = the strongest constraint)")


@register
class FTP(FullFinetune):
    """FTP (Tian et al., NeurIPS 2023, arXiv 2310.19182; code GT-RIPL/FTP): FT, each step projected towards θ_0 per layer.

    "Fast Trainable Projection for Robust Fine-Tuning", code GT-RIPL/FTP (`util/FTP.py`,
    `AdamP`): the base optimiser proposes w̃ for each tensor; c = w̃ − w0; n = Σ_{dims≥1}|c| + 1e-8
    per row (the whole tensor's L1 norm for 1-D tensors and scalars); one radius γ per tensor,
    1e-8 at the first step (so the first step leaves w at w0 to ~1e-8), then updated by its own
    Adam (lr 1e-2, betas 0.9/0.999) on the hyper-gradient Σ ∇_w L ⊙ c_prev / n_prev (its positive
    part scaled by k) and clipped to [1e-8, max n]; w ← w0 + clip(γ/n, 0, 1)·c (`Projection`).
    Base: FT (image encoder + linear head from the scaled zero-shot head, cross-entropy); the
    head is not projected (the official `exclude_set`: layers without a pre-trained value).

    Read in the official code (the order of operations, per tensor, inside `AdamP.step`): the
    Adam moments take the gradient at the current (projected) weights; the proposal is the
    current weights minus the Adam step and lr·wd·w; γ's hyper-gradient uses the same step's
    gradient with the previous step's c and n; γ's bias correction uses the optimiser's global
    step counter t, which is 1 at the first step (γ = 1e-8, moments untouched), so the first γ
    update is corrected with t = 2 after one moment update; γ is clipped with the current
    step's norms; then the projection, and c and 1/n are stored for the next step.

    OPEN choices (ours):
    - the base step is the trainer's AdamW (decoupled decay, the project's decay rule, warm-up
      and cosine, gradient clipping), and the projection runs after it (`after_step`): the same
      arithmetic as AdamP's in-optimiser projection; the hyper-gradient reads the gradient the
      optimiser stepped with (after the trainer's clipping, `finetune.train.grad_clip`;
      AdamP's run had none), so that FTP and FT differ only in the projection;
    - defaults: FT's lr (1e-4, also the official AdamP launch's) and warm-up, weight decay 0 (every
      official launch passes 0.0: the projection is the regulariser), k = 1 (`FTPHparams`);
      the paper's DomainNet runs (ResNet-50, 50 epochs, a best-on-val epoch) are not copied;
    - every trained tensor of the image tower is projected (the official code projects every
      tensor but the excluded head, and covers ResNet-50 only); a tensor the step leaves without a
      gradient is neither stepped nor projected;
    - the projection and its state in the parameters' dtype (fp32 master weights); t counts
      this run's projections (a buffer, so a resumed run continues it).

    WiSE-FT applies (`weight_space`): the weights stay in the pre-trained space. The
    projection state (w0, c, n, γ and its moments, about twice the image tower) is in the
    trainer's checkpoints, not in the saved weights (`checkpoint_only`). DDP: the gradients are
    averaged before the step, so every rank projects the same. grad_accum: one projection per
    optimiser step, on the accumulated gradient.

    Precision: as FT (the image tower in the trainer's precision, features, head and
    cross-entropy in fp32 with autocast off); the projection, outside autocast, in fp32.
    """

    name = "ftp"
    family = "robust"
    soups = True
    Hparams = FTPHparams
    checkpoint_only = ("ftp",)

    def _projected(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.ctx.model.named_parameters() if p.requires_grad and n.startswith("visual.")]

    def setup(self) -> None:
        super().setup()
        if "ftp" not in self.extra:  # w0: the weights setup leaves (θ_0; a resumed run loads the saved state)
            self.extra["ftp"] = Projection(self._projected())

    def after_step(self, step: int) -> None:
        self.extra["ftp"].project(self._projected(), self.hp.k)
