"""CoOp: learnable context vectors in front of each class name, trained through the frozen
text tower. Also home of the prompt pieces CoCoOp shares (the splice, the chunked encoder)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.validation import Bool, Float, Int, Str
from pipeline.methods import register
from pipeline.methods.base import BaseHparams, EvalModel, Method, freeze
from pipeline.methods.common import image_features
from pipeline.models.losses import classification_loss, upcast
from pipeline.models.zeroshot import _text_tower, encode_text_with_grad, prompt_chunk_size, trims_exactly


@dataclass(frozen=True)
class PromptHparams(BaseHparams):
    """What CoOp and CoCoOp share: the context, the paper's SGD."""

    n_ctx: Int = 16  # M, the number of context vectors (with `ctx_init`: its token count)
    ctx_init: Str = ""  # "" = N(0, 0.02²); else words whose token embeddings start the context
    momentum: Float = 0.9  # SGD momentum (Dassl's)

    def __post_init__(self):
        super().__post_init__()
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx: {self.n_ctx} must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: {self.momentum} must lie in [0, 1)")


@dataclass(frozen=True)
class CoOpHparams(PromptHparams):
    lr: Float = 2e-3
    weight_decay: Float = 5e-4
    warmup_steps: Int = 1
    csc: Bool = False  # class-specific contexts (one M × width context per class)

    def __post_init__(self):
        super().__post_init__()
        if self.csc and self.ctx_init:
            raise ValueError(f"csc: true with ctx_init {self.ctx_init!r}: class-specific contexts start at random "
                             "(N(0, 0.02²)), as in CoOp; set ctx_init: \"\" or csc: false")


# ---- the prompt: tokens, splice, chunked encoder (tests/test_prompt_learning.py checks each) ---


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of open_clip's own text transformer (the CLIP's or its `text`'s)."""
    tower = _text_tower(model)
    if tower is None or not isinstance(getattr(tower, "token_embedding", None), nn.Embedding):
        raise ValueError("no open_clip text transformer with a token embedding")
    return tower.token_embedding


def require_token_embedding(method: str, model: nn.Module) -> None:
    """ValueError naming the text tower unless `model` has open_clip's own text transformer,
    whose token embeddings the learned context replaces (a Hugging Face tower has none)."""
    try:
        token_embedding(model)
    except ValueError:
        text = type(getattr(model, "text", model)).__name__
        raise ValueError(f"{method} splices learned context vectors into the token embeddings of open_clip's own "
                         f"text transformer, and this model's text tower ({text}) is not one. Allowed: archs with "
                         f"open_clip's text transformer (the CLIP ViT and ResNet archs, CoCa)") from None


def prompt_tokens(tokenizer: Callable, class_names, prefix: str) -> tuple[torch.Tensor, int, int]:
    """(tokens [C, L] of "<prefix> <name>." per class, start, M): the prefix's M tokens sit at
    positions start … start+M−1 of every row (start = after the start-of-text token).

    The start is where the prefix's tokens first differ from the empty text's; M is the
    number of tokens before the prefix's end token. Each row is checked to carry the
    prefix's tokens there (a tokenizer that merged the prefix with the name would fail)."""
    empty, alone = tokenizer([""])[0], tokenizer([prefix])[0]
    differ = torch.nonzero(empty != alone).flatten()
    if differ.numel() == 0:
        raise ValueError(f"the context prefix {prefix!r} tokenizes to nothing")
    start = int(differ[0])
    end = torch.nonzero(alone[start:] == empty[start]).flatten()  # the end-of-text token after it
    if end.numel() == 0:
        raise ValueError(f"the context prefix {prefix!r} leaves no room for the class name in "
                         f"{alone.shape[0]} tokens")
    m = int(end[0])
    tokens = tokenizer([f"{prefix} {name}." for name in class_names])
    if not torch.equal(tokens[:, start:start + m], alone[start:start + m].expand(tokens.shape[0], -1)):
        bad = int(torch.nonzero((tokens[:, start:start + m] != alone[start:start + m]).any(1)).flatten()[0])
        raise ValueError(f"the prompt of class {class_names[bad]!r} does not keep the context prefix's {m} "
                         f"tokens at positions {start}…{start + m - 1}")
    texts = [f"{prefix} {name}." for name in class_names]
    length = tokens.shape[1]
    try:  # open_clip's tokenizers take a context length: tokenised without cutting, to see what was cut
        ends = (tokenizer(texts, context_length=4 * length) == empty[start]).int().argmax(dim=1)
        cut = torch.nonzero(ends > length - 1).flatten()
    except TypeError:  # a tokenizer without it: a prompt that reaches the last position may have been cut
        cut = torch.nonzero((tokens == empty[start]).int().argmax(dim=1) >= length - 1).flatten()
    if cut.numel():
        raise ValueError(f"the prompt {texts[int(cut[0])]!r} does not fit the text tower's {length}-token context "
                         f"(the tokenizer cuts the class name); use a smaller n_ctx or a shorter ctx_init")
    return tokens, start, m


