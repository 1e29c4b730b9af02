"""What evaluation needs from any fine-tuned model: normalised embeddings and task heads."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.zeroshot import build_head, encode_text_with_grad, trims_exactly


class TunedClassifier(nn.Module):
    """A task classifier of normalised image features that is not one linear head (a cache
    model: Tip-Adapter's logits are not linear in f), with *post-hoc settings*: values that
    need no training (Tip-Adapter's α, β; Tip-Adapter-F's epoch), chosen after training on
    the selection protocol's validation split, never a test split, as WiSE-FT's α is
    (`pipeline.evaluation.selection.search_posthoc`, called by the finetune stage for every
    validation split; the `none` protocol keeps `setting` as built: the method's defaults).

    Subclasses set `search`, the grid in stages: each stage a {name: values} whose product is
    searched (the first name outermost) with the earlier stages' choices fixed (Tip-Adapter-F:
    the epoch first, then β × α, as its official code); and `forward(features) -> logits`
    [N, C] at `self.setting`. Post-hoc settings change the logits only, never the image
    features (the search encodes each split once)."""

    search: tuple[dict[str, tuple], ...] = ()

    def __init__(self, setting: dict[str, Any]):
        super().__init__()
        self.setting = dict(setting)

    def at(self, **setting) -> "TunedClassifier":
        """This classifier at other post-hoc values (the tensors are shared, not copied)."""
        unknown = sorted(set(setting) - set(self.setting))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown post-hoc setting(s) {unknown}; "
                             f"allowed: {sorted(self.setting)}")
        out = copy.copy(self)
        out.setting = {**self.setting, **setting}
        return out

    def grid(self, stage: int) -> Iterator[dict[str, Any]]:
        """The settings of one stage of `search`, in search order (the first name outermost)."""
        names = list(self.search[stage])
        for values in itertools.product(*(self.search[stage][n] for n in names)):
            yield dict(zip(names, values))


class EvalModel(nn.Module):
    """What evaluation needs from any method: normalised image and text embeddings, and the
    task head (rows carry the logit scale). `head=None` means the zero-shot head of this
    model's own text tower. `classifier`: a `TunedClassifier` that replaces the linear head
    (features -> logits); `task_head` then returns it."""

    has_text = True  # (a vision-only model's `VisionEvalModel` has none)

    def __init__(self, model: nn.Module, head: torch.Tensor | None = None,
                 image_transform: nn.Module | None = None, classifier: TunedClassifier | None = None):
        super().__init__()
        self.model = model
        self.image_transform = image_transform
        self.classifier = classifier
        self.register_buffer("head", head, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        f = self.model.encode_image(images)
        if self.image_transform is not None:
            f = self.image_transform(f)
        return F.normalize(f.float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings; the padding after the longest prompt is cut off where
        that is provably exact (`zeroshot.trims_exactly`: open_clip's causal, argmax-pooled
        tower), which makes a head of 1,139 RxRx1 classes ~4x cheaper at 77 tokens."""
        if trims_exactly(self.model):
            return F.normalize(encode_text_with_grad(self.model, tokens).float(), dim=-1)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def task_head(self, class_tokens: torch.Tensor) -> torch.Tensor | TunedClassifier:
        """The head [C, D] (logits features·headᵀ), or the `classifier` where one is set."""
        if self.classifier is not None:
            return self.classifier
        if self.head is not None:
            return self.head.float()
        return self.scale * build_head(self.encode_text, class_tokens.to(self.scale.device))

    def zeroshot_head(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """Head for a task this model was not fine-tuned on (zero-shot retention)."""
        return self.scale * build_head(self.encode_text, class_tokens.to(self.scale.device))
