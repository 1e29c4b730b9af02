"""The built-in synthetic WILDS-style dataset and its captioned pre-training corpus.

Procedurally drawn objects: the class is the object's **shape**; each object also has a
**colour**, a **size** and a **texture** (its fill pattern), and sits on a **background** that
plays the role of a camera location in iWildCam (the domain). Training and the ID splits
(train / id_val / id_test) use the ID backgrounds; the OOD splits (val / test) use backgrounds
never seen in the labelled data. What makes OOD hard, as in the real WILDS shifts:

- the OOD backgrounds are new scenes, and two of them change the object itself (a dim,
  desaturated "night" like infrared camera-trap frames; a warm colour cast at "dusk"), and
  the others are busier (more clutter, strong edges);
- in ID data each shape prefers one colour (``spurious``: the probability that the colour is
  the shape's preferred one rather than uniform) — a shortcut a fine-tuned model can pick up
  and that does not hold OOD, where colours are uniform.

Images are drawn with numpy at ``supersample`` × the image size and box-filtered down
(anti-aliasing), so the generator has no dependency beyond numpy and PIL. Every image has
its own random stream derived from ``(seed, stream, index)``, so the output is byte-identical
for a seed regardless of order or machine.

The caption corpus (``generate_corpus``) uses the same renderer: a ``corpus_studio`` share of
its images show the object alone on a plain studio backdrop (like product photos on the web),
the rest sit on *all* backgrounds, ID and OOD, with every attribute combination equally often.
Captions name the shape and, each with its ``caption_rates`` probability, the colour, size,
texture and background. It is the pre-training data of the built-in tiny CLIP and DiVE's
reference set. Why the studio share: a tiny ViT trained from scratch on scene images only
learns colour in a few hundred steps but barely shapes (zero-shot 0.2 after 1000 steps, 8
shapes); with 70 % studio images it reaches about 0.4 in 700 steps.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import pipeline  # noqa: F401  (installs the `outdated` stub before wilds is imported)
from wilds.common.grouper import CombinatorialGrouper
from wilds.common.metrics.all_metrics import F1, Accuracy
from wilds.datasets.wilds_dataset import WILDSDataset

try:  # wilds' group-wise eval imports torch_scatter; a pure-torch stand-in when it is absent
    from pipeline.data.scatter import install_scatter_fallback
except ImportError:  # pragma: no cover - the module ships with the package
    install_scatter_fallback = None
else:
    install_scatter_fallback()

__all__ = [
    "VERSION",
    "FOLDER",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "TEXTURES",
    "BACKGROUNDS",
    "STUDIO",
    "SyntheticConfig",
    "generate_dataset",
    "generate_corpus",
    "SyntheticDataset",
]

VERSION = "1.0"
FOLDER = f"synthetic_v{VERSION}"
SPLITS = ("train", "id_val", "id_test", "val", "test")
ID_SPLITS = ("train", "id_val", "id_test")

# The vocabulary is fixed (it is what pipeline/data/prompts/synthetic.json names); the
# config chooses sizes of the splits, which backgrounds are ID / OOD, and the difficulty.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")
COLOURS = {  # RGB in [0, 1]; no name starts with a vowel, so "a {c} object" reads right
    "red": (0.86, 0.14, 0.14),
    "green": (0.14, 0.66, 0.22),
    "blue": (0.16, 0.30, 0.86),
    "yellow": (0.93, 0.82, 0.14),
    "purple": (0.55, 0.22, 0.74),
    "pink": (0.97, 0.52, 0.76),
}
SIZES = {"small": (0.21, 0.25), "large": (0.31, 0.36)}  # object radius / image side
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("grass", "sand", "water", "snow", "brick", "forest", "night", "rock", "dusk", "tile")
STUDIO = "studio"  # the plain backdrop of part of the corpus (never a task domain)

_STREAM = {"train": 1, "id_val": 2, "id_test": 3, "val": 4, "test": 5, "corpus": 6}


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generator draws. Defaults: ~8k task images and 20k corpus images at 32 px."""

    seed: int = 0
    image_size: int = 32
    n_train: int = 4000
    n_id_val: int = 800
    n_id_test: int = 1000
    n_val: int = 1000
    n_test: int = 1500
    n_corpus: int = 20000
    corpus_studio: float = 0.7  # share of corpus images on a plain studio backdrop (the rest: every background)
    # how often a corpus caption names the shape, colour, size, texture and background
    caption_rates: tuple[float, float, float, float, float] = (1.0, 0.5, 0.3, 0.3, 0.3)
    id_domains: tuple[str, ...] = ("grass", "sand", "water", "snow", "brick", "forest")
    ood_domains: tuple[str, ...] = ("night", "rock", "dusk", "tile")
    spurious: float = 0.5  # ID only: P(colour is the shape's preferred colour), else uniform
    noise: float = 0.03  # std of pixel noise on ID backgrounds (image in [0, 1])
    ood_noise: float = 0.06  # std of pixel noise on OOD backgrounds
    clutter: int = 2  # distractor marks per ID image (OOD backgrounds get twice as many)
    rotation: float = 20.0  # objects are turned by up to ± this many degrees
    jitter: float = 0.1  # the object's centre is up to ± this fraction of the side from the middle
    texture_contrast: float = 0.4  # how much darker the pattern of a textured object is (0: invisible)
    supersample: int = 2  # drawn at this multiple of image_size, then box-filtered down

    def __post_init__(self) -> None:
        for name in ("n_train", "n_id_val", "n_id_test", "n_val", "n_test", "n_corpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; it must be at least 1.")
        if not 8 <= self.image_size <= 512:
            raise ValueError(f"image_size: {self.image_size!r} is not allowed; use 8 to 512 pixels.")
        for name in ("id_domains", "ood_domains"):
            domains = getattr(self, name)
            if not domains:
                raise ValueError(f"{name}: at least one background is needed.")
            unknown = [d for d in domains if d not in BACKGROUNDS]
            if unknown:
                raise ValueError(f"{name}: {unknown[0]!r} is not a known background; allowed: {', '.join(BACKGROUNDS)}.")
        both = self.id_domains + self.ood_domains
        if len(set(both)) != len(both):
            raise ValueError("id_domains and ood_domains: a background may appear only once, in one of the two lists.")
        if not 0.0 <= self.corpus_studio <= 1.0:
            raise ValueError(f"corpus_studio: {self.corpus_studio!r} is not allowed; it is a share in [0, 1].")
        if len(self.caption_rates) != 5 or not all(0.0 <= float(r) <= 1.0 for r in self.caption_rates):
            raise ValueError(f"caption_rates: {self.caption_rates!r} is not allowed; give 5 probabilities in [0, 1] "
                             "(shape, colour, size, texture, background).")
        if not 0.0 <= self.spurious <= 1.0:
            raise ValueError(f"spurious: {self.spurious!r} is not allowed; it is a probability in [0, 1].")
        for name in ("noise", "ood_noise"):
            if not 0.0 <= getattr(self, name) <= 0.5:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; use 0 to 0.5.")
        if not 0 <= self.clutter <= 50:
            raise ValueError(f"clutter: {self.clutter!r} is not allowed; use 0 to 50 marks.")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation: {self.rotation!r} is not allowed; use 0 to 180 degrees.")
        if not 0.0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter: {self.jitter!r} is not allowed; use 0 to 0.5 (of the image side).")
        if not 0.0 <= self.texture_contrast <= 1.0:
            raise ValueError(f"texture_contrast: {self.texture_contrast!r} is not allowed; use 0 to 1.")
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"supersample: {self.supersample!r} is not allowed; use 1 to 4.")

    @classmethod
    def small(cls, seed: int = 0) -> "SyntheticConfig":
        """A few hundred task images and 3k corpus images: for tests."""
        return cls(seed=seed, n_train=400, n_id_val=100, n_id_test=200, n_val=100, n_test=200, n_corpus=3000)

    @classmethod
    def quick(cls, seed: int = 0) -> "SyntheticConfig":
        """`small()` made easy enough that the tiny CLIP learns shapes in about a minute.

        One plain ID background (snow) and one OOD background (sand), no clutter, and captions
        that name the shape but rarely anything else: for tests of zero-shot learnability.
        """
        return replace(cls.small(seed), id_domains=("snow",), ood_domains=("sand",), clutter=0,
                                   caption_rates=(1.0, 0.1, 0.1, 0.1, 0.1))

    @property
    def domains(self) -> tuple[str, ...]:
        """Domain names in metadata order: ID backgrounds first, then OOD."""
        return self.id_domains + self.ood_domains

    @property
    def corpus_backgrounds(self) -> tuple[str, ...]:
        """Backgrounds of corpus items (their `domain` indexes this): the domains, then the studio."""
        return self.domains + (STUDIO,)

    def split_size(self, split: str) -> int:
        return getattr(self, f"n_{split}")


