"""LoRA on the Q and V projections of every attention block of both towers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import EvalModel, freeze
from pipeline.methods.bitfit import PromptCE, PromptCEHparams, require_block_towers

ATTN = re.compile(r"(^|\.)transformer\.resblocks\.\d+\.attn$")


@dataclass(frozen=True)
class LoRAHparams(PromptCEHparams):
    lr: Float = 5e-4
    weight_decay: Float = 0.0
    warmup_steps: Int = 6
    rank: Int = 8
    scale: Float = 0.2  # ΔW = scale · B A (a plain multiplier, as in mit-ll/IIMM)

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be >= 1")


class LoRAQV(nn.Module):
    """Low-rank updates of the Q and V slices of one fused in_proj_weight [3d, d]:
    ΔW = scale · [B_q A_q; 0; B_v A_v]. A (r × d) starts random, B (d × r) at zero."""

    def __init__(self, width: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        for s in ("q", "v"):
            a = nn.Parameter(torch.empty(rank, width))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as in LoRA
            self.register_parameter(f"a_{s}", a)
            self.register_parameter(f"b_{s}", nn.Parameter(torch.zeros(width, rank)))

    def delta(self, factor: float = 1.0) -> torch.Tensor:
        c = factor * self.scale
        dq = c * self.b_q @ self.a_q
        dv = c * self.b_v @ self.a_v
        return torch.cat([dq, torch.zeros_like(dq), dv])


def site_key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


def attention_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every residual-block attention of both towers that has a fused [3d, d] Q/K/V weight."""
    sites = {}
    for name, mod in model.named_modules():
        if not ATTN.search(name):
            continue
        w = getattr(mod, "in_proj_weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
            raise ValueError(f"{name}: LoRA needs a fused [3d, d] in_proj_weight (open_clip's "
                             f"attention); this architecture has {type(mod).__name__}")
        sites[site_key(name)] = mod
    if not sites:
        raise ValueError("no transformer.resblocks.N.attn module: the architecture lacks what LoRA adapts")
    return sites


class _LoRAForward:
    """Replaces one attention module's `forward`: the module's own forward runs with
    in_proj_weight + ΔW as a temporary tensor (torch.func.functional_call). The stored
    weight is never written, so the base stays bit-identical and frozen."""

    def __init__(self, attn: nn.Module, lora: LoRAQV):
        self.attn = attn
        self.lora = lora

    def __call__(self, *args, **kwargs):
        attn = self.attn
        weight = attn.in_proj_weight + self.lora.delta().to(attn.in_proj_weight.dtype)
        # functional_call re-enters attn.__call__: lift the override for that inner call
        # (forward hooks on an attention module would run twice; LoRA installs none)
        del attn.forward
        try:
            return torch.func.functional_call(attn, {"in_proj_weight": weight}, args, kwargs)
        finally:
            attn.forward = self


@register
class LoRA(PromptCE):
    """LoRA (Hu et al., ICLR 2022) as a CLIP PEFT variant in the IIMM / A-CLIP papers (Niss et
    al., MIT LL, arXiv 2407.15731; code `mit-ll/IIMM`): low-rank updates of the Q and V
    projections of every residual block of both towers, cross-entropy on
    s·f(x)·g(prompt(c))ᵀ against every class prompt.

    The update is computed in the forward from the factors; the pre-trained weights are
    frozen and never written (their code adds the update into the stored weight on every
    forward, so the weight drifts: not repeated). The update is merged into the weights only
    by `eval_model`, where WiSE-FT's α becomes W + α·ΔW (identical to interpolating the
    merged and pre-trained weights), hence `weight_space = True`.

    OPEN choices (ours):
    - rank 8 (their range 4–16) and scale 0.2 as a plain multiplier (ΔW = 0.2·B A, not α/r);
      A is Kaiming-uniform, B zero (ΔW = 0 at the start), no LoRA dropout, no bias update;
    - the K slice and `in_proj_bias` stay untouched;
    - the training head averages `head_templates` = 1 template per class drawn each step;
      evaluation uses the full prompt ensemble;
    - few-shot defaults: lr 5e-4, no weight decay, 6 warm-up steps.

    Precision: as `PromptCE`; ΔW = scale·B A is formed in the factors' dtype (fp32) and
    added to the fp32 weight, and the attention then runs in the trainer's precision; the
    merge for export is computed in float64.
    """

    name = "lora"
    trains_extra = r"^lora\.[\w]+\.(a|b)_(q|v)$"
    Hparams = LoRAHparams
    weight_space = True

    @classmethod
    def check_model(cls, model) -> None:
        require_block_towers(cls.name, model, "adapts the Q and V projections")
        attention_sites(model)  # every block's attention has the fused [3d, d] weight (its own sentence)

    def setup(self) -> None:
        freeze(self.root)
        sites = attention_sites(self.ctx.model)
        if "lora" not in self.extra:
            self.extra["lora"] = nn.ModuleDict({
                key: LoRAQV(attn.in_proj_weight.shape[1], self.hp.rank, self.hp.scale).to(
                    attn.in_proj_weight.device)
                for key, attn in sites.items()})
        for key, attn in sites.items():
            if not isinstance(attn.__dict__.get("forward"), _LoRAForward):
                attn.forward = _LoRAForward(attn, self.extra["lora"][key])
        for p in self.extra["lora"].parameters():
            p.requires_grad_(True)

    def remove_adapters(self) -> None:
        """Restore the plain forward: `ctx.model` is the pre-trained model again."""
        for attn in attention_sites(self.ctx.model).values():
            if isinstance(attn.__dict__.get("forward"), _LoRAForward):
                del attn.forward

    def live_eval_model(self) -> EvalModel:
        return EvalModel(self.ctx.model)  # factors active through the patched forward

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        """Merge α·ΔW into the Q/V slices of the pre-trained `model` (a plain open_clip model
        afterwards). α = 0 leaves it bit-identical."""
        sites = attention_sites(model)
        prefix = "extra.lora."
        saved = {k[len(prefix):] for k in state if k.startswith(prefix)}
        expected = {f"{key}.{n}" for key in sites for n in ("a_q", "b_q", "a_v", "b_v")}
        if saved != expected:
            raise KeyError(f"LoRA state does not fit the model: differing keys {sorted(saved ^ expected)[:5]}")
        if alpha != 0.0:
            with torch.no_grad():
                for key, attn in sites.items():
                    w = attn.in_proj_weight
                    lora = LoRAQV(w.shape[1], state[f"{prefix}{key}.a_q"].shape[0], hp.scale)
                    lora.load_state_dict({n: state[f"{prefix}{key}.{n}"] for n in ("a_q", "b_q", "a_v", "b_v")})
                    w.copy_((w.double() + lora.double().delta(alpha).to(w.device)).to(w.dtype))
        return EvalModel(model)
