"""The small interface every fine-tuning method implements; the trainer sees only this.

A method says which parameters train (`setup`), what modules it inserts (also `setup`), its
loss terms (`loss` returns a dict of named `*_loss` tensors the trainer sums and logs), an
optional per-step hook (`after_step`: EMA, running averages, FTP's projection), what it saves
(`trained_state`: only what it trained; `checkpoint_only` buffers are for resuming only), how
several trainings become one model (`n_runs`, `combine`: Model Stock) and how a saved state
becomes an evaluable model (`eval_model`, which also implements the WiSE-FT α for methods that
support it).

Precision: the trainer runs `loss` under bf16 autocast when `precision` resolves to bf16
(`auto` on CUDA). A method's forward then runs in bf16; features are normalised in fp32
(`common.image_features` / `text_features`) and every loss in `pipeline.models.losses` runs in fp32
with autocast off. Each method's docstring says what else, if anything, it runs in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from pipeline.core.validation import Settings
from pipeline.models.evalmodel import EvalModel  # noqa: F401  (what `eval_model` returns)


@dataclass(frozen=True)
class BaseHparams(Settings):
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 10

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: {self.lr} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: {self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be >= 0")


@dataclass(frozen=True)
class MicroBatch:
    """Which micro-batch of its optimiser step a `Method.loss` call computes: `index` of
    `count` (`count` = grad_accum, or fewer when the batch has fewer samples per process).
    The trainer sums the micro-batches' losses divided by `count`. Most methods ignore it; a
    method with per-step state (DiVE's average vector) uses it to act once per step."""

    index: int = 0
    count: int = 1


@dataclass
class ReferenceData:
    """Image-caption reference pairs with their pre-trained embeddings from the embed cache."""

    images: torch.utils.data.Dataset  # item j -> preprocessed image tensor (no augmentation)
    tokens: torch.Tensor  # [R, L] tokenised captions
    image_pre: torch.Tensor  # [R, D] f_pre(x_j), L2-normalised, float32
    text_pre: torch.Tensor  # [R, D] g_pre(t_j), L2-normalised, float32

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class TaskContext:
    """Everything a method may use to build itself and compute its loss."""

    model: nn.Module  # the open_clip model, loaded with the pre-trained weights, on device
    class_tokens: torch.Tensor  # [C, T, L] tokenised class prompts (all templates)
    zeroshot_head: torch.Tensor  # [C, D] from the pre-trained text tower (normalised rows)
    device: torch.device
    seed: int = 0
    train_set: torch.utils.data.Dataset | None = None  # items: dict(image?, y, index)
    train_eval_set: torch.utils.data.Dataset | None = None  # same items, no augmentation
    reference: ReferenceData | None = None
    fit: Callable | None = None  # the trainer's `fit`, for methods with an inner stage (LP-FT)
    # each training sample's domain (finetune.train.group_balanced; None: off): an inner stage
    # draws its batches as the outer trainer does (`fit(..., groups=train_groups)`)
    train_groups: torch.Tensor | None = None
    # activation memory one chunk of class prompts encoded with gradient may use
    # (finetune.train.prompt_memory_mb); None = all prompts in one forward
    prompt_memory_bytes: int | None = None
    # [N, L] the tokenised caption of each training sample (row i: `train_set` item i), for a
    # method with `needs_captions` (ARF); None otherwise
    train_captions: torch.Tensor | None = None
    # the task's class names (in label order) and the model's tokenizer, for methods that
    # write their own prompts (CoOp, CoCoOp); None where a caller has none
    class_names: tuple[str, ...] | None = None
    tokenizer: Callable | None = None

    @property
    def n_classes(self) -> int:
        return self.class_tokens.shape[0]


class Method:
    """Base class. Subclasses set `name` and `Hparams` and are registered with
    `@pipeline.methods.register`."""

    name: ClassVar[str] = ""
    Hparams: ClassVar[type] = BaseHparams
    # WiSE-FT applies: the trained weights live in the pre-trained weight space.
    weight_space: ClassVar[bool] = False
    # Model soups apply (`evaluate.soups`, `pipeline.evaluation.soups`): the saved states of two
    # trials of this method are the same tensors of one architecture from one start, and the
    # model `eval_model` builds is the saved state itself (no hyper-parameter scales it), so the
    # mean of trials' states is a model of the method. False where a state is factors (LoRA's
    # A, B: the mean of products is not the product of means) or the trials' shapes may differ.
    soups: ClassVar[bool] = False
    # The method's family in the report's tables and figures (and `python -m pipeline methods`):
    # "robust" (full fine-tuning, robust objectives), "peft" (parameter-efficient), "probe"
    # (linear probes, prototypes, cache/adapter few-shot heads), "prompt" (learned prompt tokens:
    # CoOp, CoCoOp, MaPLe, VPT), "vision-only", "baseline".
    family: ClassVar[str] = "other"
    # the method draws reference batches (DiVE)
    needs_reference: ClassVar[bool] = False
    # the method reads a caption of each training image (`TaskContext.train_captions`): from the
    # CSV its hyper-parameter `captions` names, or, when that is "", from the dataset's own
    # descriptions (`DatasetSpec.describe`: the built-in generator's); the check stage refuses a
    # trial with neither (`pipeline.data.captions`)
    needs_captions: ClassVar[bool] = False
    # the trainer loads images for each batch (False: the method reads cached features)
    uses_images: ClassVar[bool] = True
    # False: nothing trains (the zero-shot baseline; a training-free cache model, Tip-Adapter); the
    # finetune stage runs `setup` and saves `trained_state()`: empty, or the buffers setup built
    trains: ClassVar[bool] = True
    # the pre-trained model the method starts from: "clip" (model.*) or "vision", a vision-only
    # backbone (vision.*, `pipeline.models.vision`) with no text tower: no zero-shot level,
    # and no measure that needs a text tower (retention, RSA) applies
    backbone: ClassVar[str] = "clip"
    # The method's test contract (tests/test_methods.py reads it; regexes over parameter names):
    # `trains_clip`, the CLIP parameters that training changes, every other one staying
    # bit-identical ("" = all, None = none); `trains_extra`, the pattern every method-owned
    # (`extra`) parameter matches (None = the method owns none).
    trains_clip: ClassVar[str | None] = None
    trains_extra: ClassVar[str | None] = None
    # set by the trainer before every `loss` call
    micro: MicroBatch = MicroBatch()
    # set by the trainer before `setup`: the run's number of optimiser steps (for a method
    # whose per-step weights depend on the run's length, e.g. a Beta-weighted average)
    total_steps: int | None = None
    # how many trainings `fit` runs, each from the state `setup` left and with its own training
    # seed, before `combine` makes one model of their final states (Model Stock: 2). A method
    # with n_runs > 1 keeps all its per-run state in parameters and `extra` buffers (the trainer
    # puts those back to their start before each run and checkpoints the finished runs)
    n_runs: ClassVar[int] = 1
    # names of `extra` entries whose buffers are training state only (FTP's projection state):
    # in the trainer's checkpoints, so that a resumed run continues them, but not in
    # `trained_state` (not saved with the weights)
    checkpoint_only: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hp: Any, ctx: TaskContext):
        type(self).check_model(ctx.model)  # refuse a model this method cannot adapt, before any work
        self.hp = hp
        self.ctx = ctx
        self.extra = nn.ModuleDict()  # method-owned modules and buffers (head, EMA, ...)
        self.root = nn.ModuleDict({"clip": ctx.model, "extra": self.extra})

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise ValueError (a sentence naming the method, what the model lacks and which
        archs have it) when this method cannot adapt `model`, e.g. one that edits open_clip's
        residual blocks given a timm image tower. Called by the `check` stage on the arch
        built with random weights, and by `__init__`, so a refusal comes before any work.
        Default: any open_clip model (image and text towers, a logit scale) is accepted."""

    @classmethod
    def check_task(cls, hp: Any, model: nn.Module, tokenizer: Callable, class_names: tuple[str, ...] | None) -> None:
        """Raise ValueError (a sentence) when hyper-parameters `hp` cannot work on this task:
        CoOp's prompts must fit the text tower's context with every class name. Called by the
        `check` stage for each trial, with the arch built with random weights, its tokenizer
        and the dataset's class names (None where the check cannot read them before
        `prepare`: a dataset whose prompts come with its data), and by nothing else (`setup`
        checks again). Default: nothing to check."""

    # ---- training -----------------------------------------------------------------------
    def setup(self) -> None:
        """Freeze/unfreeze parameters and insert modules. Default: nothing trains."""
        freeze(self.root)

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (the step's gradients still in `.grad`)."""

    def combine(self, start: dict[str, torch.Tensor], runs: list[dict[str, torch.Tensor]]) -> None:
        """n_runs > 1: make the trained model (its parameters and buffers) from the `runs`'
        final states. Each state, and `start` (what `setup` left, where every run began), maps
        the names of `root`'s trainable parameters (`clip.…`, `extra.…`) and of the `extra`
        buffers (`extra.…`) to their values. Called by `fit` after the last run."""
        raise NotImplementedError(f"{self.name}: n_runs = {self.n_runs} but no `combine`")

    def optimizer(self) -> torch.optim.Optimizer | None:
        """The method's own optimiser over its trainable parameters, or None (the default):
        the trainer's AdamW over `param_groups` with the project's weight-decay rule, warm-up
        and cosine schedule and gradient clipping. A method that returns one owns its step
        sizes: the trainer never clips its gradients, and schedules (warm-up `hp.warmup_steps`,
        cosine, from `hp.lr · lr_scale`) only the groups that carry an `lr_scale` key; the
        other groups keep the learning rate the method gave them (LP++'s data-driven ones)."""
        return None

    def param_groups(self) -> list[dict]:
        """Trainable parameters with optional per-group settings (`lr_scale`)."""
        return [{"named_params": trainable(self.root)}]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What is saved at the end: only the trained parameters (and method buffers)."""
        state = {n: p.detach() for n, p in trainable(self.root)}
        skip = tuple(f"{k}." for k in self.checkpoint_only)
        state.update({f"extra.{n}": b.detach() for n, b in self.extra.named_buffers() if not n.startswith(skip)})
        return state

    # ---- evaluation ---------------------------------------------------------------------
    def live_eval_model(self) -> EvalModel:
        """The trained model in memory as an `EvalModel` (α = 1), without a save/reload.
        `eval_model(pre-trained, trained_state())` must give the same outputs (the checkpoint
        round trip). Methods that insert modules return the model with them active."""
        head = self.extra["head"].weight.detach() if "head" in self.extra else None
        return EvalModel(self.ctx.model, head=head)

    @classmethod
    def eval_model(cls, model: nn.Module, state: dict[str, torch.Tensor], hp: Any,
                   zeroshot_head: torch.Tensor, alpha: float = 1.0) -> EvalModel:
        """Turn a saved state into an evaluable model. `model` holds the pre-trained weights
        and may be modified in place. Default (weight-space methods): θ_α =
        (1−α)·θ_pre + α·θ_ft for every trained weight; a trained head `extra.head.weight` is
        interpolated with the scaled zero-shot head the same way."""
        from pipeline.models.weights import wise_merge

        clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        if clip_state:
            current = model.state_dict()
            missing = sorted(set(clip_state) - set(current))
            if missing:
                raise KeyError(f"saved weights not in the model: {missing[:5]}")
            pre = {k: current[k] for k in clip_state}
            merged = wise_merge(pre, clip_state, alpha)
            model.load_state_dict(merged, strict=False)
        head = None
        if "extra.head.weight" in state:
            zs = model.logit_scale.exp().detach().float() * zeroshot_head.float()
            head = wise_merge({"h": zs}, {"h": state["extra.head.weight"].float()}, alpha)["h"]
        return EvalModel(model, head=head)


# ---- parameter selection helpers ----------------------------------------------------------


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module, predicate: Callable[[str, nn.Parameter], bool]) -> list[str]:
    """Set requires_grad on every parameter whose name satisfies `predicate`; return names."""
    names = []
    for n, p in module.named_parameters():
        if predicate(n, p):
            p.requires_grad_(True)
            names.append(n)
    if not names:
        raise ValueError("no parameter matched: the architecture lacks what this method trains")
    return names


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def matches(pattern: str) -> Callable[[str, Any], bool]:
    rx = re.compile(pattern)
    return lambda name, _p=None: rx.search(name) is not None


def count_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