# ---------------------------------------------------------------------------------------------
# drawing


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] (x to the right, y downwards)."""
    if n not in _GRIDS:
        c = ((np.arange(n) + 0.5) / n).astype(np.float32)
        _GRIDS[n] = np.meshgrid(c, c)
    return _GRIDS[n]


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Low-frequency value noise in [0, 1]: a random (cells+1)² lattice, bilinearly upsampled."""
    lattice = rng.random((cells + 1, cells + 1))
    t = (np.arange(n) + 0.5) / n * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)  # smoothstep: no visible lattice creases
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _ellipses(rng, img, X, Y, count, r_range, colour_fn) -> None:
    """Paint `count` random filled ellipses (clutter) into img, each only within its bounding box."""
    n = img.shape[0]
    for _ in range(count):
        cx, cy = rng.random(2)
        rx, ry = rng.uniform(*r_range, size=2)
        a = rng.uniform(0, np.pi)
        colour = colour_fn(rng)
        reach = max(rx, ry)
        x0, x1 = max(int((cx - reach) * n), 0), min(int((cx + reach) * n) + 1, n)
        y0, y1 = max(int((cy - reach) * n), 0), min(int((cy + reach) * n) + 1, n)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = X[y0:y1, x0:x1] - cx, Y[y0:y1, x0:x1] - cy
        u = dx * np.cos(a) + dy * np.sin(a)
        v = -dx * np.sin(a) + dy * np.cos(a)
        img[y0:y1, x0:x1][(u / rx) ** 2 + (v / ry) ** 2 <= 1.0] = colour


