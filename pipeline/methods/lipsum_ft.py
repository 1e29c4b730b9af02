"""Lipsum-FT (Nam et al., ICLR 2024, arXiv 2404.00860; code cs-giung/lipsum-ft)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.validation import Float, Int
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, Method, freeze, unfreeze
from pipeline.methods.common import LinearHead, image_features, text_features
from pipeline.models.losses import classification_loss, fp32_loss, upcast

# CLIP's BPE vocabulary (open_clip's SimpleTokenizer): the two special ids are its last two
CLIP_VOCAB, SOT, EOT = 49408, 49406, 49407
_TEXT_STREAM = 0x11F5  # keeps the random-text seed apart from other (seed, step) uses


@fp32_loss
def lipsum_regulariser(f: torch.Tensor, f0: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """mean_i (1/(2K)) Σ_k (s·f_i·z_k − s·f0_i·z_k)²: the energy gap between the fine-tuned and
    the pre-trained image features against K random texts z (all rows L2-normalised)."""
    gap = scale * (f @ z.t()) - scale * (f0 @ z.t())
    return gap.pow(2).sum(1).div(2 * z.shape[0]).mean()


def random_texts(k: int, length: int, context_length: int, generator: torch.Generator) -> torch.Tensor:
    """K token rows [SOT] + `length` ids drawn uniformly from the non-special vocabulary
    [0, SOT) + [EOT], zero-padded to the context length (after EOT, which open_clip's EOT
    pooling reads; the causal mask keeps the padding out of it)."""
    tokens = torch.zeros(k, context_length, dtype=torch.long)
    tokens[:, 0] = SOT
    tokens[:, 1:1 + length] = torch.randint(0, SOT, (k, length), generator=generator)
    tokens[:, 1 + length] = EOT
    return tokens


@dataclass(frozen=True)
class LipsumFTHparams(BaseHparams):
    lr: Float = 1e-5
    weight_decay: Float = 0.0
    warmup_steps: Int = 6  # the paper's 10 % warm-up, of the 60-step default run
    lam: Float = 1.0  # λ, the regulariser's weight
    n_texts: Int = 80  # K random texts per step
    text_length: Int = 8  # L random tokens per text

    def __post_init__(self):
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam: {self.lam} must be >= 0")
        if self.n_texts < 1:
            raise ValueError(f"n_texts: {self.n_texts} must be positive")
        if self.text_length < 1:
            raise ValueError(f"text_length: {self.text_length} must be positive")


@register
class LipsumFT(Method):
    """Lipsum-FT (Nam et al., ICLR 2024): FT + random-text energy gap to the pre-trained encoder.

    "Lipsum-FT: Robust Fine-Tuning of Zero-Shot Models Using Random Text Guidance"; code cs-giung/lipsum-ft, JAX, `scripts/Lipsum-FT.py`): the image
    encoder and a linear head trained with
      L = CE(s·f_θ(x)·Wᵀ, y) + λ · mean_i (1/(2K)) Σ_k (s·f_θ(x_i)·z_k − s·f_0(x_i)·z_k)²,
    z_k the frozen pre-trained text tower's normalised embeddings of K random texts, f_0 the
    frozen pre-trained image encoder on the same (augmented) batch, s the frozen pre-trained
    logit scale.

    Defaults (the paper's, `LipsumFTHparams`): λ 1, K 80, L 8, AdamW lr 1e-5, wd 0, warm-up
    10 % (6 of the default 60 steps) then cosine.

    Read in the official code (`scripts/Lipsum-FT.py::step_trn`): each text is [49406] + L ids
    drawn uniformly from [0, 49406) + [49407]; the K texts are shared by the whole batch and
    new every step; f_0 is a second forward of the pre-trained parameters on the same images;
    the regulariser is Σ_k(·)²/(2K) averaged over the batch, with exp(logit_scale) of the
    pre-trained model on both sides; the head is initialised from the zero-shot head and
    multiplied by s in the logits. Their run keeps the checkpoint with the best accuracy on
    the split it reports; ours saves the last iterate (the protocol selects trials).

    OPEN choices (ours):
    - the head is FT's (`common.LinearHead`, rows s·H_zs with s folded in, trained with the
      method's lr), so that FT and Lipsum-FT differ only in the regulariser and WiSE-FT
      interpolates the head as for FT; theirs keeps W = H and multiplies by s, under AdamW
      a head that moves s times faster in logit units;
    - the trainer's gradient clipping (finetune.train.grad_clip) applies as to every method
      (the paper: none); no label smoothing;
    - the K texts come from a generator seeded by (seed, step): the same for every micro-batch
      of a step, every DDP rank and any amount of RNG used elsewhere, so the step's loss is
      that of grad_accum 1 (micro-batches of equal size) and DDP draws equal one process's;
    - the text tower stays frozen and unused after z_k (it is the pre-trained one);
    - the pre-trained image encoder is a frozen copy made at setup, kept in eval mode, not
      saved; it costs one more image-tower forward (no backward) per step and the memory
      of a second image tower.

    Model families: the random texts are drawn from CLIP's BPE vocabulary (49408 ids, SOT
    49406, EOT 49407, EOT pooling), which CLIP, EVA-02 and CoCa share; SigLIP (its own
    tokenizer, last-token pooling) and HF text towers are refused in `check_model`.

    Precision: f_θ and f_0 run in the trainer's precision (bf16 autocast on CUDA) on the same
    pixels, so at θ = θ_0 the regulariser is 0 up to the rounding between training-mode and
    eval-mode kernels (~1e-13 in fp32 on CPU, tiny test model, tested); the features are
    normalised, and CE and the regulariser computed, in fp32 with autocast off. The random
    texts are embedded with autocast off (fp32). How much bf16 rounding of f − f_0 adds after
    the first steps is not measured here (no GPU).
    """

    name = "lipsum_ft"
    family = "robust"
    soups = True
    trains_clip = r"^visual\."
    trains_extra = r"^head\.weight$"
    Hparams = LipsumFTHparams
    weight_space = True

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        text = getattr(model, "text", None)  # open_clip's CustomTextCLIP / CoCa keep the tower here
        if text is not None:
            emb, pool = getattr(text, "token_embedding", None), getattr(text, "pool_type", None)
        else:
            emb, pool = getattr(model, "token_embedding", None), getattr(model, "text_pool_type", None)
        if emb is None or emb.num_embeddings != CLIP_VOCAB or pool != "argmax":
            have = "no token_embedding" if emb is None else f"{emb.num_embeddings} token ids"
            raise ValueError(
                f"lipsum_ft draws random texts from CLIP's BPE vocabulary ({CLIP_VOCAB} token ids, [SOT] {SOT}, "
                f"[EOT] {EOT}, EOT (argmax) pooling); this model's text tower has {have} and pooling {pool!r} "
                "(SigLIP's tokenizer and last-token pooling, or an HF text tower). Allowed: archs with open_clip's "
                "CLIP text tower (ViT-B-32, ViT-B-16, ViT-L-14, RN50, EVA02-B-16, coca_ViT-B-32, ...)")

    def setup(self) -> None:
        freeze(self.root)
        ctx = self.ctx
        context_length = ctx.class_tokens.shape[-1]
        if self.hp.text_length + 2 > context_length:
            raise ValueError(f"lipsum_ft hparams text_length: {self.hp.text_length} + [SOT] + [EOT] exceeds the "
                             f"text tower's context length {context_length}")
        if not hasattr(self, "visual0"):
            self.visual0 = copy.deepcopy(ctx.model.visual).to(ctx.device).eval()
            freeze(self.visual0)
        unfreeze(ctx.model, lambda n, p: n.startswith("visual."))
        if "head" not in self.extra:
            scale = ctx.model.logit_scale.exp().detach().float()
            self.extra["head"] = LinearHead(scale * ctx.zeroshot_head.float())
        self.extra["head"].weight.requires_grad_(True)

    def text_anchors(self, step: int, device: torch.device) -> torch.Tensor:
        """z: the pre-trained text tower's normalised embeddings of the step's K random texts."""
        mixed = (self.ctx.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + _TEXT_STREAM) % 2**63
        g = torch.Generator().manual_seed(mixed)
        tokens = random_texts(self.hp.n_texts, self.hp.text_length, self.ctx.class_tokens.shape[-1], g)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return text_features(self.ctx.model, tokens.to(device))

    def loss(self, batch, step):
        model = self.ctx.model
        images = batch["image"]
        f = image_features(model, images)
        with torch.no_grad():
            out = self.visual0(images)  # CoCa's tower returns (pooled, tokens), as its encode_image reads
            f0 = nn.functional.normalize(upcast(out[0] if isinstance(out, tuple) else out), dim=-1)
        z = self.text_anchors(step, images.device)
        scale = model.logit_scale.exp().detach()
        return {"ce_loss": classification_loss(f, self.extra["head"].weight, batch["y"]),
                "lipsum_loss": self.hp.lam * lipsum_regulariser(f, f0, z, scale)}
