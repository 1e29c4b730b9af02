"""One place that builds CLIP models: open_clip `arch` + `pretrained`, loaded from a local file.

`model.pretrained` in params.yaml is one of
- `builtin`: the project's tiny CLIP, pre-trained by the `pretrained` stage on the caption corpus;
- an open_clip pretrained tag (e.g. `openai`), fetched once by the `pretrained` stage;
- a path to a local `.safetensors` / `.pt` / `.bin` state dict.
Every stage after `pretrained` loads weights only from that stage's local file.

Model families: every open_clip config builds here, CLIP, SigLIP (`init_logit_bias`: a
learned `logit_bias` and the sigmoid loss), CoCa (`multimodal_cfg`: a captioning decoder beside
the contrastive towers) and EVA-02 (a timm EVA image tower). Besides `tiny-clip`, the configs in
`configs/` ship one tiny member of each other family, each the real open_clip config
(`ViT-B-16-SigLIP`, `coca_ViT-B-32`, `EVA02-B-16`) with only its sizes shrunk (widths, depths,
heads, image and context size; tests/test_families.py checks that nothing else differs):
`tiny-siglip`, `tiny-coca`, `tiny-eva02`. A timm image tower cannot be shrunk through the
open_clip config (open_clip passes timm only the model name), so the shrunk timm towers are
registered with timm under their own names (`TIMM_TOWERS`): timm's own entry point of the real
tower with smaller sizes. One departure: `tiny-siglip` tokenises with open_clip's BPE tokenizer
(vocab 49,408) instead of SigLIP's Hugging Face SentencePiece tokenizer, which needs the
`transformers` package and a download; so it runs offline like `tiny-clip`.

`model.tokenizer` (optional): a saved Hugging Face tokenizer folder (`save_pretrained`), for
archs whose open_clip config names a Hugging Face tokenizer (`hf_tokenizer_name`: SigLIP's)
on a machine that cannot download it; `load_tokenizer` says how to make one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from safetensors.torch import load_file, save_file

from pipeline.core.hashing import file_sha256

BUILTIN = "builtin"
CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False

# The shrunk timm image towers the shipped configs name (`vision_cfg.timm_model_name`): timm's
# entry point of the real tower (the one the real open_clip config names) with these sizes.
# Everything else (EVA-02's SwiGLU MLP, rotary embeddings and sub-LayerNorm; SigLIP's
# attention-pool head and missing class token) comes from timm's own definition. The image
# size matches the config's `image_size`; EVA's rotary reference grid is the patch grid
# (`ref_feat_shape` = image size / patch size), as in the real tower (224 / 14 = 16).
TIMM_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_eva02_clip": ("eva02_base_patch16_clip_224",
                        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, ref_feat_shape=(4, 4))),
    "tiny_vit_siglip": ("vit_base_patch16_siglip_224",
                        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)),
}


def _register_timm_tower(name: str, base: str, sizes: dict[str, Any]) -> None:
    import timm
    from timm.models import model_entrypoint, register_model

    real = model_entrypoint(base)

    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: a shrunk test tower has no pretrained weights")
        return real(pretrained=False, **{**sizes, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"timm's {base} with {sizes} (pipeline.models.TIMM_TOWERS)"
    if name not in timm.list_models(name):
        register_model(entry)


def register_builtin_configs() -> None:
    """Make the architectures shipped in `pipeline/models/configs/` known to open_clip (and
    their shrunk timm towers known to timm)."""
    global _registered
    if not _registered:
        for name, (base, sizes) in TIMM_TOWERS.items():
            _register_timm_tower(name, base, sizes)
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
    """A CLIP model with the transforms and tokenizer that belong to it. The tokenizer is
    loaded on first use (`load_tokenizer(arch, tokenizer_source)`), so a stage that needs only
    the transforms (the image cache) never needs a hub tokenizer."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    arch: str
    tokenizer_source: str | None = None  # params `model.tokenizer`

    @functools.cached_property
    def tokenizer(self) -> Callable:
        return load_tokenizer(self.arch, self.tokenizer_source)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)


def create(arch: str, weights: Path | None = None, device: str | torch.device = "cpu",
           tokenizer: str | None = None, pretrained: str | None = None) -> Clip:
    """Build `arch` with open_clip and load `weights` (a local state-dict file) if given.

    `tokenizer`: params `model.tokenizer` (`load_tokenizer`, on first use of `Clip.tokenizer`).
    `pretrained`: params `model.pretrained`; where it is an open_clip tag of `arch`, the image
    transforms are the tag's (mean, std, interpolation, resize mode: SigLIP's webli weights
    expect mean 0.5 and a squashing resize, not the OpenAI defaults an untagged build gets),
    as `open_clip.create_model_and_transforms(arch, pretrained=tag)` would give them."""
    register_builtin_configs()
    check_arch(arch)
    # open_clip logs a warning for every model built without weights: we load our own
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=None, device=device, **_tag_transform(arch, pretrained)
        )
    finally:
        logger.setLevel(level)
    if weights is not None:
        _load_checked(model, load_state_dict(Path(weights)), str(weights), arch)
    model.eval()
    return Clip(model, pre_train, pre_val, arch, tokenizer)