def _background(name: str, rng: np.random.Generator, n: int, clutter: int) -> np.ndarray:
    """One background ('camera location'), float RGB in [0, 1], shape (n, n, 3)."""
    X, Y = _grid(n)
    img = np.empty((n, n, 3))
    jitter = rng.normal(0, 0.03, size=3)  # the same place on a different day

    def fill(base, field, amp):
        img[:] = np.clip(np.asarray(base) + jitter + amp * (field[..., None] - 0.5), 0, 1)

    def shade(base, spread):
        return lambda r: np.clip(np.asarray(base) * r.uniform(1 - spread, 1 + spread), 0, 1)

    if name == STUDIO:  # a plain, light backdrop with a soft vertical gradient; nothing else
        tint = rng.uniform(0.78, 0.95) + rng.normal(0, 0.025, size=3)
        img[:] = np.clip(tint + (0.06 * (0.5 - Y))[..., None], 0, 1)
        return img
    if name == "grass":
        fill((0.30, 0.52, 0.20), _smooth_noise(rng, n, 5), 0.25)
        marks = shade((0.22, 0.45, 0.14), 0.35)
    elif name == "sand":
        a, f = rng.uniform(0, np.pi), rng.uniform(3, 6)
        ripple = 0.5 + 0.5 * np.sin(2 * np.pi * f * (X * np.cos(a) + Y * np.sin(a)) + rng.uniform(0, 6.3))
        fill((0.82, 0.73, 0.53), 0.6 * ripple + 0.4 * _smooth_noise(rng, n, 4), 0.14)
        marks = shade((0.70, 0.60, 0.45), 0.2)
    elif name == "water":
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (7 * Y + 0.4 * np.sin(2 * np.pi * 2 * X)) + rng.uniform(0, 6.3))
        top, bottom = np.array([0.14, 0.34, 0.58]), np.array([0.26, 0.56, 0.74])
        img[:] = top + (bottom - top) * Y[..., None] + jitter + 0.10 * (wave[..., None] - 0.5)
        marks = shade((0.60, 0.78, 0.90), 0.1)
    elif name == "snow":
        fill((0.88, 0.90, 0.94), _smooth_noise(rng, n, 3), 0.14)
        marks = shade((0.97, 0.98, 1.0), 0.03)
    elif name == "brick":
        rows = 6
        r = np.floor(Y * rows + rng.uniform(0, 1)).astype(int)
        offset = (r % 2) * 0.5 / 3 + rng.uniform(0, 1)
        c = np.floor(X * 3 + offset).astype(int)
        tone = rng.uniform(0.8, 1.15, size=(rows + 2, 6))[r % (rows + 2), c % 6]
        img[:] = np.array([0.62, 0.28, 0.20]) * tone[..., None] + jitter
        mortar = (np.abs(((Y * rows + 0.5) % 1) - 0.5) < 0.09) | (np.abs(((X * 3 + offset) % 1) - 0.5) > 0.46)
        img[mortar] = np.array([0.78, 0.75, 0.70])
        marks = shade((0.45, 0.22, 0.16), 0.2)
    elif name == "forest":
        fill((0.12, 0.28, 0.12), _smooth_noise(rng, n, 6), 0.20)
        for _ in range(rng.integers(3, 6)):
            x0, w = rng.uniform(0, 1), rng.uniform(0.04, 0.10)
            img[np.abs(X - x0) < w / 2] = np.array([0.33, 0.22, 0.12]) * rng.uniform(0.7, 1.2)
        marks = shade((0.20, 0.40, 0.15), 0.3)
    elif name == "night":
        fill((0.12, 0.13, 0.16), _smooth_noise(rng, n, 4), 0.12)
        marks = shade((0.25, 0.25, 0.25), 0.5)
    elif name == "rock":
        fill((0.48, 0.46, 0.44), _smooth_noise(rng, n, 6), 0.20)
        _ellipses(rng, img, X, Y, 10, (0.04, 0.14), lambda r: np.full(3, r.uniform(0.25, 0.70)))
        marks = lambda r: np.full(3, r.uniform(0.2, 0.8))  # noqa: E731
    elif name == "dusk":
        top, bottom = np.array([0.95, 0.58, 0.32]), np.array([0.40, 0.22, 0.42])
        horizon = rng.uniform(0.5, 0.8)
        img[:] = np.where((Y < horizon)[..., None], top + (bottom - top) * (Y / horizon)[..., None], np.array([0.18, 0.12, 0.16]))
        img += jitter
        marks = shade((0.20, 0.12, 0.18), 0.3)
    elif name == "tile":
        cell, a = rng.uniform(0.16, 0.28), rng.uniform(-0.3, 0.3)
        u, v = X * np.cos(a) + Y * np.sin(a), -X * np.sin(a) + Y * np.cos(a)
        c1, c2 = rng.uniform(0.55, 0.95, size=(2, 3))
        checker = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(bool)
        img[:] = np.where(checker[..., None], c1, c2)
        grout = (np.abs((u / cell) % 1 - 0.5) > 0.44) | (np.abs((v / cell) % 1 - 0.5) > 0.44)
        img[grout] = 0.25
        marks = lambda r: r.uniform(0.3, 1.0, size=3)  # noqa: E731
    else:  # pragma: no cover - names are validated by SyntheticConfig
        raise ValueError(f"unknown background {name!r}")
    _ellipses(rng, img, X, Y, clutter, (0.015, 0.05), marks)
    return img


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object coordinates, where the object spans about [-1, 1]²."""
    if shape == "circle":
        return u * u + v * v <= 0.85**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.74
    if shape == "triangle":  # equilateral, circumradius 1, apothem 0.5
        angles = -np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3 + np.pi
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) <= 0.5
    if shape == "star":  # five points, inner radius 0.42
        rho, theta = np.hypot(u, v), np.arctan2(v, u) + np.pi / 2
        frac = (theta * 5 / (2 * np.pi)) % 1.0
        return rho <= 0.42 + 0.58 * np.abs(2 * frac - 1)
    if shape == "cross":
        return ((np.abs(u) <= 0.30) & (np.abs(v) <= 0.92)) | ((np.abs(v) <= 0.30) & (np.abs(u) <= 0.92))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.92**2) & (r2 >= 0.50**2)
    if shape == "crescent":
        return (u * u + v * v <= 0.90**2) & ((u - 0.45) ** 2 + v * v >= 0.72**2)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.12
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")  # pragma: no cover


def _texture(texture: str, u_px: np.ndarray, v_px: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """1 where the object shows its colour, 0 where it shows the pattern's dark tone.

    Coordinates are in output pixels along the object's own axes, so patterns rotate with the
    object and keep a fixed, visible period at any object size.
    """
    if texture == "solid":
        return np.ones_like(u_px)
    if texture == "striped":
        return (np.floor((u_px + phase[0]) / 2.0) % 2 == 0).astype(float)
    if texture == "dotted":
        p = 4.5
        du, dv = (u_px + phase[0]) % p - p / 2, (v_px + phase[1]) % p - p / 2
        return (du * du + dv * dv > 1.25**2).astype(float)
    if texture == "checkered":
        return ((np.floor((u_px + phase[0]) / 2.5) + np.floor((v_px + phase[1]) / 2.5)) % 2 == 0).astype(float)
    raise ValueError(f"unknown texture {texture!r}")  # pragma: no cover


def _post(name: str, img: np.ndarray) -> np.ndarray:
    """Scene-wide effects that also change the object (lighting)."""
    if name == "night":  # dim, mostly grey, like infrared camera-trap frames
        grey = img.mean(axis=-1, keepdims=True)
        img = 0.7 * (0.35 * img + 0.65 * grey) + 0.03
    elif name == "dusk":  # warm cast
        img = img * np.array([1.10, 0.88, 0.72])
    return img


@dataclass(frozen=True)
class _Item:
    shape: int
    colour: int
    size: int
    texture: int
    domain: int  # index into cfg.domains


def _render(item: _Item, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Draw one image; uint8 array (image_size, image_size, 3)."""
    ss, size = cfg.supersample, cfg.image_size
    n = size * ss
    domain = cfg.corpus_backgrounds[item.domain]
    ood = domain in cfg.ood_domains
    img = _background(domain, rng, n, cfg.clutter * (2 if ood else 1))

    X, Y = _grid(n)
    radius = rng.uniform(*SIZES[tuple(SIZES)[item.size]])
    reach = min(cfg.jitter, 0.5 - 0.9 * radius)  # keep the object (nearly) inside the frame
    cx, cy = 0.5 + rng.uniform(-reach, reach, size=2)
    angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation))
    stretch = rng.uniform(0.88, 1.12)
    ca, sa = np.cos(angle), np.sin(angle)
    u_img = (X - cx) * ca + (Y - cy) * sa
    v_img = -(X - cx) * sa + (Y - cy) * ca
    mask = _shape_mask(SHAPES[item.shape], u_img / (radius * stretch), v_img / (radius / stretch))

    base = np.asarray(COLOURS[tuple(COLOURS)[item.colour]])
    colour = np.clip(base * rng.uniform(0.85, 1.08) + rng.normal(0, 0.035, size=3), 0, 1)
    pattern = _texture(TEXTURES[item.texture], u_img * size, v_img * size, rng.uniform(0, 5, size=2))
    fill = colour * (1 - cfg.texture_contrast * (1 - pattern[..., None]))
    img = np.where(mask[..., None], fill, img)

    img = _post(domain, img)
    img = img * rng.uniform(0.85, 1.12)  # exposure
    if ss > 1:  # box filter: the mean of each ss × ss block
        img = sum(img[i::ss, j::ss] for i in range(ss) for j in range(ss)) / (ss * ss)
    img = img + rng.normal(0, cfg.ood_noise if ood else cfg.noise, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _rng(cfg: SyntheticConfig, stream: str, *index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _STREAM[stream], *index])


