"""Tip-Adapter: a training-free cache model of the few-shot training set, blended with the
zero-shot head; α and β chosen on the protocol's validation split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.validation import Float, Int, Settings
from pipeline.methods import register
from pipeline.methods.base import EvalModel, Method, freeze
from pipeline.models.evalmodel import TunedClassifier

SEARCH_FROM = 0.1  # the official grids start at 0.1 (`utils.search_hp`)


@dataclass(frozen=True)
class TipHparams(Settings):
    views: Int = 10  # augmented passes over the training sample averaged into the cache keys
    alpha: Float = 1.17  # the defaults (the `none` protocol keeps them): the code's ImageNet init
    beta: Float = 1.0
    # the search grids: `steps` values from 0.1 in steps of (max − 0.1)/steps (max excluded)
    alpha_max: Float = 3.0
    alpha_steps: Int = 20
    beta_max: Float = 7.0
    beta_steps: Int = 200

    def __post_init__(self):
        if self.views < 1:
            raise ValueError(f"views: {self.views} must be >= 1")
        if self.beta <= 0 or self.alpha < 0:
            raise ValueError(f"alpha: {self.alpha}, beta: {self.beta}: need alpha >= 0 and beta > 0")
        for name in ("alpha", "beta"):
            top, steps = getattr(self, f"{name}_max"), getattr(self, f"{name}_steps")
            if steps < 1 or top <= SEARCH_FROM:
                raise ValueError(f"{name}_max: {top}, {name}_steps: {steps}: the grid needs {name}_max > "
                                 f"{SEARCH_FROM} and {name}_steps >= 1")


def search_grid(top: float, steps: int) -> tuple[float, ...]:
    """The official grid: 0.1 + i·(top − 0.1)/steps, i = 0 .. steps − 1."""
    return tuple(SEARCH_FROM + i * (top - SEARCH_FROM) / steps for i in range(steps))


# ---- the pieces, as pure functions (tests/test_fewshot_baselines.py checks each) -----------


def tip_logits(f: torch.Tensor, head: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter's logits [N, C]: head·f + α · exp(−β (1 − f·Kᵀ)) · L, with f [N, D] the
    normalised image features, head [C, D] the zero-shot head times the logit scale, K [M, D]
    the cache keys, L [M, C] the cache values (one-hot labels)."""
    return f @ head.t() + alpha * cache_affinity(f, keys, beta) @ values


def cache_affinity(f: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(−β (1 − f·Kᵀ)) [N, M]."""
    return torch.exp(-beta * (1 - f @ keys.t()))


def cache_keys(raw_views: torch.Tensor) -> torch.Tensor:
    """The cache keys [M, D] from the image encoder's raw (unnormalised) outputs of every
    augmented pass [V, M, D]: their mean over the passes, normalised once (the code's
    `build_cache_model`)."""
    return F.normalize(raw_views.float().mean(0), dim=-1)


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The cache values L [M, C]; C the task's classes (the code's `F.one_hot` without a
    class count gives max(label) + 1 columns: fewer when the last classes have no sample)."""
    return F.one_hot(labels.long(), n_classes).float()


def _view_seed(seed: int, view: int, item: int) -> int:
    return (seed * 1_000_003 + view * 7919 + item * 104_729 + 0x719A) % (2 ** 63)


class SeededView(torch.utils.data.Dataset):
    """Pass `view` over `base`: item i drawn with the global RNG seeded by (seed, view, i)
    and restored after, so each sample's augmentation depends on nothing else (not the batch
    order, the loader's workers or its own seed draws)."""

    def __init__(self, base, seed: int, view: int):
        self.base, self.seed, self.view = base, seed, view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.seed, self.view, i))
            return self.base[i]


@torch.no_grad()
def raw_views(model: nn.Module, dataset, device, views: int, seed: int, desc: str) -> torch.Tensor:
    """The image encoder's raw outputs [V, M, D] (float32, on CPU) of `views` passes over
    `dataset` (items carry the training transform's random augmentation), each item of each
    pass seeded (`SeededView`): the same run draws the same views."""
    from pipeline.models.encode import encode_images

    class Raw(nn.Module):  # encode_images' encoder interface, without the normalisation
        def encode_image(self, x):
            return model.encode_image(x).float()

    with torch.random.fork_rng(devices=[]):  # (the loader draws its own seeds: leave the run's RNG alone)
        return torch.stack([encode_images(Raw(), SeededView(dataset, seed, v), device, desc=f"{desc} {v + 1}/{views}")
                            for v in range(views)])


