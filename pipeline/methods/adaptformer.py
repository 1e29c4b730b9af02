"""AdaptFormer: a bottleneck MLP parallel to the MLP of every image-tower block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import image_features, in_rank_rows, per_row, rank_rows
from pipeline.methods.vit_internals import remove, require_vit_image_tower
from pipeline.models.losses import classification_loss

WHAT = "inserts its adapters"


@dataclass(frozen=True)
class AdaptFormerHparams(BaseHparams):
    lr: Float = 0.0125  # SGD (momentum 0.9): their base lr 0.1 × batch / 256 at the default batch 32
    weight_decay: Float = 0.0
    warmup_steps: Int = 6
    momentum: Float = 0.9
    bottleneck: Int = 64
    scale: Float = 0.1  # s of the branch
    dropout: Float = 0.1  # on the bottleneck activations, in training only

    def __post_init__(self):
        super().__post_init__()
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck: {self.bottleneck} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: {self.dropout} must lie in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


class AdaptMLP(nn.Module):
    """s · Up(drop(ReLU(Down(x)))): Down width → bottleneck Kaiming-uniform, Up and both biases
    zero (their `init_option="lora"`), so the branch is 0 until Up moves."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def branch(self, x: torch.Tensor, scale: float, dropout: float, batch_dim: int, training: bool) -> torch.Tensor:
        h = F.relu(self.down(x))
        if training and dropout > 0:
            h = h * _keep(h, dropout, batch_dim) / (1 - dropout)
        return self.up(h) * scale


def _keep(h: torch.Tensor, p: float, batch_dim: int) -> torch.Tensor:
    """Keep mask (1 = kept, probability 1 − p) per element of `h`. Under DDP a sample of the
    image batch gets the mask it would get as that row of the one-process micro-batch
    (`common.per_row`, inside `common.rank_rows`)."""
    rest = [s for i, s in enumerate(h.shape) if i != batch_dim]

    def draw(k: int) -> torch.Tensor:
        return torch.empty(k, *rest, dtype=h.dtype, device=h.device).bernoulli_(1 - p)

    n = h.shape[batch_dim]
    keep = per_row(draw, n) if in_rank_rows() else draw(n)
    return keep.movedim(0, batch_dim)