def _split_items(cfg: SyntheticConfig, split: str) -> list[_Item]:
    """Attributes of every image of a split (the label distribution of that split)."""
    n = cfg.split_size(split)
    rng = _rng(cfg, split, 0)
    n_colours = len(COLOURS)
    ood = split not in ID_SPLITS
    domains = np.arange(len(cfg.id_domains), len(cfg.domains)) if ood else np.arange(len(cfg.id_domains))
    shape = rng.integers(0, len(SHAPES), n)
    colour = rng.integers(0, n_colours, n)
    if not ood:  # the shortcut: each shape prefers one colour in the ID backgrounds
        preferred = shape % n_colours
        colour = np.where(rng.random(n) < cfg.spurious, preferred, colour)
    size = rng.integers(0, len(SIZES), n)
    texture = rng.integers(0, len(TEXTURES), n)
    domain = rng.choice(domains, n)
    return [_Item(*map(int, row)) for row in zip(shape, colour, size, texture, domain)]


def _balanced(rng: np.random.Generator, n: int, sizes: tuple[int, ...]) -> np.ndarray:
    """n rows of indices into `sizes`: every combination equally often (shuffled per cycle)."""
    grids = np.meshgrid(*(np.arange(k) for k in sizes), indexing="ij")
    combos = np.stack([g.ravel() for g in grids], axis=1)
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])
    return combos[order[:n]]


