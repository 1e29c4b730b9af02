"""One place that builds CLIP models: open_clip `arch` + `pretrained`, loaded from a local file.

`model.pretrained` in params.yaml is one of
- `builtin`: the project's tiny CLIP, pre-trained by the `pretrained` stage on the caption corpus;
- an open_clip pretrained tag (e.g. `openai`), fetched once by the `pretrained` stage;
- a path to a local `.safetensors` / `.pt` / `.bin` state dict.
Every stage after `pretrained` loads weights only from that stage's local file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.hashing import file_sha256

BUILTIN = "builtin"
CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_builtin_configs() -> None:
    """Make the architectures shipped in `pipeline/models/configs/` known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def known_archs() -> list[str]:
    register_builtin_configs()
    return open_clip.list_models()


def check_arch(arch: str) -> None:
    if arch not in known_archs():
        raise ValueError(
            f"model.arch: unknown architecture {arch!r}. Allowed: any open_clip config "
            f"(`python -c 'import open_clip; print(open_clip.list_models())'`) or one shipped in "
            f"{CONFIG_DIR} (e.g. 'tiny-clip')."
        )


@dataclass
class Clip:
    """A CLIP model with the transforms and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    arch: str

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


def create(arch: str, weights: Path | None = None, device: str | torch.device = "cpu") -> Clip:
    """Build `arch` with open_clip and load `weights` (a local state-dict file) if given."""
    register_builtin_configs()
    check_arch(arch)
    # open_clip logs a warning for every model built without weights: we load our own
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=None, device=device
        )
    finally:
        logger.setLevel(level)
    if weights is not None:
        _load_checked(model, load_state_dict(Path(weights)), str(weights), arch)
    model.eval()
    return Clip(model, pre_train, pre_val, open_clip.get_tokenizer(arch), arch)


def _load_checked(model: torch.nn.Module, state: dict, origin: str, arch: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"model.pretrained: {origin} does not fit architecture {arch!r} "
                         f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})") from err
    # open_clip configs may carry buffers (attn masks, position ids) not stored in files.
    real_missing = [k for k in missing if not k.endswith(("attn_mask", "position_ids"))]
    if real_missing or unexpected:
        raise ValueError(f"model.pretrained: {origin} does not fit architecture {arch!r} "
                         f"(missing {real_missing[:5]}, unexpected {list(unexpected)[:5]})")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    # DDP / torch.compile prefixes
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def save_state_dict(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None) -> str:
    """Write a safetensors file atomically and return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # one metadata key: safetensors writes a multi-key header in hash order, which would
    # make the file (and its sha256) differ between identical runs
    header = {"meta": json.dumps(meta or {}, sort_keys=True, default=str)}
    save_file(contiguous, str(tmp), metadata=header)
    os.replace(tmp, path)
    return file_sha256(path)


def fetch_pretrained(arch: str, pretrained: str, out: Path) -> dict[str, Any]:
    """Copy the pre-trained weights (tag or local file) into `out` as safetensors.

    Tags go through open_clip's own download; offline, the hub is told so (`HF_HUB_OFFLINE`
    is set unless the user set it) and the failure is turned into a sentence saying how to
    provide the weights as a file instead.
    """
    source = _weights_source(arch, pretrained)
    if source is not None:
        state = read_weights(source)
        origin = str(source)
    else:
        if not _hub_reachable():
            _set_hub_offline()  # fail at once instead of retrying for ~46 s
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, device="cpu")
        except Exception as err:  # hub errors come in many types
            raise RuntimeError(
                f"model.pretrained: could not download {arch}/{pretrained} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). On a machine without internet, "
                f"download the weights elsewhere (e.g. `open_clip.create_model('{arch}', "
                f"pretrained='{pretrained}')` then save `model.state_dict()` with "
                f"safetensors) and set model.pretrained to the file path."
            ) from err
        state = model.state_dict()
        origin = f"open_clip:{arch}/{pretrained}"
    # Validate the weights fit before declaring success.
    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    _load_checked(model, state, origin, arch)
    digest = save_state_dict(model.state_dict(), out, meta={"arch": arch, "origin": origin})
    return {"arch": arch, "origin": origin, "sha256": digest}


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _weights_source(arch: str, pretrained: str) -> Path | None:
    """The local file `model.pretrained` names, or None for a valid open_clip tag of `arch`
    (ValueError naming the key otherwise)."""
    register_builtin_configs()
    check_arch(arch)
    source = Path(pretrained).expanduser()
    if source.is_file():
        return source
    if source.suffix in WEIGHT_SUFFIXES or "/" in pretrained:
        raise ValueError(f"model.pretrained: {pretrained}: weights file not found")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ValueError(
            f"model.pretrained: {pretrained!r} is neither a file nor an open_clip tag for "
            f"{arch!r}. Allowed: {BUILTIN!r}, a path to a .safetensors/.pt file, or one of "
            f"{tags or '(no tags for this arch)'}."
        )
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's state dict, or ValueError naming the file (truncated, garbage, not a
    state dict) instead of the reader's own traceback."""
    try:
        state = load_state_dict(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors, pickle and zip readers raise many types
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"model.pretrained: {path} is not a readable weights file ({type(err).__name__}: "
                         f"{first}); use a .safetensors or torch .pt/.bin state dict") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained: {path} holds no state dict of tensors")
    return state


def check_weights(arch: str, pretrained: str) -> None:
    """What the `check` stage verifies before any work: `model.pretrained` is `builtin`, a
    known open_clip tag of `arch` (fetched later), or a readable file whose tensors fit `arch`."""
    if pretrained == BUILTIN:
        check_arch(arch)
        return
    source = _weights_source(arch, pretrained)
    if source is not None:
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # open_clip warns of a model built without weights
        try:
            model = open_clip.create_model(arch, pretrained=None, device="cpu")
        finally:
            logger.setLevel(level)
        _load_checked(model, read_weights(source), str(source), arch)


def _set_hub_offline() -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: set the variable and its copy."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