def adapter_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of the ViT image tower, each with `ln_2`, `mlp` and `ls_2`
    (x' → x' + ls_2(mlp(ln_2(x'))): open_clip's ResidualAttentionBlock and its custom twin)."""
    visual = require_vit_image_tower(AdaptFormer.name, model, WHAT)
    blocks = list(visual.transformer.resblocks)
    for i, b in enumerate(blocks):
        if not all(isinstance(getattr(b, a, None), nn.Module) for a in ("ln_2", "mlp", "ls_2")):
            raise ValueError(f"{AdaptFormer.name} adds its branch beside the MLP of every image-tower block, and "
                             f"block {i} ({type(b).__name__}) has no ln_2 / mlp / ls_2. Allowed: archs built of "
                             f"open_clip's residual blocks (the CLIP ViT archs, CoCa)")
    return blocks


def install(blocks: list[nn.Module], adapters: nn.ModuleList, scale: float, dropout: float,
            batch_first: bool) -> list:
    """Per block: a forward pre-hook on `ln_2` keeps its input x' (the un-normalised sum after
    the attention), a forward hook on `ls_2` (after the MLP and its LayerScale, before the
    residual add) adds the branch on x': out = x' + ls_2(MLP(LN₂ x')) + s·Up(drop(ReLU(Down x'))).
    Returns the hook handles."""
    batch_dim = 0 if batch_first else 1
    handles = []
    for block, adapter in zip(blocks, adapters, strict=True):
        slot: dict[str, torch.Tensor] = {}

        def keep_input(module, args, slot=slot):
            slot["x"] = args[0]

        def add_branch(module, args, output, slot=slot, adapter=adapter):
            x = slot.pop("x")
            # dropout follows the tower's mode (train / eval), as the block's own layers do
            return output + adapter.branch(x, scale, dropout, batch_dim, module.training).to(output.dtype)

        handles.append(block.ln_2.register_forward_pre_hook(keep_input))
        handles.append(block.ls_2.register_forward_hook(add_branch))
    return handles


@register
class AdaptFormer(Method):
    """AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
    Recognition", NeurIPS 2022; code ShoufaChen/AdaptFormer, `models/adapter.py`,
    `models/custom_modules.py`, `main_image.py`): in every block of the image tower a
    bottleneck MLP parallel to the block's MLP,

        x' = x + Attn(LN₁ x);  out = x' + MLP(LN₂ x') + s · Up(drop(ReLU(Down(x')))),

    both towers frozen, cross-entropy on s_clip·f(x)·Hᵀ against the fixed zero-shot head H.
    Only Down and Up (weights and biases) train.

    Checked in their code: the adapter's input is the un-normalised x' (`ffn_option
    "parallel"`, `adapter_layernorm_option "none"`), ReLU, then dropout 0.1, then Up, times
    s = 0.1 (`ffn_adapter_scalar "0.1"`); bottleneck 64 (`ffn_num`); Down Kaiming-uniform
    (a = √5), Up and both biases zero (`init_option "lora"`), so that the first forward is
    the pre-trained one; the branch is added after the MLP's drop-path, before the residual
    add (here: after open_clip's LayerScale `ls_2`, Identity in CLIP); SGD momentum 0.9,
    weight decay 0, lr = 0.1 × batch / 256. Widths come from the model. Hooks on open_clip's
    own VisionTransformer blocks (`install`); `check` refuses other image towers.

    OPEN choices (ours; their paper fine-tunes MAE/ImageNet ViTs with a new linear head, and
    the CLIP settings of R-Adapter's comparison are not in their code: UNVERIFIED there):
    - the head is CLIP's zero-shot prompt-ensemble head H (fixed), the logits carry the
      model's logit scale, so the method adapts the image tower of CLIP only;
    - lr 0.0125 = 0.1 × 32 / 256 for the project's default batch of 32: scale it with
      `finetune.train.batch_size`; warm-up: the project's linear warm-up over `warmup_steps`
      (6, 10 % of a 60-step run; their 20 of 100 epochs), then cosine to 0; no gradient
      clipping (their code has none);
    - the dropout mask is one Bernoulli draw per element of the bottleneck activations, per
      sample across DDP ranks (`common.per_row`);
    - WiSE-style α (`eval_model(alpha)`): the branch's s becomes α·s (α = 0 is the
      pre-trained model exactly: no hook is installed), so `weight_space = True` and the
      evaluate stage sweeps α as for CLIP-Adapter and R-Adapter; α = 1 is AdaptFormer.

    Precision: their code trains under fp16 autocast with a loss scaler; here the trainer's
    precision (bf16 autocast on CUDA): the branch runs in the block's precision (Down/Up are
    fp32 parameters, autocast casts them), added in the residual stream's dtype; features
    normalised and the cross-entropy computed in fp32 (`classification_loss`, autocast off).
    """

    name = "adaptformer"
    family = "peft"
    # soups: no; a state is the adapters, whose branch output scale s is a hyper-parameter
    trains_extra = r"^adapters\.\d+\.(down|up)\.(weight|bias)$"
    Hparams = AdaptFormerHparams
    weight_space = True

    @classmethod
    def check_model(cls, model) -> None:
        adapter_blocks(model)

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self._handles: list = []

    def setup(self) -> None:
        freeze(self.root)
        blocks = adapter_blocks(self.ctx.model)
        visual = self.ctx.model.visual
        if "adapters" not in self.extra:
            width = visual.transformer.width
            self.extra["adapters"] = nn.ModuleList(
                [AdaptMLP(width, self.hp.bottleneck) for _ in blocks]).to(visual.class_embedding.device)
        if not self._handles:
            self._handles = install(blocks, self.extra["adapters"], self.hp.scale, self.hp.dropout,
                                    getattr(visual.transformer, "batch_first", True))
        for p in self.extra["adapters"].parameters():
            p.requires_grad_(True)

    def remove_adapters(self) -> None:
        """Detach the hooks: `ctx.model` is the plain pre-trained model again."""
        remove(self._handles)

    def optimizer(self):
        return torch.optim.SGD([{"params": list(self.extra["adapters"].parameters()), "lr_scale": 1.0}],
                               lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay)

    def loss(self, batch, step):
        model = self.ctx.model
        with rank_rows():  # the batch's rows: dropout masks drawn per sample across ranks
            feats = image_features(model, batch["image"])
        head = fixed_head(model, self.ctx.zeroshot_head).to(feats)  # fp32 (float64 in the float64 tests)
        return {"ce_loss": classification_loss(feats, head, batch["y"])}

    def live_eval_model(self) -> EvalModel:
        return AdaptedEvalModel(self.ctx.model, self.extra["adapters"], fixed_head(self.ctx.model,
                                                                                   self.ctx.zeroshot_head))

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        blocks = adapter_blocks(model)
        width = model.visual.transformer.width
        adapters = nn.ModuleList([AdaptMLP(width, hp.bottleneck) for _ in blocks])
        own = {k[len("extra.adapters."):]: v for k, v in state.items() if k.startswith("extra.adapters.")}
        if len(own) != len(state):
            raise KeyError(f"{cls.name} state holds keys that are not adapters: {sorted(set(state) - set(own))[:5]}")
        adapters.load_state_dict(own)  # strict: one adapter per block, the keys must match exactly
        adapters.to(zeroshot_head.device)
        if alpha != 0.0:
            batch_first = getattr(model.visual.transformer, "batch_first", True)
            install(blocks, adapters, alpha * hp.scale, hp.dropout, batch_first)
        return AdaptedEvalModel(model, adapters, fixed_head(model, zeroshot_head))


def fixed_head(model: nn.Module, zeroshot_head: torch.Tensor) -> torch.Tensor:
    """s·H: the zero-shot head with the model's (frozen) logit scale."""
    return model.logit_scale.exp().detach().float() * zeroshot_head.float()


class AdaptedEvalModel(EvalModel):
    """The model with its adapter hooks active and a fixed head; holds the adapters so that
    `.to(device)` moves them with the model."""

    def __init__(self, model: nn.Module, adapters: nn.Module, head: torch.Tensor):
        super().__init__(model, head=head)
        self.adapters = adapters
