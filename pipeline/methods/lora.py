"""LoRA on the Q and V (or Q, K and V) projections of every attention block of both towers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int, Str
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
    # "plain": ΔW = scale · B A; "rsqrt_rank": ΔW = scale/√rank · B A (CLIP-LoRA's α/√r, α = scale)
    scaling: Str = "plain"
    # the slices of the fused Q/K/V projection that get an update: "qv" or "qkv"
    targets: Str = "qv"
    # dropout on the LoRA branch's input (the block input x), in training only; 0 = none
    dropout: Float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank: {self.rank} must be >= 1")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: {self.scaling!r} is not one of {', '.join(SCALINGS)}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets: {self.targets!r} is not one of {', '.join(TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: {self.dropout} must lie in [0, 1)")

    @property
    def multiplier(self) -> float:
        """The factor of B A in ΔW."""
        return self.scale / math.sqrt(self.rank) if self.scaling == "rsqrt_rank" else self.scale


SCALINGS = ("plain", "rsqrt_rank")
TARGETS = ("qv", "qkv")


class LoRAQV(nn.Module):
    """Low-rank updates of the Q and V (`targets` "qv") or Q, K and V ("qkv") slices of one
    fused in_proj_weight [3d, d]: ΔW = scale · [B_q A_q; B_k A_k or 0; B_v A_v]. A (r × d)
    starts Kaiming-uniform, B (d × r) at zero. `scale` is the whole multiplier of B A."""

    def __init__(self, width: int, rank: int, scale: float, targets: str = "qv"):
        super().__init__()
        self.scale = scale
        self.targets = targets
        for s in targets:
            a = nn.Parameter(torch.empty(rank, width))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as in LoRA
            self.register_parameter(f"a_{s}", a)
            self.register_parameter(f"b_{s}", nn.Parameter(torch.zeros(width, rank)))

    def delta(self, factor: float = 1.0) -> torch.Tensor:
        c = factor * self.scale
        dq = c * self.b_q @ self.a_q
        dk = c * self.b_k @ self.a_k if "k" in self.targets else torch.zeros_like(dq)
        return torch.cat([dq, dk, c * self.b_v @ self.a_v])

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale · x Aᵀ Bᵀ per slice, [..., 3d] (zeros for an untouched slice): the update
        applied to an input instead of folded into the weight (needed under input dropout)."""
        outs = []
        for s in "qkv":
            if s in self.targets:
                a, b = getattr(self, f"a_{s}"), getattr(self, f"b_{s}")
                outs.append(self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)))
            else:
                outs.append(torch.zeros(*x.shape[:-1], self.a_q.shape[1], dtype=x.dtype, device=x.device))
        return torch.cat(outs, dim=-1)


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
    """Replaces one attention module's `forward`. Without dropout (or in eval mode) the
    module's own forward runs with in_proj_weight + ΔW as a temporary tensor
    (torch.func.functional_call). With dropout in training, the update acts on a dropped-out
    copy of the input, which no weight can express: `_self_attention` computes the attention
    with the branch added to the projections. The stored weight is never written, so the base
    stays bit-identical and frozen."""

    def __init__(self, attn: nn.Module, lora: LoRAQV, dropout: float = 0.0):
        self.attn = attn
        self.lora = lora
        self.dropout = dropout

    def __call__(self, *args, **kwargs):
        attn = self.attn
        if self.dropout > 0 and attn.training:
            return _self_attention(attn, self.lora, self.dropout, *args, **kwargs)
        weight = attn.in_proj_weight + self.lora.delta().to(attn.in_proj_weight.dtype)
        # functional_call re-enters attn.__call__: lift the override for that inner call
        # (forward hooks on an attention module would run twice; LoRA installs none)
        del attn.forward
        try:
            return torch.func.functional_call(attn, {"in_proj_weight": weight}, args, kwargs)
        finally:
            attn.forward = self