def _tag_transform(arch: str, pretrained: str | None) -> dict[str, Any]:
    """`create_model_and_transforms` keywords for the image transform of an open_clip tag."""
    if not pretrained or pretrained == BUILTIN or pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        return {}
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    keys = {"image_mean": "mean", "image_std": "std", "image_interpolation": "interpolation",
            "image_resize_mode": "resize_mode"}
    return {k: cfg[v] for k, v in keys.items() if cfg.get(v) is not None}


def load_tokenizer(arch: str, tokenizer: str | None = None) -> Callable:
    """The tokenizer of `arch`, or ValueError naming `model.tokenizer` with how to provide it.

    - `tokenizer` given: a saved Hugging Face tokenizer folder (a file in it stands for the
      folder), loaded by open_clip's `HFTokenizer` with the config's context length, mode
      and `tokenizer_kwargs`, exactly as open_clip loads the hub one (needs `transformers`);
      its vocabulary must fit the config's `vocab_size`;
    - none, and the config names no Hugging Face tokenizer: open_clip's BPE tokenizer
      (`SimpleTokenizer`) with the config's context length and `tokenizer_kwargs`, which is
      what `open_clip.get_tokenizer` gives such configs, except that it never guesses a SigLIP
      tokenizer from a name containing "siglip" (its fallback for configs without
      `hf_tokenizer_name`; every SigLIP config it ships names one, `tiny-siglip` deliberately
      none);
    - none, and the config names one (`hf_tokenizer_name`): `open_clip.get_tokenizer(arch)`
      (a download; the hub is told it is offline when it cannot be reached, so it fails at
      once), its failure turned into the sentence that says how to save the tokenizer.
    """
    register_builtin_configs()
    check_arch(arch)
    text_cfg = open_clip.get_model_config(arch).get("text_cfg", {})
    context = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    hub_name = text_cfg.get("hf_tokenizer_name", "")
    if tokenizer is not None:
        return _local_hf_tokenizer(Path(tokenizer).expanduser(), text_cfg, context, kwargs)
    if not hub_name:
        return open_clip.SimpleTokenizer(context_length=context, **kwargs)
    if not _hub_reachable():
        _set_hub_offline()
    try:
        return open_clip.get_tokenizer(arch)
    except Exception as err:  # ImportError (no transformers), hub and file errors
        raise ValueError(
            f"model.tokenizer: {arch!r} tokenises with the Hugging Face tokenizer {hub_name!r}, which could not "
            f"be loaded ({type(err).__name__}: {_first_line(err)}). Provide it as a local folder: on a machine "
            f"with internet, `pip install transformers` and run `import open_clip; "
            f"open_clip.get_tokenizer('{arch}').save_pretrained('tokenizer-folder')`, copy the folder here "
            f"(with `transformers` installed) and set model.tokenizer to its path."
        ) from err


def _local_hf_tokenizer(path: Path, text_cfg: dict, context: int, kwargs: dict) -> Callable:
    if not path.exists():
        raise ValueError(f"model.tokenizer: {path}: not found. Allowed: null (the arch's own tokenizer) or a "
                         f"folder written by a Hugging Face tokenizer's `save_pretrained`")
    folder = path.parent if path.is_file() else path
    try:
        tok = HFTokenizer(str(folder), context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                          **kwargs)
    except ImportError as err:
        raise ValueError(f"model.tokenizer: {path}: a Hugging Face tokenizer needs the `transformers` package "
                         f"(`pip install transformers`)") from err
    except Exception as err:  # transformers raises OSError, ValueError, ... for a bad folder
        raise ValueError(f"model.tokenizer: {path} is not a saved Hugging Face tokenizer ({type(err).__name__}: "
                         f"{_first_line(err)}); write one with `tokenizer.save_pretrained(folder)`") from err
    vocab = text_cfg.get("vocab_size")
    if vocab is not None and len(tok.tokenizer) > vocab:
        raise ValueError(f"model.tokenizer: {path} has {len(tok.tokenizer)} tokens, more than the "
                         f"{vocab} of the arch's text tower (text_cfg.vocab_size): use the arch's own tokenizer")
    return tok


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else ""


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
        if not tags:
            raise ValueError(
                f"model.pretrained: {pretrained!r} is neither a file nor an open_clip tag: open_clip has no "
                f"pretrained weights for {arch!r}. Allowed: {BUILTIN!r} (pre-trained here) or a path to a "
                ".safetensors/.pt file of this architecture")
        raise ValueError(
            f"model.pretrained: {pretrained!r} is neither a file nor an open_clip tag for "
            f"{arch!r}. Allowed: {BUILTIN!r}, a path to a .safetensors/.pt file, or one of "
            f"{', '.join(tags)}."
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