@contextmanager
def spliced(model: nn.Module, context: torch.Tensor, start: int) -> Iterator[None]:
    """Inside, the token embeddings of every text forward of `model` have rows start …
    start+M−1 replaced by `context` [N, M, width] (one context per prompt of the forward);
    the token ids still decide where the tower pools (the end-of-text argmax)."""

    def hook(module, args, out):
        if out.shape[0] != context.shape[0]:
            raise RuntimeError(f"{out.shape[0]} prompts in the forward, {context.shape[0]} contexts")
        m = context.shape[1]
        return torch.cat([out[:, :start], context.to(out.dtype), out[:, start + m:]], dim=1)

    handle = token_embedding(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_prompts(model: nn.Module, tokens: torch.Tensor, context: Callable[[torch.Tensor], torch.Tensor],
                   start: int, chunk_size: int | None = None, trim: bool = True) -> torch.Tensor:
    """Unnormalised text features [N, D] of `tokens` [N, L], prompt n with the context
    `context(rows)[i]` [M, width] spliced in (rows: the prompts' indices into `tokens`).

    The class-prompt path of BitFit, A-CLIP and LoRA (`zeroshot.encode_text_with_grad`), with
    the context inside each chunk: chunks of `chunk_size` prompts (None: one forward), sorted
    by length where trimming is exact, each under non-reentrant activation checkpointing with
    its contexts computed inside it, so that the recomputation in the backward pass splices
    them again and only the chunk outputs stay alive (CoCoOp's B·C contexts are never held
    at once). Without gradient (evaluation) the chunks run plainly."""
    def run(rows: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        with spliced(model, context(rows), start):
            return encode_text_with_grad(model, toks, None, trim)

    n = tokens.shape[0]
    rows = torch.arange(n, device=tokens.device)
    if chunk_size is None or chunk_size >= n:
        return run(rows, tokens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} must be >= 1")
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if trim and trims_exactly(model) else rows
    grad = torch.is_grad_enabled()
    parts = []
    for i in range(0, n, chunk_size):
        pick = order[i:i + chunk_size]
        parts.append(checkpoint(run, pick, tokens[pick], use_reentrant=False) if grad else run(pick, tokens[pick]))
    return torch.cat(parts)[torch.argsort(order)]


def chunk_for(model: nn.Module, tokens: torch.Tensor, memory_bytes: int | None) -> int | None:
    """Prompts per chunk under the `finetune.train.prompt_memory_mb` budget (None: no budget)."""
    return None if memory_bytes is None else prompt_chunk_size(model, tokens, memory_bytes)


class LearnedContext(nn.Module):
    """The trained context `ctx` ([M, width], or [C, M, width] class-specific) with what its
    prompts need, saved with it (buffers): the tokens of every class prompt and the position
    of the context's first token."""

    def __init__(self, ctx: torch.Tensor, tokens: torch.Tensor, start: int):
        super().__init__()
        self.ctx = nn.Parameter(ctx.detach().clone())
        self.register_buffer("tokens", tokens.detach().clone().long())
        self.register_buffer("start", torch.tensor(int(start)))

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The context of class prompts `rows` [n] -> [n, M, width]."""
        if self.ctx.dim() == 3:
            return self.ctx[rows]
        return self.ctx.expand(rows.shape[0], -1, -1)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> "LearnedContext":
        keys = {f"{prefix}ctx", f"{prefix}tokens", f"{prefix}start"}
        if not keys <= set(state):
            raise KeyError(f"saved state lacks {sorted(keys - set(state))}")
        return cls(state[f"{prefix}ctx"], state[f"{prefix}tokens"], int(state[f"{prefix}start"]))


def prompt_layout(hp: PromptHparams, tokenizer: Callable, class_names) -> tuple[list[str], tuple]:
    """(class names as written in the prompts, `prompt_tokens` of the prompts), or ValueError
    when the context and a class name do not fit the text tower's context."""
    names = [str(n).replace("_", " ") for n in class_names]  # CoOp's rule
    prefix = hp.ctx_init.replace("_", " ").strip() if hp.ctx_init else " ".join(["X"] * hp.n_ctx)
    tokens, start, m = prompt_tokens(tokenizer, names, prefix)
    if m != hp.n_ctx:
        raise ValueError(f"n_ctx: {hp.n_ctx}, but ctx_init {hp.ctx_init!r} is {m} tokens; set n_ctx: {m}")
    return names, (tokens, start, m)


def check_prompts(method: str, hp: PromptHparams, tokenizer: Callable, class_names) -> None:
    """`Method.check_task` of the prompt methods: the prompts fit (`prompt_layout`)."""
    if class_names is not None:
        prompt_layout(hp, tokenizer, class_names)


def build_context(method: str, ctx, hp: PromptHparams, csc: bool = False) -> LearnedContext:
    """The initial context of `method` for the task's classes: the token embeddings of
    `hp.ctx_init` (CoOp's `ctx_init`), or N(0, 0.02²) drawn from a generator seeded by the
    run's seed (the same on every DDP rank), with the prompts "<init or X·M> <name>."."""
    if ctx.class_names is None or ctx.tokenizer is None:
        raise ValueError(f"{method} builds its prompts from the class names: the task context needs "
                         "`class_names` and `tokenizer`")
    names, (tokens, start, m) = prompt_layout(hp, ctx.tokenizer, ctx.class_names)
    embedding = token_embedding(ctx.model)
    weight = embedding.weight
    if hp.ctx_init:
        with torch.no_grad():
            init = embedding(tokens[:1, start:start + m].to(weight.device))[0]
    else:
        g = torch.Generator().manual_seed(int(ctx.seed) * 7919 + 0xC00)
        shape = (len(names), m, weight.shape[1]) if csc else (m, weight.shape[1])
        init = (0.02 * torch.randn(shape, generator=g, dtype=torch.float64)).to(weight.dtype)
    return LearnedContext(init.to(weight.dtype), tokens, start).to(weight.device)


EVAL_CHUNK = 1024  # prompts per text forward without gradient (as `zeroshot.build_head`)


def prompt_head(model: nn.Module, prompt: LearnedContext, chunk_size: int | None = None) -> torch.Tensor:
    """Normalised class text features [C, D] of CoOp's prompts (with gradient if enabled)."""
    emb = encode_prompts(model, prompt.tokens, prompt.rows, int(prompt.start), chunk_size)
    return F.normalize(upcast(emb), dim=-1)


class PromptSGD:
    """What the CoOp family shares: the optimiser, SGD with momentum and weight decay on every
    trained tensor, on the trainer's warm-up and cosine schedule (the group carries
    `lr_scale`); and the checks before any work, a text tower with a token embedding and
    prompts the tokenizer does not cut."""

    @classmethod
    def check_model(cls, model) -> None:
        require_token_embedding(cls.name, model)

    @classmethod
    def check_task(cls, hp, model, tokenizer, class_names) -> None:
        check_prompts(cls.name, hp, tokenizer, class_names)

    def optimizer(self):
        params = [p for p in self.extra.parameters() if p.requires_grad]
        return torch.optim.SGD([{"params": params, "lr_scale": 1.0}], lr=self.hp.lr, momentum=self.hp.momentum,
                               weight_decay=self.hp.weight_decay)


@register
class CoOp(PromptSGD, Method):
    """CoOp (Zhou, Loy, Yang & Liu, "Learning to Prompt for Vision-Language Models", IJCV
    2022, arXiv 2109.01134; code KaiyangZhou/CoOp, `trainers/coop.py`): the prompt of class c
    is `[SOT] v_1 … v_M [name of c] . [EOT]`, the context vectors v_m (token-embedding width)
    learnable and shared by every class, the rest of the prompt the frozen token embeddings;
    both towers and the logit scale s frozen, gradients through the text tower:

        L = CE(s · f(x) · g(p_c)ᵀ, y),  f, g L2-normalised.

    Every class prompt is re-encoded each step (C text forwards with gradient), by the
    chunked, checkpointed class-prompt path of BitFit, A-CLIP and LoRA (`encode_prompts`):
    chunks that fit `finetune.train.prompt_memory_mb`, so 1,139 classes (RxRx1) fit the same
    bound. Evaluation classifies with the learned prompts' head s·g(p_c) (one prompt per
    class, no template ensemble); retention and every measure that reads the text tower see
    the pre-trained towers, which CoOp leaves unchanged.

    Choices, checked against the official code:
    - context length M = 16 (`N_CTX`), random init N(0, 0.02²) (`CTX_INIT` ""), the placeholder
      prompt "X X … X <name>." as the code's; with `ctx_init` (e.g. "a photo of a"), the
      context starts at those words' token embeddings and M is their token count (the code
      counts words, the same for "a photo of a"); underscores in names become spaces;
    - class token at the end (`CLASS_TOKEN_POSITION: end`, the default and the paper's main
      setting); "middle" and "front" are not implemented;
    - `csc` (class-specific context, `CSC`) off by default; as in the code, only the random
      init has a class-specific form;
    - SGD, momentum 0.9, weight decay 5e-4 (on the context too, as Dassl's), lr 2e-3,
      cosine (the code's `vit_b16*.yaml`);
    - s is the model's own frozen logit scale (100 for OpenAI CLIP).

    OPEN (ours):
    - epochs and batch size are the project's (`finetune.train`), not the paper's 50/100/200
      epochs at batch 32; the warm-up is the trainer's linear one over `warmup_steps` = 1
      (the code: one epoch at a constant 1e-5);
    - selection: the protocol's, as for every method; the paper evaluates the last epoch
      with fixed settings;
    - the random init is drawn from a generator seeded by the run's seed (the same on every
      DDP rank), outside the global RNG;
    - precision: the code's default casts CLIP to fp16 (`PREC: fp16`); here the towers run
      in the trainer's precision (bf16 autocast on CUDA), the context stays in the model's
      dtype (fp32), features are normalised and the loss computed in fp32 with autocast off.

    DDP: nothing random in the loss; every rank encodes every class prompt (shared), and the
    context's gradient is averaged by the trainer. Not a weight-space method (no WiSE-FT α).
    """

    name = "coop"
    family = "prompt"
    trains_extra = r"^prompt\.ctx$"
    Hparams = CoOpHparams

    def setup(self) -> None:
        freeze(self.root)
        if "prompt" not in self.extra:
            self.extra["prompt"] = build_context(self.name, self.ctx, self.hp, csc=self.hp.csc)
        self.extra["prompt"].ctx.requires_grad_(True)

    def loss(self, batch, step):
        model = self.ctx.model
        with torch.no_grad():  # the image tower is frozen and nothing before it trains
            feats = image_features(model, batch["image"])
        prompt = self.extra["prompt"]
        head = prompt_head(model, prompt, chunk_for(model, prompt.tokens, self.ctx.prompt_memory_bytes))
        scale = model.logit_scale.exp().detach().float()
        return {"ce_loss": classification_loss(feats, scale * head, batch["y"])}

    @staticmethod
    @torch.no_grad()
    def build_eval(model, prompt: LearnedContext) -> EvalModel:
        was = model.training
        model.eval()
        head = prompt_head(model, prompt, EVAL_CHUNK)
        model.train(was)
        return EvalModel(model, head=model.logit_scale.exp().detach().float() * head.float())

    def live_eval_model(self) -> EvalModel:
        return self.build_eval(self.ctx.model, self.extra["prompt"])

    @classmethod
    def eval_model(cls, model, state, hp, zeroshot_head, alpha: float = 1.0) -> EvalModel:
        if alpha != 1.0:
            raise ValueError(f"{cls.name} has no WiSE-FT α (not a weight-space method); got α = {alpha}")
        prompt = LearnedContext.from_state(state, "extra.prompt.").to(zeroshot_head.device)
        return cls.build_eval(model.to(zeroshot_head.device), prompt)
