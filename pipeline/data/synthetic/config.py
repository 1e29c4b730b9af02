"""What the synthetic generator draws: the fixed vocabulary and `SyntheticConfig`."""

from __future__ import annotations

from dataclasses import dataclass, replace


from pipeline.core.validation import Float, Int, Settings, Str


VERSION = "1.0"
FOLDER = f"synthetic_v{VERSION}"
SPLITS = ("train", "id_val", "id_test", "val", "test")
ID_SPLITS = ("train", "id_val", "id_test")

# The vocabulary is fixed (it is what pipeline/data/prompts/synthetic.json names); the
# config chooses sizes of the splits, which backgrounds are ID / OOD, and the difficulty.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")  # the task's classes
# Held-out concepts: shapes the task never shows but the caption corpus names (as often as each
# task shape), so the pre-trained model knows them and fine-tuning can make it forget them.
# The dataset writes them as a labelled image folder (`heldout/<shape>/*.png`): the built-in
# zero-shot retention task that fine-tuning conflicts with.
HELDOUT_SHAPES = ("diamond", "arrow", "semicircle", "hourglass")
ALL_SHAPES = SHAPES + HELDOUT_SHAPES  # what `_Item.shape` indexes
HELDOUT = "heldout"  # the folder of held-out-shape images inside the dataset folder
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
# What a task can be labelled by (`SyntheticConfig.label`): an attribute of the object, with its
# classes in label order. The background cannot be one: it is the domain.
LABELS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES,
                                      "size": tuple(SIZES)}

_STREAM = {"train": 1, "id_val": 2, "id_test": 3, "val": 4, "test": 5, "corpus": 6, HELDOUT: 7}


@dataclass(frozen=True)
class SyntheticConfig(Settings):
    """What the generator draws. Defaults: 7k task images, 800 held-out-shape images and 20k
    corpus images at 32 px.

    ``label`` chooses the task (the attribute that is ``y``; shape by default), so the same
    generator offers a family of tasks: the cross-task IIMM study fits its predictor over them.
    The caption corpus does not depend on it (every task shares one pre-trained model).

    ``spurious`` (OPEN, our definition for every label): in the ID splits the **shortcut
    attribute** takes the label's preferred value with this probability (otherwise it is drawn
    uniformly, as everywhere in the OOD splits). The shortcut attribute is the colour, or the
    shape when the label is the colour; class ``v`` of the label prefers value ``v mod n`` of
    the shortcut's ``n`` values (circle → red, ..., ring → pink, crescent → red again; small → red,
    large → green; red → circle, ..., pink → ring).
    """

    seed: Int = 0
    image_size: Int = 32
    n_train: Int = 4000
    n_id_val: Int = 500
    n_id_test: Int = 1000
    n_val: Int = 500
    n_test: Int = 1000
    n_heldout: Int = 800  # images of the held-out shapes (on ID backgrounds), equally many per shape
    n_corpus: Int = 20000
    corpus_studio: Float = 0.7  # share of corpus images on a plain studio backdrop (the rest: every background)
    # how often a corpus caption names the shape, colour, size, texture and background
    caption_rates: tuple[Float, Float, Float, Float, Float] = (1.0, 0.5, 0.3, 0.3, 0.3)
    id_domains: tuple[Str, ...] = ("grass", "sand", "water", "snow", "brick", "forest")
    ood_domains: tuple[Str, ...] = ("night", "rock", "dusk", "tile")
    label: Str = "shape"  # what the task classifies: shape, colour, texture or size (LABELS)
    spurious: Float = 0.5  # ID only: P(the shortcut attribute is the label's preferred value), else uniform
    noise: Float = 0.03  # std of pixel noise on ID backgrounds (image in [0, 1])
    ood_noise: Float = 0.06  # std of pixel noise on OOD backgrounds
    clutter: Int = 2  # distractor marks per ID image (OOD backgrounds get twice as many)
    rotation: Float = 20.0  # objects are turned by up to ± this many degrees
    jitter: Float = 0.1  # the object's centre is up to ± this fraction of the side from the middle
    texture_contrast: Float = 0.4  # how much darker the pattern of a textured object is (0: invisible)
    supersample: Int = 2  # drawn at this multiple of image_size, then box-filtered down

    def __post_init__(self) -> None:
        for name in ("n_train", "n_id_val", "n_id_test", "n_val", "n_test", "n_heldout", "n_corpus"):
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
        if self.label not in LABELS:
            raise ValueError(f"label: {self.label!r} is not allowed; allowed: {', '.join(LABELS)} (an attribute of the "
                             "object; the background is the domain, so it cannot be the label).")
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
        return cls(seed=seed, n_train=400, n_id_val=100, n_id_test=200, n_val=100, n_test=200, n_heldout=200,
                   n_corpus=3000)

    @classmethod
    def quick(cls, seed: int = 0) -> "SyntheticConfig":
        """`small()` made easy enough that the tiny CLIP learns shapes in about a minute.

        One plain ID background (snow) and one OOD background (sand), no clutter, and captions
        that name the shape but rarely anything else: for tests of zero-shot learnability.
        """
        return replace(cls.small(seed), id_domains=("snow",), ood_domains=("sand",), clutter=0,
                                   caption_rates=(1.0, 0.1, 0.1, 0.1, 0.1))

    @property
    def classes(self) -> tuple[str, ...]:
        """The task's class names in label order (the values of `label`)."""
        return LABELS[self.label]

    @property
    def shortcut(self) -> str:
        """The attribute the label is spuriously correlated with in ID data (see `spurious`)."""
        return "shape" if self.label == "colour" else "colour"

    @property
    def domains(self) -> tuple[Str, ...]:
        """Domain names in metadata order: ID backgrounds first, then OOD."""
        return self.id_domains + self.ood_domains

    @property
    def corpus_backgrounds(self) -> tuple[Str, ...]:
        """Backgrounds of corpus items (their `domain` indexes this): the domains, then the studio."""
        return self.domains + (STUDIO,)

    def split_size(self, split: str) -> int:
        return getattr(self, f"n_{split}")