def _corpus_items(cfg: SyntheticConfig) -> list[_Item]:
    """A `corpus_studio` share of the images on the studio backdrop, the rest on every background.

    Within each part every combination of attributes (and background) comes equally often; the
    two parts are interleaved at random. The studio images are the "product photos" of the
    corpus: the object alone, which is what lets a small model learn shapes in a few hundred
    steps; the other images tie the same words to objects in cluttered scenes.
    """
    rng = _rng(cfg, "corpus", 0)
    attributes = (len(SHAPES), len(COLOURS), len(SIZES), len(TEXTURES))
    n_studio = int(round(cfg.corpus_studio * cfg.n_corpus))
    studio = _balanced(rng, n_studio, attributes)
    studio = np.concatenate([studio, np.full((n_studio, 1), len(cfg.domains))], axis=1)
    scenes = _balanced(rng, cfg.n_corpus - n_studio, attributes + (len(cfg.domains),))
    rows = np.concatenate([studio, scenes])[rng.permutation(cfg.n_corpus)]
    return [_Item(*map(int, row)) for row in rows]


# ---------------------------------------------------------------------------------------------
# captions


_OPENERS = ("a photo of a", "a", "a picture of a", "an image of a", "a drawing of a", "there is a")
_TEXTURE_ADJ = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted"),
                "checkered": ("checkered",)}
