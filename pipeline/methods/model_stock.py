"""Model Stock (Jang, Yun & Han, ECCV 2024, arXiv 2403.19522; merge from the authors' notebook)."""

from __future__ import annotations

import torch

from pipeline.methods import register
from pipeline.methods.ft import FullFinetune
from pipeline.models.weights import model_stock_merge

CLIP = "clip."


@register
class ModelStock(FullFinetune):
    """Model Stock (Jang et al., ECCV 2024, arXiv 2403.19522; no code released, the authors' notebook): two FT runs merged per tensor with θ_0.

    "Model Stock: All we need is just a few fine-tuned models". The stored snapshot of
    naver-ai/model-stock holds a README only ("code is under internal review"); the merge
    follows the authors' notebook as baselines.md gives it (checked there against it). Two fine-tuned models w1, w2 of the same
    recipe and the pre-trained w0, per tensor: cos = ⟨w1−w0, w2−w0⟩/(‖w1−w0‖‖w2−w0‖ + 1e-8),
    t = 2cos/(1 + cos), w = t·(w1 + w2)/2 + (1 − t)·w0 (`pipeline.models.weights.
    model_stock_merge`, in fp32). The merged model is what is saved and evaluated.

    The two runs are FT (this project's `ft`: image encoder + linear head initialised from the
    scaled zero-shot head, cross-entropy, AdamW with the trainer's schedule and clipping), trained
    inside the one finetune entry by the trainer (`Method.n_runs` = 2, `combine`): the same
    trial, hyper-parameters and sample, run 0 with the entry's seed and run 1 with a seed mixed
    from it (`pipeline.training.train.run_seed_of`), so they differ in batch order and
    augmentation only (the head's start is the same zero-shot head in both). A killed entry
    resumes inside the run it was in; a finished run is kept in the checkpoint.

    OPEN choices (baselines.md; ours):
    - the two runs: the same trial with two training seeds on the same sample;
    - t is clamped to [0, 1]: the notebook does not clamp it, and t = 2cos/(1 + cos) is
      negative for cos < 0 (seen on small tensors such as a head bias: t = −2.1) and unbounded
      as cos → −1; a tensor whose two updates point apart keeps w0;
    - the head merges with w0 = its start, s·H_zs (the zero-shot head, as baselines.md says);
    - the top-level text-tower keys (positional_embedding, text_projection, logit_scale,
      token_embedding, ln_final) would take the plain average of the two models; FT never
      trains them, so here they stay the pre-trained ones;
    - each run has the full step budget (`finetune.train`), so an entry costs two FT runs
      (the paper's cost: two fine-tunings);
    - the defaults are FT's (`FTHparams`), so that Model Stock and FT differ only in the merge
      (the paper fine-tunes with its base recipe's settings);
    - the periodic variant (merging during training) is UNVERIFIED in any code: not implemented.

    WiSE-FT applies (`weight_space`): the merged weights live in the pre-trained space, and α
    interpolates them with θ_0 (the head with s·H_zs), as for FT. SWA is refused (it averages one
    run's iterates). DDP: every rank trains both runs with the same seeds and averaged gradients
    and merges the same weights.

    Precision: as FT (the image tower in the trainer's precision, features, head and
    cross-entropy in fp32 with autocast off); the merge in fp32.
    """

    name = "model_stock"
    family = "robust"
    soups = True
    n_runs = 2

    def combine(self, start: dict[str, torch.Tensor], runs: list[dict[str, torch.Tensor]]) -> None:
        """Merge the two runs' final states per tensor, with w0 = the start (θ_0 for the CLIP
        weights, s·H_zs for the head), and load the result into the model."""

        def strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # open_clip's names (`model_stock_averaged` reads them), the head under its own key
            return {k[len(CLIP):] if k.startswith(CLIP) else k: v for k, v in state.items()}

        w1, w2 = runs
        merged = model_stock_merge(strip(start), strip(w1), strip(w2))
        named = {(k if k.startswith("extra.") else CLIP + k): v for k, v in merged.items()}
        with torch.no_grad():
            self.root.load_state_dict(named, strict=False)
