"""R-Adapter: robust adapters in every residual block of both towers (Kim et al., ECCV 2024)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Bool, Float, Int, Str
from pipeline.core import dist
from pipeline.models.losses import classification_loss, clip_loss, mpm_nce_loss
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.bitfit import class_head_with_grad, require_block_towers
from pipeline.methods.common import (image_features, in_rank_rows, per_row, rank_rows, sample_class_prompts,
                                     text_features)

BLOCK = re.compile(r"(^|\.)transformer\.resblocks\.\d+$")
LOSSES = ("mpm_nce", "clip", "ce")
PREFIX = "extra.adapters."


@dataclass(frozen=True)
class RAdapterHparams(BaseHparams):
    lr: Float = 5e-4
    weight_decay: Float = 0.0
    warmup_steps: Int = 6
    rank: Int | None = 0  # 0 or null: full-rank F (d×d); 0 < r < d: F = U D
    sigma_init: Float = 0.1
    drop: Float = 0.2  # adapter dropping probability p (0 = off)
    ema_momentum: Float = 0.999  # m of the accumulation (0 = off: the last weights)
    ema_bias_correction: Bool = True
    rescale: Float = 0.5  # re-scaling α at evaluation (1 = off)
    loss: Str = "mpm_nce"  # mpm_nce | clip (FLYP's loss at 1/τ) | ce (all class prompts)
    margin: Float = 0.05  # δ of MPM-NCE
    smoothing: Float = 0.02  # ε of MPM-NCE (label smoothing of `ce`)
    tau: Float = 0.01  # frozen temperature: logits are similarities / τ

    def __post_init__(self):
        super().__post_init__()
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank: {self.rank} must be >= 0 (0 or null = full rank)")
        if not 0 <= self.drop < 1:
            raise ValueError(f"drop: {self.drop} must lie in [0, 1)")
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum: {self.ema_momentum} must lie in [0, 1)")
        if self.rescale < 0:
            raise ValueError(f"rescale: {self.rescale} must be >= 0")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing: {self.smoothing} must lie in [0, 1)")
        if self.tau <= 0:
            raise ValueError(f"tau: {self.tau} must be positive")


# ---- where the adapters go ----------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One adapter position: the output of `linear` (attention out_proj or MLP c_proj)."""

    key: str  # ModuleDict key of its adapter (the module path with "__" for ".")
    linear: str  # path of the preceding linear layer (the re-parameterisation target)
    hooked: str  # path of the module whose output is adapted
    tuple_output: bool  # nn.MultiheadAttention returns (output, weights)
    width: int
    batch_dim: int  # 0 for batch-first (N, L, D) tensors, 1 for sequence-first (L, N, D)


def adapter_sites(model: nn.Module) -> list[Site]:
    """Two sites per residual block of both towers: after the attention's out_proj and
    after the MLP's c_proj (before LayerScale and the residual add)."""
    sites = []
    for name, block in model.named_modules():
        if not BLOCK.search(name):
            continue
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if isinstance(attn, nn.MultiheadAttention):
            # its forward reads out_proj.weight directly (never calls out_proj): adapt the
            # module output, which is out_proj's output
            batch_dim = 0 if attn.batch_first else 1
            attn_site = (f"{name}.attn.out_proj", f"{name}.attn", True)
        elif isinstance(getattr(attn, "out_proj", None), nn.Linear):
            batch_dim = 0  # open_clip's custom Attention is batch-first only
            attn_site = (f"{name}.attn.out_proj", f"{name}.attn.out_proj", False)
        else:
            raise ValueError(f"{name}: no attention out_proj to adapt ({type(attn).__name__})")
        if not isinstance(getattr(mlp, "c_proj", None), nn.Linear):
            raise ValueError(f"{name}: no MLP c_proj to adapt")
        for linear, hooked, tuple_output in (attn_site, (f"{name}.mlp.c_proj", f"{name}.mlp.c_proj", False)):
            lin = model.get_submodule(linear)
            if lin.bias is None:
                raise ValueError(f"{linear}: the re-parameterisation expects a bias")
            sites.append(Site(linear.replace(".", "__"), linear, hooked, tuple_output,
                              lin.out_features, batch_dim))
    if not sites:
        raise ValueError("no transformer.resblocks.N block: the architecture lacks what R-Adapter adapts")
    return sites