class TipClassifier(TunedClassifier):
    """The cache model as evaluation's classifier: logits of `tip_logits` at the post-hoc
    setting (α, β; with snapshots of trained keys [E, M, D], also the epoch, 1-based). Kept
    with the features they were computed on: f·Kᵀ of the last epoch and exp(−β(1 − f·Kᵀ))·L
    of the last β, so a search over β and α (innermost) computes each once."""

    def __init__(self, head: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, setting: dict,
                 search: tuple[dict[str, tuple], ...]):
        super().__init__(setting)
        self.register_buffer("zs_head", head.detach().float(), persistent=False)
        self.register_buffer("keys", keys.detach().float(), persistent=False)
        self.register_buffer("values", values.detach().float(), persistent=False)
        self.search = search
        self._memo: dict = {}

    def _keys(self) -> torch.Tensor:
        if self.keys.dim() == 2:
            return self.keys
        epoch = int(round(self.setting["epoch"]))
        if not 1 <= epoch <= self.keys.shape[0]:
            raise ValueError(f"epoch {epoch}: the cache holds epochs 1..{self.keys.shape[0]}")
        return self.keys[epoch - 1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.to(self.keys.device, torch.float32)
        alpha, beta = float(self.setting["alpha"]), float(self.setting["beta"])
        memo = self._memo
        if memo.get("features") is not features:  # (held, so its identity stays its own)
            memo.clear()
            memo.update(features=features, zs=f @ self.zs_head.t())
        epoch = self.setting.get("epoch")
        if "dots" not in memo or memo["epoch"] != epoch:  # f·Kᵀ: the same for every α and β
            memo.update(epoch=epoch, dots=f @ self._keys().t(), beta=None)
        if memo["beta"] != beta:  # the last β only: the search runs α innermost
            memo.update(beta=beta, cache=torch.exp(-beta * (1 - memo["dots"])) @ self.values)
        return memo["zs"] + alpha * memo["cache"]


@register
class TipAdapter(Method):
    """Tip-Adapter (Zhang, Zhang, Fang, Gao, Li, Dai, Qiao & Li, "Tip-Adapter: Training-free
    Adaption of CLIP for Few-shot Classification", ECCV 2022, arXiv 2207.09519; code
    gaopengcuhk/Tip-Adapter, `main.py`, `utils.py`):

        logits = s · f·Hᵀ + α · exp(−β (1 − f·Kᵀ)) · L

    f the frozen image encoder's normalised features, H the zero-shot head, K the cache keys:
    the encoder's raw outputs of `views` = 10 augmented passes over the training sample,
    averaged, normalised once (`build_cache_model`); L the one-hot labels. Nothing trains
    (`trains = False`): the finetune stage builds the cache at setup and saves it (keys and
    labels). α and β are post-hoc settings (`TunedClassifier`): searched on the selection
    protocol's validation split by the finetune stage, never on a test split, β outermost
    over 0.1 + i·(7 − 0.1)/200 (i < 200) and α over 0.1 + i·(3 − 0.1)/20 (i < 20), ties to
    the first met (the code's `search_hp`: ImageNet's ranges, strict `>`); the `none`
    protocol keeps α = 1.17, β = 1 (the code's ImageNet `init_alpha`, `init_beta`).

    What the official code does that we do not (Tip-Adapter#11): its ImageNet script
    searches α and β on the test set (`main_imagenet.py`); here the protocol's split only.

    OPEN choices (ours):
    - the scale of the zero-shot logits is the model's s = exp(logit_scale), not the code's
      literal 100 (OpenAI CLIP's s); the cache logits are unscaled, as in the code;
    - the search grid and defaults are ImageNet's for every dataset (the code's per-dataset
      configs differ, e.g. `dtd.yaml`: β and α up to 13, α_0 = 2); a trial may change them
      (`alpha_max`, `alpha_steps`, `beta_max`, `beta_steps`) or the defaults (`alpha`, `beta`);
    - the score searched is the dataset's official metric on the split (the code: accuracy);
    - the augmentation of the passes is the project's training transform (the dataset's
      `preprocess_train`), not the code's RandomResizedCrop(scale 0.5–1, bicubic) + flip;
      each image of each pass is seeded by (run seed, pass, position in the sample), the
      global RNG restored after;
    - the cache is built once per run (training sample × seed) at setup, as LP++ and CLAP
      build theirs, not across runs;
    - L has one column per task class (the code's `F.one_hot` infers the count from the
      labels, short when the last classes have no sample); values in fp32 (the code: fp16);
    - the zero-shot head is the project's prompt ensemble (`pipeline.models.zeroshot`),
      built as the code's `clip_classifier` (mean of normalised template embeddings,
      renormalised);
    - no WiSE-FT α (`weight_space = False`); retention and RSA are the pre-trained model's
      (the image and text towers are untouched).

    Precision: fp32 throughout (features cached at setup; the logits in fp32).
    """

    name = "tip_adapter"
    family = "probe"
    Hparams = TipHparams
    trains = False
    uses_images = False

    def setup(self) -> None:
        freeze(self.root)
        ctx, hp = self.ctx, self.hp
        if "cache_keys" in self.extra._buffers:
            return
        keys, labels = self._build_cache()
        self.extra.register_buffer("cache_keys", keys.to(ctx.device))
        self.extra.register_buffer("cache_labels", labels.to(ctx.device))

    def _build_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [M, D], labels [M]) of the training sample; also keeps the views' normalised
        features [V, M, D] (`self.view_features`) for a subclass that trains on them."""
        from pipeline.methods.common import image_free

        ctx, hp = self.ctx, self.hp
        if ctx.train_set is None:
            raise ValueError(f"{self.name} needs the training images (train_set)")
        model = ctx.model.to(ctx.device)
        was_training = model.training
        model.eval()
        raw = raw_views(model, ctx.train_set, ctx.device, hp.views, ctx.seed, f"{self.name} cache pass")
        model.train(was_training)
        self.view_features = F.normalize(raw, dim=-1).to(ctx.device)
        labels = torch.stack([torch.as_tensor(it["y"]) for it in image_free(ctx.train_set)]).long()
        return cache_keys(raw), labels

    def loss(self, batch, step):
        raise RuntimeError(f"{self.name} is training-free (trains = False): nothing to step")

    @classmethod
    def classifier(cls, model: nn.Module, keys: torch.Tensor, labels: torch.Tensor, hp, zeroshot_head: torch.Tensor,
                   n_epochs: int = 0) -> TipClassifier:
        """The cache model on `zeroshot_head` ([C, D], normalised rows) scaled by the model's s;
        `keys` [M, D] or, with `n_epochs`, the trained keys of every epoch [E, M, D]."""
        scale = model.logit_scale.detach().exp().float()
        head = scale * zeroshot_head.float().to(keys.device)
        setting = {"alpha": hp.alpha, "beta": hp.beta}
        search: tuple[dict[str, tuple], ...] = ({"beta": search_grid(hp.beta_max, hp.beta_steps),
                                                 "alpha": search_grid(hp.alpha_max, hp.alpha_steps)},)
        if n_epochs:
            setting["epoch"] = n_epochs  # the last (the `none` protocol)
            search = ({"epoch": tuple(range(1, n_epochs + 1))}, *search)
        return TipClassifier(head, keys, one_hot(labels.to(keys.device), head.shape[0]), setting, search)

    def live_eval_model(self) -> EvalModel:
        return self.eval_model(self.ctx.model, self.trained_state(), self.hp, self.ctx.zeroshot_head)

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        expected = {"extra.cache_keys", "extra.cache_labels"}
        if set(state) != expected:
            raise KeyError(f"{cls.name} state does not fit: differing keys {sorted(set(state) ^ expected)}")
        clf = cls.classifier(model, state["extra.cache_keys"], state["extra.cache_labels"], hp, zeroshot_head)
        return EvalModel(model, classifier=clf)
