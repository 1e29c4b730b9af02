"""What a cheaper pre-training of the built-in tiny CLIP costs in zero-shot accuracy: each
recipe (steps, batch size, learning rate, warm-up) pre-trained from scratch on the project's
built-in caption corpus, then scored zero-shot on the built-in data's ID validation, ID test
and OOD test splits (`acc_avg`, as the embed stage does), with its wall time.

    python benchmarks/pretrain_recipes.py 1000x128@2e-3 500x128@2e-3      # ~8 min + ~4 min at 1 thread
    python benchmarks/pretrain_recipes.py 500x128@5e-3:50 --threads 1     # :W sets the warm-up steps

Run it in a project where `dvc repro images` has run (the corpus, the data and the image cache:
a kept `bench_repro.py --keep` copy will do, `--project PATH`). A recipe is STEPSxBATCH@LR[:WARMUP];
the warm-up defaults to 10 % of the steps, as the default recipe (100 of 1000). The weights are
written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe_of(recipe: str) -> dict:
    m = re.fullmatch(r"(\d+)x(\d+)@([0-9.eE+-]+)(?::(\d+))?", recipe)
    if not m:
        raise SystemExit(f"{recipe!r}: expected STEPSxBATCH@LR[:WARMUP], e.g. 500x128@2e-3")
    steps, batch, lr, warm = int(m[1]), int(m[2]), float(m[3]), m[4]
    return {"steps": steps, "batch_size": batch, "lr": lr, "warmup": int(warm) if warm else steps // 10}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="STEPSxBATCH@LR[:WARMUP]")
    p.add_argument("--project", type=Path, default=Path.cwd(), help="a project where `dvc repro images` ran")
    p.add_argument("--threads", type=int, default=1, help="torch threads (params.yaml `threads`)")
    args = p.parse_args(argv)
    recipes = [recipe_of(r) for r in args.recipes]

    os.chdir(args.project)
    sys.path.insert(0, str(args.project))
    import torch

    from pipeline.config import load_params
    from pipeline.core.env import set_threads
    from pipeline.core.validation import parse
    from pipeline.data.datasets import split_metrics, split_rows
    from pipeline.data.torchdata import LabeledImages
    from pipeline.models.encode import encode_images
    from pipeline.models.evalmodel import EvalModel
    from pipeline.stages.common import open_task
    from pipeline.training.pretrain import PretrainConfig, pretrain
    from pipeline import artifacts

    set_threads(args.threads)
    params = load_params(Path("params.yaml"))
    corpus = artifacts.PREPARED / "reference" / "corpus.csv"
    if not corpus.is_file():
        raise SystemExit(f"{args.project / corpus}: no built-in corpus; run `dvc repro images` there first")
    rows = []
    print("| pre-training | wall s | final loss | zero-shot id_val | id_test | OOD test |")
    print("|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in recipes:
            # the pretrained stage's settings (pretrained.builtin over the defaults), this recipe's over them
            cfg = parse(PretrainConfig, {**params.pretrained.builtin, **r}, "recipe")
            out = Path(tmp) / "model.safetensors"
            t0 = time.perf_counter()
            info = pretrain(params.model.arch, corpus, cfg, out, progress=False)
            wall = time.perf_counter() - t0
            task = open_task(params, torch.device("cpu"), weights=out)
            model = EvalModel(task.clip.model).eval()
            head = model.zeroshot_head(task.class_tokens).cpu()
            row = {**r, "wall_s": wall, "final_loss": info["final_loss"]}
            for split in ("id_val", "id_test", "test"):
                idx = split_rows(task.dataset, split)
                feats = encode_images(model, LabeledImages(task.dataset, idx.tolist(), task.clip.preprocess_val),
                                      torch.device("cpu"), params.embed.batch_size, 0, desc=split)
                row[split] = split_metrics(task.dataset, split, feats, head, idx)[f"{split}/acc_avg"]
            rows.append(row)
            print(f"| {r['steps']} steps × {r['batch_size']}, lr {r['lr']:g}, warm-up {r['warmup']} | {wall:.0f} | "
                  f"{row['final_loss']:.3f} | {row['id_val']:.3f} | {row['id_test']:.3f} | {row['test']:.3f} |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