# ---- the adapter ------------------------------------------------------------------------


class Adapter(nn.Module):
    """A(y) = y + σ·DropPath_p(F y): F linear d×d, no bias, zero-initialised (or F = U D,
    U: d×r zero, D: r×d random), σ a learnable scalar. Keeps the accumulated (EMA) copies
    of its parameters as buffers `ema_<name>`; evaluation uses them: A(y) = y + α·σ̃·F̃ y."""

    def __init__(self, width: int, rank: int | None, sigma_init: float = 0.1, drop: float = 0.2,
                 momentum: float = 0.999, bias_correction: bool = True, eval_scale: float = 0.5):
        super().__init__()
        if rank and rank < width:
            self.up = nn.Parameter(torch.zeros(width, rank))
            self.down = nn.Parameter(torch.empty(rank, width))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as LoRA's A
        else:
            self.weight = nn.Parameter(torch.zeros(width, width))
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
        self.drop = drop
        self.momentum = momentum
        self.bias_correction = bias_correction
        self.eval_scale = eval_scale
        for n, p in self.named_parameters(recurse=False):
            # bias-corrected EMA starts at 0 and is divided by 1 − m^t; plain EMA starts at θ₀
            self.register_buffer(f"ema_{n}", torch.zeros_like(p) if bias_correction else p.detach().clone())
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    @property
    def low_rank(self) -> bool:
        return hasattr(self, "up")

    def own_params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters(recurse=False))

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema_steps += 1
        for n, p in self.own_params().items():
            getattr(self, f"ema_{n}").mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The accumulated parameters (bias-corrected); the live ones before any step."""
        t = int(self.ema_steps)
        if t == 0:
            return {n: p.detach() for n, p in self.own_params().items()}
        norm = 1 - self.momentum ** t if self.bias_correction else 1.0
        return {n: getattr(self, f"ema_{n}") / norm for n in self.own_params()}

    def apply_map(self, y: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """F y over the last dimension."""
        if self.low_rank:
            return (y @ params["down"].t().to(y.dtype)) @ params["up"].t().to(y.dtype)
        return y @ params["weight"].t().to(y.dtype)

    def adapt(self, y: torch.Tensor, batch_dim: int, training: bool) -> torch.Tensor:
        if training:
            z = self.sigma.to(y.dtype) * self.apply_map(y, self.own_params())
            if self.drop > 0:
                # one keep/drop draw per sample: the whole branch of a sample is dropped;
                # under DDP a sample of the micro-batch gets the draw it would get in one
                # process (rows of this rank's slice: `per_row`; shared rows: the same draw
                # on every rank)
                def draw(k: int) -> torch.Tensor:
                    return torch.empty(k, dtype=y.dtype, device=y.device).bernoulli_(1 - self.drop)

                n = y.shape[batch_dim]
                keep = per_row(draw, n) if in_rank_rows() else draw(n)
                shape = [1] * y.ndim
                shape[batch_dim] = n
                z = z * keep.view(shape) / (1 - self.drop)
            return y + z
        avg = self.averaged()
        return y + (self.eval_scale * avg["sigma"]).to(y.dtype) * self.apply_map(y, avg)


def adapter_matrix(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """F from saved adapter weights (F = U D for the low-rank variant), in float64."""
    if "up" in params:
        return params["up"].double() @ params["down"].double()
    return params["weight"].double()


def reparameterise(weight: torch.Tensor, bias: torch.Tensor, fmap: torch.Tensor,
                   c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold y ↦ y + c·F y into the preceding linear layer: W' = (I + c·F)W, b' = (I + c·F)b
    (computed in float64, returned in the layer's dtype)."""
    cf = c * fmap.double().to(weight.device)
    w, b = weight.double(), bias.double()
    return (w + cf @ w).to(weight.dtype), (b + cf @ b).to(bias.dtype)


def _hook(adapter: Adapter, site: Site):
    if site.tuple_output:
        def hook(module, args, output):
            return (adapter.adapt(output[0], site.batch_dim, module.training), *output[1:])
    else:
        def hook(module, args, output):
            return adapter.adapt(output, site.batch_dim, module.training)
    return hook