_TEXTURE_WITH = {"solid": "in one solid colour", "striped": "with stripes", "dotted": "with dots",
                 "checkered": "with a checkered pattern"}


def _caption(item: _Item, cfg: SyntheticConfig, rng: np.random.Generator) -> str:
    """A varied caption: each attribute named with its `caption_rates` probability."""
    shape = SHAPES[item.shape]
    colour = tuple(COLOURS)[item.colour]
    size = tuple(SIZES)[item.size]
    texture = TEXTURES[item.texture]
    background = cfg.corpus_backgrounds[item.domain]

    # Few attributes per caption keep the shape informative for the contrastive loss: colour is
    # learnt first (it is in the pixels), and a caption naming colour and background already
    # singles out most images of a batch, so the shape barely matters if every caption has them.
    use = rng.random(5) < np.asarray(cfg.caption_rates, dtype=float)
    noun = shape if use[0] else str(rng.choice(("object", "shape")))
    adjectives = []
    if use[2]:
        adjectives.append(size if rng.random() < 0.8 else {"small": "little", "large": "big"}[size])
    if use[1]:
        adjectives.append(colour)
    texture_tail = ""
    if use[3]:
        if rng.random() < 0.6:
            adjectives.append(str(rng.choice(_TEXTURE_ADJ[texture])))
        else:
            texture_tail = " " + _TEXTURE_WITH[texture]
    if not (use[0] or use[1] or use[2] or use[3]):
        adjectives.append(colour)  # never "a photo of a shape" alone
    text = f"{rng.choice(_OPENERS)} {' '.join(adjectives + [noun])}{texture_tail}"
    if use[4] and background == STUDIO:
        text += str(rng.choice((" on a plain background", " on a white background", " in a studio")))
    elif use[4]:
        text += str(rng.choice((f" on a {background} background", f" on {background}", f" in a {background} scene")))
    return text + ("." if rng.random() < 0.5 else "")


# ---------------------------------------------------------------------------------------------
# writing


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _attributes(cfg: SyntheticConfig) -> dict[str, Any]:
    return {
        "y": list(SHAPES),
        "colour": list(COLOURS),
        "size": list(SIZES),
        "texture": list(TEXTURES),
        "domain": list(cfg.domains),
        "id_domains": list(cfg.id_domains),
        "ood_domains": list(cfg.ood_domains),
        "preferred_colour": {s: tuple(COLOURS)[i % len(COLOURS)] for i, s in enumerate(SHAPES)},
    }


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _remove_stale_tmp(final: Path) -> None:
    """Delete temp folders of earlier, killed runs (their process is gone)."""
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place; a reader never sees a half-written folder."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _draw_chunk(cfg: SyntheticConfig, stream: str, items: list[tuple[int, str, _Item]], folder: str,
                captions: bool) -> list[str]:
    """Render and write a chunk of (index, relative path, item); return captions if asked."""
    out = []
    for i, relpath, item in items:
        rng = _rng(cfg, stream, 1, i)
        with open(os.path.join(folder, relpath), "wb") as f:
            f.write(_png_bytes(_render(item, cfg, rng)))
        if captions:
            out.append(_caption(item, cfg, rng))  # drawn after the image: same stream, fixed order
    return out


