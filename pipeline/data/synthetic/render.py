"""Drawing: backgrounds, shapes, textures, the items of every split, and captions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.synthetic.config import (ALL_SHAPES, COLOURS, HELDOUT, HELDOUT_SHAPES, ID_SPLITS, LABELS, SHAPES, SIZES,
                                            STUDIO, SyntheticConfig, TEXTURES, _STREAM)


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
    # the held-out shapes (never a task class)
    if shape == "diamond":  # a tall rhombus
        return np.abs(u) / 0.62 + np.abs(v) / 0.95 <= 1.0
    if shape == "arrow":  # pointing right: a shaft and a triangular head
        shaft = (np.abs(v) <= 0.2) & (u >= -0.92) & (u <= 0.1)
        head = (u >= 0.0) & (u <= 0.92) & (np.abs(v) <= 0.8 * (0.92 - u))
        return shaft | head
    if shape == "semicircle":  # a half disc, flat side down
        return (u * u + (v - 0.38) ** 2 <= 0.92**2) & (v <= 0.38)
    if shape == "hourglass":  # two triangles meeting at their tips
        return (np.abs(u) <= 0.08 + 0.75 * np.abs(v)) & (np.abs(v) <= 0.9)
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
    mask = _shape_mask(ALL_SHAPES[item.shape], u_img / (radius * stretch), v_img / (radius / stretch))

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
    """Attributes of every image of a split (the label distribution of that split).

    Every attribute is uniform; in the ID splits the shortcut attribute (`cfg.shortcut`) then
    takes the label's preferred value with probability `cfg.spurious` (`SyntheticConfig`). The
    draws come in the same order for every label, so the shape task's items are those the
    generator drew before labels other than the shape existed.
    """
    n = cfg.split_size(split)
    rng = _rng(cfg, split, 0)
    ood = split not in ID_SPLITS
    domains = np.arange(len(cfg.id_domains), len(cfg.domains)) if ood else np.arange(len(cfg.id_domains))
    values = {"shape": rng.integers(0, len(SHAPES), n), "colour": rng.integers(0, len(COLOURS), n)}
    shortcut = None if ood else rng.random(n) < cfg.spurious
    values["size"] = rng.integers(0, len(SIZES), n)
    values["texture"] = rng.integers(0, len(TEXTURES), n)
    domain = rng.choice(domains, n)
    if shortcut is not None:  # each class of the label prefers one value of the shortcut attribute
        preferred = values[cfg.label] % len(LABELS[cfg.shortcut])
        values[cfg.shortcut] = np.where(shortcut, preferred, values[cfg.shortcut])
    return [_Item(*map(int, row)) for row in zip(values["shape"], values["colour"], values["size"], values["texture"],
                                                  domain)]


def _heldout_items(cfg: SyntheticConfig) -> list[_Item]:
    """The held-out shapes on the ID backgrounds: every shape equally often (n_heldout rounded
    down to a multiple of their number), uniform colours (no shortcut), sizes and textures."""
    rng = _rng(cfg, HELDOUT, 0)
    k = len(HELDOUT_SHAPES)
    n = max(cfg.n_heldout // k, 1) * k
    shape = len(SHAPES) + rng.permutation(np.arange(n) % k)
    colour = rng.integers(0, len(COLOURS), n)
    size = rng.integers(0, len(SIZES), n)
    texture = rng.integers(0, len(TEXTURES), n)
    domain = rng.integers(0, len(cfg.id_domains), n)
    return [_Item(*map(int, row)) for row in zip(shape, colour, size, texture, domain)]


def _balanced(rng: np.random.Generator, n: int, sizes: tuple[int, ...]) -> np.ndarray:
    """n rows of indices into `sizes`: every combination equally often (shuffled per cycle)."""
    grids = np.meshgrid(*(np.arange(k) for k in sizes), indexing="ij")
    combos = np.stack([g.ravel() for g in grids], axis=1)
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])
    return combos[order[:n]]


def _corpus_items(cfg: SyntheticConfig) -> list[_Item]:
    """A `corpus_studio` share of the images on the studio backdrop, the rest on every background;
    the task's shapes and the held-out ones alike.

    Within each part every combination of attributes (and background) comes equally often; the
    two parts are interleaved at random. The studio images are the "product photos" of the
    corpus: the object alone, which is what lets a small model learn shapes in a few hundred
    steps; the other images tie the same words to objects in cluttered scenes.
    """
    rng = _rng(cfg, "corpus", 0)
    attributes = (len(ALL_SHAPES), len(COLOURS), len(SIZES), len(TEXTURES))
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


def describe(shape: str, colour: str, size: str, texture: str, background: str) -> str:
    """The generator's full description of one image: every attribute it drew, in the words
    of its captions (`_caption` names each only some of the time)."""
    where = " on a plain background" if background == STUDIO else f" on a {background} background"
    return f"a photo of a {size} {colour} {_TEXTURE_ADJ[texture][0]} {shape}{where}."


def _caption(item: _Item, cfg: SyntheticConfig, rng: np.random.Generator) -> str:
    """A varied caption: each attribute named with its `caption_rates` probability."""
    shape = ALL_SHAPES[item.shape]
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