@register
class RAdapter(Method):
    """R-Adapter (Kim et al., "Efficient and Versatile Robust Fine-Tuning of Zero-shot
    Models", ECCV 2024, arXiv 2408.05749).

    - Adapters in every residual block of both towers, one after the attention's out_proj
      and one after the MLP's c_proj (before LayerScale and the residual add):
      A(y) = y + σ·DropPath_p(F y), F d×d without bias or non-linearity, zero-initialised,
      σ a learnable scalar (init 0.1); low-rank F = U D with `rank` r (0/null = full rank).
      Only F and σ train; everything of CLIP, the logit scale included, is frozen.
    - Adapter dropping: per sample (one draw per sample and adapter), kept branches scaled
      by 1/(1−p), p = 0.2; never at evaluation. The batch dimension is read from each
      block's attention (`batch_first`; open_clip 3.3 runs batch-first by default). Under
      DDP a sample gets the mask it would get as that row of the one-process micro-batch
      (`common.per_row`, inside `common.rank_rows`); the class head of `loss: ce`, whose
      rows every rank computes alike, draws the same masks on every rank.
    - Accumulation: EMA of F (or U, D) and σ after every optimiser step, m = 0.999.
    - Re-scaling at evaluation: the branch becomes α·σ̃·F̃ y, α = `rescale` = 0.5.
    - Re-parameterisation: with c = α·σ̃, W' = (I + c·F̃)W, b' = (I + c·F̃)b in out_proj /
      c_proj; the adapters are then gone and the model is a plain open_clip model (inference
      cost of CLIP). The checkpoint holds only the accumulated adapter weights.
    - Loss: MPM-NCE (δ = 0.05, ε = 0.02) between the batch images and class-prompt texts of
      their labels (one template drawn per image), at τ = 0.01 (1/τ = 100), both towers.
    - Ablation switches: `drop: 0`, `ema_momentum: 0`, `rescale: 1`, `loss: clip` or `ce`,
      `smoothing: 0`, `margin: 0`.
    - Model families: the losses are R-Adapter's own, at its fixed τ (not the model's logit
      scale), and each is a softmax over a row of logits; a SigLIP logit bias would add the
      same constant to every logit of a row, which a softmax cancels, so they are unchanged
      on SigLIP (no sigmoid loss). The adapters need open_clip's residual blocks in both
      towers (`check_model`): CLIP ViT archs and CoCa (whose captioning decoder gets none),
      not the timm image towers of the SigLIP and EVA-02 configs.
    - Precision: the adapters run in their block's precision (bf16 under the trainer's
      autocast on CUDA; F and σ are fp32 parameters cast per use); features are normalised
      and MPM-NCE / CLIP / CE computed in fp32 with autocast off; the EMA is fp32 and the
      re-parameterisation float64.

    Evaluation α: `eval_model(alpha)` uses c = alpha·rescale·σ̃, so the evaluate stage's
    α sweep scales the *configured* re-scaling: α = 1 is R-Adapter as configured (the
    paper's 0.5 by default; the flat metrics), α = 0 the pre-trained model; the selected
    α is chosen on the validation split like every other method's. `rescale: 1` sweeps the
    unscaled adapter.

    OPEN choices (ours):
    - bias-corrected accumulation (Adam-style): the EMA starts at zero and is divided by
      1 − m^t, so it is the m-weighted average of the iterates and never mixes in the
      initial F = 0 (with m = 0.999 and a 60-step run the plain EMA would keep m^60 ≈ 94 %
      of the zero init). With m = 0.999 and short runs that is close to a uniform average
      of all iterates; `ema_momentum: 0.9` is the paper's choice for very short runs.
      `ema_bias_correction: false` gives the plain EMA started at the initial weights;
    - low rank: U starts at zero, D Kaiming-uniform (as LoRA), and the EMA accumulates U
      and D (F̃ = Ũ D̃, which keeps the checkpoint low-rank); 0 < r < d is low rank and
      r ≥ d full rank (the released code's inverted test is not repeated);
    - `loss: ce` uses 1/τ with the class head averaging one template per class per step;
      where the prompts exceed `finetune.train.prompt_memory_mb` and go through the text
      tower in chunks, each chunk draws its own adapter-dropping masks (the same
      distribution as one forward, not the same draws);
    - few-shot defaults: the paper's lr 5e-4 and no weight decay; 6 warm-up steps (10 % of
      the 60-step default; the paper's 500 are for 50 ImageNet epochs); grad clip 1.0 is
      the trainer's default.
    """

    name = "radapter"
    family = "peft"
    trains_extra = r"^adapters\.[\w]+\.(weight|up|down|sigma)$"
    Hparams = RAdapterHparams
    weight_space = True  # eval_model honours α (it scales the adapters): sweep it

    @classmethod
    def check_model(cls, model) -> None:
        require_block_towers(cls.name, model, "inserts its adapters")
        try:
            adapter_sites(model)  # out_proj and c_proj (with biases) in every block
        except ValueError as err:
            raise ValueError(f"{cls.name} adapts the attention out_proj and MLP c_proj of every residual block: "
                             f"{err}. Allowed: archs built of open_clip's residual blocks (CLIP ViT archs, CoCa)") from err

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self._handles: list = []

    def setup(self) -> None:
        freeze(self.root)
        hp = self.hp
        sites = adapter_sites(self.ctx.model)
        if "adapters" not in self.extra:
            device = next(self.ctx.model.parameters()).device
            self.extra["adapters"] = nn.ModuleDict({
                s.key: Adapter(s.width, hp.rank, hp.sigma_init, hp.drop, hp.ema_momentum,
                               hp.ema_bias_correction, hp.rescale).to(device)
                for s in sites})
        if not self._handles:
            for s in sites:
                module = self.ctx.model.get_submodule(s.hooked)
                self._handles.append(module.register_forward_hook(_hook(self.extra["adapters"][s.key], s)))
        for p in self.extra["adapters"].parameters():
            p.requires_grad_(True)

    def remove_adapters(self) -> None:
        """Detach the hooks: `ctx.model` is the plain pre-trained model again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def loss(self, batch, step):
        hp, model = self.hp, self.ctx.model
        labels = batch["y"]
        with rank_rows():  # the batch's rows: drop masks drawn per sample across ranks
            f = image_features(model, batch["image"])
        if hp.loss == "ce":
            # the class head's rows are the same on every rank: shared drop draws
            head = class_head_with_grad(model, self.ctx.class_tokens, 1, f.device, self.ctx.prompt_memory_bytes)
            return {"ce_loss": classification_loss(f, head / hp.tau, labels, label_smoothing=hp.smoothing)}
        tokens = sample_class_prompts(self.ctx.class_tokens, labels)
        with rank_rows():
            g = text_features(model, tokens)
        f, g = dist.gather(f), dist.gather(g)
        if hp.loss == "clip":
            return {"clip_loss": clip_loss(f, g, torch.tensor(1.0 / hp.tau, device=f.device))}
        labels = dist.gather_nograd(labels)
        return {"mpm_nce_loss": mpm_nce_loss(f, g, labels, hp.tau, hp.margin, hp.smoothing)}

    def after_step(self, step: int) -> None:
        for adapter in self.extra["adapters"].values():
            adapter.update_ema()

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Only the accumulated adapter weights, `extra.adapters.<site>.<weight|up|down|sigma>`."""
        return {f"{PREFIX}{key}.{n}": v.detach().clone()
                for key, adapter in self.extra["adapters"].items() for n, v in adapter.averaged().items()}

    def live_eval_model(self) -> EvalModel:
        return EvalModel(self.ctx.model)  # hooks active; in eval mode they use the EMA and α

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        """Merge the saved adapters into the pre-trained `model` with c = alpha·rescale·σ̃
        (exact re-parameterisation); the result is a plain open_clip model."""
        sites = adapter_sites(model)
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            if not k.startswith(PREFIX):
                raise KeyError(f"{k}: not an R-Adapter weight")
            key, n = k[len(PREFIX):].rsplit(".", 1)
            saved.setdefault(key, {})[n] = v
        expected = {s.key for s in sites}
        if set(saved) != expected:
            raise KeyError(f"R-Adapter state does not fit the model: differing sites "
                           f"{sorted(set(saved) ^ expected)[:5]}")
        coeff = alpha * hp.rescale
        with torch.no_grad():
            for s in sites:
                params = saved[s.key]
                c = coeff * float(params["sigma"])
                if c == 0.0:
                    continue
                lin = model.get_submodule(s.linear)
                w, b = reparameterise(lin.weight, lin.bias, adapter_matrix(params), c)
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        return EvalModel(model)
