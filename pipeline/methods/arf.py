"""ARF: Anchor-based Robust Finetuning (Han et al., CVPR 2024, arXiv 2404.06244; no code released)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.core import dist
from pipeline.core.validation import Float, Int, Str
from pipeline.methods import register
from pipeline.methods.common import sample_class_prompts, text_features
from pipeline.methods.dive import DiVE, reference_draw
from pipeline.methods.flyp_replay import FLYPReplay, FLYPReplayHparams


def retrieval_pool(text_pre: torch.Tensor, class_embeddings: torch.Tensor, fraction: float,
                   minimum: int) -> torch.Tensor:
    """The reference rows ARF's image-text anchors are drawn from: the ⌈fraction·R⌉ rows (at
    least `minimum`, at most R) whose pre-trained caption embedding is most similar to any class
    embedding, score_j = max_c g_pre(t_j)·h_c; ties go to the lower row; returned in row order."""
    r = text_pre.shape[0]
    size = min(r, max(minimum, math.ceil(fraction * r - 1e-9)))
    score = (text_pre.double() @ class_embeddings.double().t()).max(1).values
    # a stable sort on −score: equal scores keep row order
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values


@dataclass(frozen=True)
class ARFHparams(FLYPReplayHparams):
    lam_c: Float = 1.0  # λ_c, the text-compensated anchors (training images with their captions)
    lam_r: Float = 1.0  # λ_r, the image-text anchors (retrieved reference pairs)
    retrieval_fraction: Float = 0.1  # the share of the reference set retrieved as anchors
    retrieval_min_batches: Int = 8  # ... and at least this many reference batches' worth of rows
    # the captions of the training images: a CSV (pipeline.data.captions: filepath,title), or ""
    # for the dataset's own descriptions (the built-in data; any other dataset is refused in check)
    captions: Str = ""

    def __post_init__(self):
        super().__post_init__()
        if self.lam_c < 0:
            raise ValueError(f"lam_c: {self.lam_c} must be >= 0")
        if not 0 < self.retrieval_fraction <= 1:
            raise ValueError(f"retrieval_fraction: {self.retrieval_fraction} must lie in (0, 1]")
        if self.retrieval_min_batches < 1:
            raise ValueError(f"retrieval_min_batches: {self.retrieval_min_batches} must be positive")


@register
class ARF(FLYPReplay):
    """ARF (Han et al., CVPR 2024, arXiv 2404.06244; no code released): FLYP + contrastive losses on captioned training images and retrieved references.

    "Anchor-based Robust Finetuning of Vision-Language Models"; the paper's repository has no
    code, so the formula is ours from the abstract (baselines.md, all OPEN): its text-compensated
    anchors are the fine-tuning images with captions from a pre-trained captioner, its
    image-text anchors pairs retrieved "according to the downstream task" from a dataset like
    CLIP's pre-training data, both used as extra contrastive supervision:
      L = L_FLYP(x, class prompt) + λ_c · L_CLIP(x, caption(x)) + λ_r · L_CLIP(retrieved reference pairs),
    each term the family's contrastive loss with the trained logit scale (CLIP's symmetric
    InfoNCE; SigLIP's sigmoid loss with its bias on a model with `logit_bias`), both towers
    and the scale trained, as FLYP.
    - Text-compensated anchors: the target batch's images with a caption of each (from a
      captioner in the paper). Here the captions come from the file the hyper-parameter
      `captions` names (any captioner, run by the user; format in `pipeline.data.captions`),
      or, when it is "", from the dataset's own description of each image (the built-in
      generator's: shape, colour, size, texture, background). A dataset with neither is
      refused by the check stage before any work, naming the key and the file format.
    - Image-text anchors: reference image-caption pairs retrieved "according to the task":
      the top `retrieval_fraction` (10 %) of the reference set by the pre-trained caption
      embedding's highest similarity to a class embedding (at least `retrieval_min_batches`
      (8) × B' rows), computed once at setup from the embed cache (g_pre of the references,
      and the prompt-ensemble zero-shot head as the class embeddings; `retrieval_pool`).

    It is FLYP+replay (hence DiVE) with the reference pool narrowed and the caption term
    added: the same reference set (the embed stage's reference cache), the same sampler
    (`DiVE.reference_rows`'s generator seeded by (seed, step), B' rows without replacement,
    the same on every DDP rank; here positions in the retrieved pool, so with
    retrieval_fraction 1 it draws DiVE's rows exactly, tested), the same reference forward
    (the evaluation transform; fp32 with autocast off under bf16), the same grad_accum rule
    (the reference term once per step, in micro-batch 0, times the count). So DiVE,
    FLYP+replay, SnD and ARF differ only in the loss (and ARF in which references it may
    draw). The cached embeddings are read where the formula allows: the retrieval uses the
    cached g_pre and zero-shot head; the losses themselves have no pre-trained term.

    OPEN choices (ours):
    - λ_c = λ_r = 1; three separate contrastive terms (no shared softmax between target,
      caption and reference rows);
    - the caption term reuses the target batch's image features (one image forward) against
      the captions' text features (one more text forward of B rows); it is per micro-batch,
      like FLYP's term; DDP gathers its features like FLYP's;
    - retrieval: top 10 % by max-over-classes cosine, at least 8·B', drawn uniformly each step
      (the paper retrieves from a large pool with a text query per class; its size and the
      sampling are not stated);
    - B' = 8 (DiVE's), a multiple of the number of processes (refused at the first step
      otherwise, as FLYP+replay).

    WiSE-FT applies (`weight_space`, as FLYP: both towers' fine-tuned weights live in the
    pre-trained weight space; α interpolates every trained weight).

    Precision: as FLYP+replay; the caption rows in the trainer's precision like the class
    prompts, their logits and loss in fp32.
    """

    name = "arf"
    family = "robust"
    soups = True
    Hparams = ARFHparams
    needs_captions = True

    def setup(self) -> None:
        super(DiVE, self).setup()  # FLYP's parameters
        ctx = self.ctx
        if ctx.reference is None or len(ctx.reference) == 0:
            raise ValueError("arf needs reference data (the embed stage's reference cache)")
        if ctx.train_captions is None:
            raise ValueError("arf needs a caption of every training image (TaskContext.train_captions): set its "
                             "hyper-parameter captions to a captions file, or use a dataset that describes its images")
        if ctx.train_set is not None and ctx.train_captions.shape[0] != len(ctx.train_set):
            raise ValueError(f"arf: {ctx.train_captions.shape[0]} captions for {len(ctx.train_set)} training samples")
        if not hasattr(self, "pool"):
            self.pool = retrieval_pool(ctx.reference.text_pre, ctx.zeroshot_head, self.hp.retrieval_fraction,
                                       self.hp.retrieval_min_batches * self.hp.ref_batch_size)

    def reference_rows(self, step: int) -> tuple[torch.Tensor, int]:
        """DiVE's draw (`dive.reference_draw`, seeded by (seed, step)) over the retrieved pool:
        positions among len(pool) mapped to reference rows, in row order; this rank's slice."""
        size = min(self.hp.ref_batch_size, len(self.pool))
        chosen = self.pool[reference_draw(self.ctx.seed, step, len(self.pool), size)].sort().values
        return chosen[dist.rank()::dist.world_size()], size

    def loss(self, batch, step):
        device = batch["y"].device
        tokens = sample_class_prompts(self.ctx.class_tokens, batch["y"])
        rows = None
        if self.micro.index == 0:  # the step's reference term lives in its first micro-batch
            rows, size = self.reference_rows(step)
            if size % dist.world_size():
                raise ValueError(f"arf hparams ref_batch_size: {size} reference rows cannot be split equally over "
                                 f"{dist.world_size()} processes; use a multiple of {dist.world_size()}")
        out = self.embed(batch["image"], tokens, rows, device)
        f, g = out[0], out[1]
        captions = self.ctx.train_captions[batch["index"].cpu()].to(device)
        terms = {"flyp_loss": self.contrastive_loss(f, g),
                 "caption_loss": self.hp.lam_c * self.contrastive_loss(f, text_features(self.ctx.model, captions))}
        if rows is None:
            terms["anchor_loss"] = torch.zeros((), device=device)
        else:  # × count: the trainer divides each micro-batch's loss by the count
            terms["anchor_loss"] = self.hp.lam_r * self.micro.count * self.contrastive_loss(out[2], out[3])
        return terms