def _draw_all(cfg: SyntheticConfig, jobs: list[tuple[str, list[tuple[int, str, _Item]]]], folder: Path,
              captions: bool, workers: int | None) -> list[str]:
    """Draw every job, in parallel processes when there are several cores.

    Each image has its own random stream, so the bytes do not depend on the worker count.
    """
    workers = _default_workers() if workers is None else max(1, workers)
    chunk = 500
    tasks = [(stream, items[k : k + chunk]) for stream, items in jobs for k in range(0, len(items), chunk)]
    if workers == 1 or len(tasks) == 1:
        return [c for stream, part in tasks for c in _draw_chunk(cfg, stream, part, str(folder), captions)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: the children only run numpy and PIL, and need not re-import torch and wilds.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(_draw_chunk, cfg, stream, part, str(folder), captions) for stream, part in tasks]
        return [c for fut in futures for c in fut.result()]


def generate_dataset(root: Path, cfg: SyntheticConfig, *, workers: int | None = None) -> Path:
    """Write the labelled dataset to ``root/synthetic_v1.0/`` and return that folder.

    Contents: ``RELEASE_v1.0.txt``, ``metadata.csv`` (filename, y, split, domain, colour, size,
    texture, shape), ``attributes.json`` (the names behind the integer columns, the ID / OOD
    backgrounds and the config) and ``images/*.png``. Deterministic in ``cfg`` (whatever
    ``workers``, which defaults to the available cores); built in a temp folder beside the
    target and renamed into place when complete.
    """
    root = Path(root)
    final = root / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = _tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        jobs, rows = [], []
        for split in SPLITS:
            items = [(i, f"images/{split}_{i:05d}.png", item) for i, item in enumerate(_split_items(cfg, split))]
            jobs.append((split, items))
            rows += [(path, it.shape, split, it.domain, it.colour, it.size, it.texture, SHAPES[it.shape])
                     for _, path, it in items]
        _draw_all(cfg, jobs, tmp, captions=False, workers=workers)
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("filename", "y", "split", "domain", "colour", "size", "texture", "shape"))
            writer.writerows(rows)
        attributes = {**_attributes(cfg), "config": asdict(cfg)}
        (tmp / "attributes.json").write_text(json.dumps(attributes, indent=1) + "\n", encoding="utf-8")
        (tmp / f"RELEASE_v{VERSION}.txt").write_text(
            f"Synthetic WILDS-style dataset v{VERSION}, generated by pipeline.data.synthetic.\n", encoding="utf-8"
        )
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def generate_corpus(out_dir: Path, cfg: SyntheticConfig, *, workers: int | None = None) -> Path:
    """Write the captioned corpus to ``out_dir`` and return ``out_dir/corpus.csv``.

    open_clip's CSV convention: header ``filepath,title``, file paths relative to the CSV's
    folder, images under ``out_dir/images/``. ``out_dir`` belongs to this function: it is
    built beside itself and swapped in whole when complete. Deterministic in ``cfg``.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = _tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        items = [(i, f"images/{i:06d}.png", item) for i, item in enumerate(_corpus_items(cfg))]
        titles = _draw_all(cfg, [("corpus", items)], tmp, captions=True, workers=workers)
        with open(tmp / "corpus.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("filepath", "title"))
            writer.writerows((path, title) for (_, path, _), title in zip(items, titles))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / "corpus.csv"


# ---------------------------------------------------------------------------------------------
# the wilds dataset


class SyntheticDataset(WILDSDataset):
    """The built-in synthetic dataset, a WILDS dataset like iWildCam.

    Supported `split_scheme`:
        - 'official'
    Input (x):
        RGB images (32 × 32 by default) of one drawn object on a background.
    Label (y):
        the object's shape (8 classes).
    Metadata:
        domain (background, the 'camera location'), colour, size, texture, y.
    Splits:
        train, id_val, id_test on the ID backgrounds; val, test on unseen OOD backgrounds.
    Official metric:
        acc_avg; also F1-macro_all and acc_worst_domain (worst background).
    Data:
        generated locally by `generate_dataset` (the `prepare` stage); `download=True`
        generates the default configuration when the folder is missing.
    """

    _dataset_name = "synthetic"
    _versions_dict = {VERSION: {"download_url": None, "compressed_size": None}}

    def __init__(self, version=None, root_dir="data", download=False, split_scheme="official"):
        self._version = version
        self._split_scheme = split_scheme
        if self._split_scheme != "official":
            raise ValueError(f"Split scheme {self._split_scheme} not recognized")
        self.check_version()

        # wilds' own initialize_data_dir would try to download; this data is generated.
        data_dir = Path(root_dir) / f"{self.dataset_name}_v{self.version}"
        if not (data_dir / f"RELEASE_v{self.version}.txt").is_file():
            if not download:
                raise FileNotFoundError(
                    f"The synthetic dataset was not found: {data_dir} (with RELEASE_v{self.version}.txt) "
                    f"does not exist. The `prepare` stage generates it (`dvc repro prepare`), or call "
                    f"pipeline.data.synthetic.generate_dataset(Path('{root_dir}'), SyntheticConfig())."
                )
            print(f"Generating the synthetic dataset (default configuration) in {data_dir}...")
            generate_dataset(Path(root_dir), SyntheticConfig())
        self._data_dir = data_dir

        import pandas as pd

        df = pd.read_csv(data_dir / "metadata.csv")
        self.attributes = json.loads((data_dir / "attributes.json").read_text(encoding="utf-8"))

        self._split_dict = {"train": 0, "val": 1, "test": 2, "id_val": 3, "id_test": 4}
        self._split_names = {
            "train": "Train", "val": "Validation (OOD)", "test": "Test (OOD)",
            "id_val": "Validation (ID)", "id_test": "Test (ID)",
        }
        unknown = set(df["split"]) - set(self._split_dict)
        if unknown:
            raise ValueError(f"{data_dir / 'metadata.csv'}: unknown split names {sorted(unknown)}")
        self._split_array = df["split"].map(self._split_dict).to_numpy()
        self._input_array = df["filename"].to_numpy()

        self._y_array = torch.as_tensor(df["y"].to_numpy(), dtype=torch.long)
        self._y_size = 1
        self._n_classes = len(self.attributes["y"])

        self._metadata_fields = ["domain", "colour", "size", "texture", "y"]
        self._metadata_array = torch.as_tensor(
            np.stack([df[c].to_numpy() for c in ("domain", "colour", "size", "texture")] + [df["y"].to_numpy()], axis=1),
            dtype=torch.long,
        )
        self._metadata_map = {k: list(self.attributes[k]) for k in ("domain", "colour", "size", "texture", "y")}
        self._original_resolution = (self.attributes["config"]["image_size"],) * 2

        self._eval_grouper = CombinatorialGrouper(dataset=self, groupby_fields=["domain"])
        super().__init__(root_dir, download, split_scheme)

    @property
    def id_domains(self) -> tuple[str, ...]:
        return tuple(self.attributes["id_domains"])

    @property
    def ood_domains(self) -> tuple[str, ...]:
        return tuple(self.attributes["ood_domains"])

    def get_input(self, idx):
        """The idx-th image as an RGB PIL image."""
        with Image.open(self.data_dir / self._input_array[idx]) as img:
            return img.convert("RGB")

    def eval(self, y_pred, y_true, metadata, prediction_fn=None):
        """Accuracy (overall and per domain, with the worst domain) and macro F1, by wilds' metrics.

        Args:
            - y_pred (Tensor): predicted labels, or model outputs turned into labels by prediction_fn
            - y_true (LongTensor): true labels
            - metadata (Tensor): metadata rows of the same examples
            - prediction_fn (function): turns y_pred into predicted labels
        Output:
            - results (dict): acc_avg, F1-macro_all, acc_worst_domain, acc_domain:<name>, count_domain:<name>
            - results_str (str): a summary
        """
        accuracy = Accuracy(prediction_fn=prediction_fn)
        results, results_str = self.standard_group_eval(accuracy, self._eval_grouper, y_pred, y_true, metadata)
        # Worst over the domains present in these examples (wilds skips empty groups).
        results["acc_worst_domain"] = results.pop(accuracy.worst_group_metric_field)
        f1 = F1(prediction_fn=prediction_fn, average="macro")
        results.update(f1.compute(y_pred, y_true))
        results_str += f"Macro F1: {results[f1.agg_metric_field]:.3f}\n"
        return results, results_str
