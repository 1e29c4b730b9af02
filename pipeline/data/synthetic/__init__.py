"""The built-in synthetic WILDS-style dataset and its captioned pre-training corpus.

Procedurally drawn objects: the class is the object's **shape**; each object also has a
**colour**, a **size** and a **texture** (its fill pattern), and sits on a **background** that
plays the role of a camera location in iWildCam (the domain). ``SyntheticConfig.label`` makes
any of the four attributes the class instead (a family of tasks on one generator and one
pre-trained model: the cross-task IIMM study, `pipeline.report.crosstask`). Training and the ID splits
(train / id_val / id_test) use the ID backgrounds; the OOD splits (val / test) use backgrounds
never seen in the labelled data. What makes OOD hard, as in the real WILDS shifts:

- the OOD backgrounds are new scenes, and two of them change the object itself (a dim,
  desaturated "night" like infrared camera-trap frames; a warm colour cast at "dusk"), and
  the others are busier (more clutter, strong edges);
- in ID data each shape prefers one colour (``spurious``: the probability that the colour is
  the shape's preferred one rather than uniform) — a shortcut a fine-tuned model can pick up
  and that does not hold OOD, where colours are uniform. Under another label, each class
  prefers a colour in the same way (the colour task: a shape).

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
shapes); with 70 % studio images it reaches about 0.4 in 1000 steps (with the held-out shapes in
the corpus; 0.3 after 700).

**Held-out shapes** (``HELDOUT_SHAPES``: diamond, arrow, semicircle, hourglass) are never a class
of the task and never in a split, but the corpus shows and names them as often as each task
shape. The dataset writes them on the ID backgrounds as a labelled image folder
(``heldout/<shape>/*.png``), the built-in zero-shot retention task: knowledge the pre-trained
model has and fine-tuning on the task's shapes can overwrite.
"""

from pipeline.data.synthetic.config import (ALL_SHAPES, BACKGROUNDS, COLOURS, FOLDER, HELDOUT_SHAPES, LABELS, SHAPES,
                                            SIZES, STUDIO, TEXTURES, VERSION, SyntheticConfig)

def __getattr__(name: str):
    # the writer and the wilds class import wilds (seconds); the config alone does not
    import importlib

    for part in ("config", "dataset", "render"):
        module = importlib.import_module(f"{__name__}.{part}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["VERSION", "FOLDER", "SHAPES", "HELDOUT_SHAPES", "ALL_SHAPES", "COLOURS", "SIZES", "TEXTURES", "BACKGROUNDS", "STUDIO",
           "LABELS",
           "SyntheticConfig", "generate_dataset", "generate_corpus", "SyntheticDataset"]