def _dropout_keep(n: int, length: int, width: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """Keep mask [n, length, width] (1 = kept) with probability 1 − p per element."""
    from pipeline.methods.common import in_rank_rows, per_row

    def draw(k: int) -> torch.Tensor:
        return torch.empty(k, length, width, dtype=like.dtype, device=like.device).bernoulli_(1 - p)

    return per_row(draw, n) if in_rank_rows() else draw(n)


def _self_attention(attn: nn.MultiheadAttention, lora: LoRAQV, dropout: float, query, key=None, value=None,
                    key_padding_mask=None, need_weights=False, attn_mask=None, **kwargs):
    """nn.MultiheadAttention's self-attention (query is key is value, as open_clip's blocks
    call it) with the LoRA branch on the dropped-out input added to the Q/K/V projections:
    [q k v] = x W_inᵀ + b_in + scale · drop(x) Aᵀ Bᵀ, then scaled dot-product attention per
    head under the additive (or boolean: True = masked) `attn_mask` ([L, L], or [N·heads, L, L]
    as nn.MultiheadAttention takes it), then out_proj. Returns
    (output, None) like the module with need_weights=False."""
    key = query if key is None else key
    value = query if value is None else value
    if key is not query or value is not query or key_padding_mask is not None or need_weights or kwargs:
        raise ValueError("LoRA dropout supports open_clip's self-attention call only (query = key = value, "
                         "no key_padding_mask, need_weights=False)")
    x = query if attn.batch_first else query.transpose(0, 1)  # [N, L, d]
    n, length, d = x.shape
    h = attn.num_heads
    keep = _dropout_keep(n, length, d, dropout, x)
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias) + lora.branch(x * keep / (1 - dropout))
    q, k, v = (t.reshape(n, length, h, d // h).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask, float("-inf"))
    if mask is not None and mask.ndim == 3:  # [N·heads, L, L] (CoCa's text tower): per sample and head
        mask = mask.view(n, h, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.dropout if attn.training else 0.0)
    out = attn.out_proj(out.transpose(1, 2).reshape(n, length, d))
    return (out if attn.batch_first else out.transpose(0, 1)), None


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

    Options (`LoRAHparams`; the defaults are this recipe, `clip_lora` is CLIP-LoRA's):
    `targets` "qv" / "qkv" (the slices updated), `scaling` "plain" (ΔW = scale·B A) /
    "rsqrt_rank" (scale/√rank·B A), `dropout` on the LoRA branch's input in training (the
    attention is then computed by `_self_attention`, the update acting on the dropped-out
    input; without dropout and in evaluation the update is folded into the weight).

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
    family = "peft"
    soups = False  # a state is LoRA factors: the mean of B·A products is not the product of the means
    trains_extra = r"^lora\.[\w]+\.(a|b)_(q|v)$"
    adapts = "adapts the Q and V projections"  # what `check_model`'s refusal says it does
    Hparams = LoRAHparams
    weight_space = True

    @classmethod
    def check_model(cls, model) -> None:
        require_block_towers(cls.name, model, cls.adapts)
        attention_sites(model)  # every block's attention has the fused [3d, d] weight (its own sentence)

    def setup(self) -> None:
        freeze(self.root)
        sites = attention_sites(self.ctx.model)
        if "lora" not in self.extra:
            self.extra["lora"] = nn.ModuleDict({
                key: LoRAQV(attn.in_proj_weight.shape[1], self.hp.rank, self.hp.multiplier, self.hp.targets).to(
                    attn.in_proj_weight.device)
                for key, attn in sites.items()})
        for key, attn in sites.items():
            if not isinstance(attn.__dict__.get("forward"), _LoRAForward):
                attn.forward = _LoRAForward(attn, self.extra["lora"][key], self.hp.dropout)
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
        names = [f"{ab}_{s}" for s in hp.targets for ab in "ab"]
        expected = {f"{key}.{n}" for key in sites for n in names}
        if saved != expected:
            raise KeyError(f"LoRA state does not fit the model: differing keys {sorted(saved ^ expected)[:5]}")
        if alpha != 0.0:
            with torch.no_grad():
                for key, attn in sites.items():
                    w = attn.in_proj_weight
                    lora = LoRAQV(w.shape[1], state[f"{prefix}{key}.a_q"].shape[0], hp.multiplier, hp.targets)
                    lora.load_state_dict({n: state[f"{prefix}{key}.{n}"] for n in names})
                    w.copy_((w.double() + lora.double().delta(alpha).to(w.device)).to(w.dtype))
        return EvalModel(model)
