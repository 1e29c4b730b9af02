"""Evaluation throughput through the real path — `pipeline.models.encode.encode_images` over a
`LabeledImages` dataset of PNG files on disk, decoded and preprocessed by the model's
evaluation transform — against the same model on pre-made tensors: the data-loading
overhead.

    python benchmarks/bench_eval.py                     # CPU: ViT-B-32 at 224 px, 48 PNGs (~1-2 min)
    python benchmarks/bench_eval.py --device cuda       # GPU: 2048 PNGs, batch 256

The PNGs are smooth synthetic pictures (`--source-size` px square, default 256; natural
photos compress and decode in the same range). The stand-in for a WILDS dataset returns
`PIL.Image.open(path)` from `get_input`, as WILDS does. The model-only figure runs the same
`EvalModel.encode_image` on tensors already on the device, batch by batch, nothing else.
Overhead = real time / model-only time − 1, for each `num_workers` tried (the
`evaluate.num_workers` / `embed.num_workers` params). Each figure is the best of `--rounds`
passes (the least disturbed by other load), after one warm-up pass of each path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402  (imports pipeline first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.torchdata import LabeledImages  # noqa: E402
from pipeline.models.encode import encode_images  # noqa: E402
from pipeline.models.evalmodel import EvalModel  # noqa: E402


class PngDataset:
    """The part of a WILDS dataset `LabeledImages` uses: `y_array` and `get_input`."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.y_array = torch.arange(len(files)) % 10

    def get_input(self, i: int) -> Image.Image:
        return Image.open(self.files[i])


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Smooth pictures: low-resolution noise upsampled bicubically, plus a bright disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    files = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        arr = np.asarray(small.resize((size, size), Image.BICUBIC)).copy()
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 6]
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = 255
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
    return files


def model_only(model: EvalModel, images: torch.Tensor, batch_size: int, device) -> float:
    with torch.no_grad():
        bt.sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            model.encode_image(images[i:i + batch_size]).float().cpu()
        bt.sync(device)
    return time.perf_counter() - t0


def real_path(model: EvalModel, dataset, batch_size: int, workers: int, device) -> float:
    bt.sync(device)
    t0 = time.perf_counter()
    encode_images(model, dataset, device, batch_size=batch_size, num_workers=workers)
    bt.sync(device)
    return time.perf_counter() - t0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=0, help="force_image_size (0 = the config's)")
    p.add_argument("--source-size", type=int, default=256, help="side of the PNG files")
    p.add_argument("--images", type=int, default=None, help="PNG files (default: 48 CPU, 2048 CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 CPU, 256 CUDA")
    p.add_argument("--workers", default=None, help="num_workers values to try (default: 0,2 CPU; 0,4,8 CUDA)")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per setting (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args, device = bt.start(argv, parse_args)
    gpu = device.type == "cuda"
    n = args.images or (2048 if gpu else 48)
    bs = args.batch_size or (256 if gpu else 16)
    workers = [int(w) for w in (args.workers or ("0,4,8" if gpu else "0,2")).split(",")]
    t_start = time.perf_counter()

    clip, _, size, preprocess = bt.build_model(args.arch, args.image_size, device)
    model = EvalModel(clip.eval())
    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        files = write_pngs(folder, n, args.source_size)
        mb = sum(f.stat().st_size for f in files) / 2**20
        dataset = LabeledImages(PngDataset(files), range(n), preprocess)
        images = torch.stack([dataset[i]["image"] for i in range(n)]).to(device)

        model_only(model, images[:bs], bs, device)  # warm-up
        t_model = min(model_only(model, images, bs, device) for _ in range(args.rounds))
        real = {}
        real_path(model, dataset, bs, workers[0], device)  # warm-up (and the page cache)
        for w in workers:
            real[w] = min(real_path(model, dataset, bs, w, device) for _ in range(args.rounds))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"\n### Evaluation throughput: {args.arch} @ {size} px, {n} PNG files of "
          f"{args.source_size} px ({mb:.1f} MiB), batch {bs}, {device.type}, fp32\n")
    print(f"Machine: {bt.machine(device)}. Best of {args.rounds} passes after a warm-up pass.\n")
    print("| path | num_workers | images/s | overhead vs model only |")
    print("|---|---:|---:|---:|")
    print(f"| model only (tensors on the device) | – | {n / t_model:.1f} | – |")
    for w, t in real.items():
        print(f"| encode_images(LabeledImages(PNG files)) | {w} | {n / t:.1f} | {100 * (t / t_model - 1):+.1f} % |")
    best = min(real, key=real.get)
    print(f"\nData-loading overhead: **{100 * (real[best] / t_model - 1):+.1f} %** with num_workers={best} "
          f"(target ≤ 10 %).")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    res = {"arch": args.arch, "image_size": size, "device": device.type, "machine": bt.machine(device),
           "images": n, "batch_size": bs, "model_only_s": t_model, "model_only_images_per_s": n / t_model,
           "workers": {str(w): {"seconds": t, "images_per_s": n / t, "overhead": t / t_model - 1}
                       for w, t in real.items()},
           "seconds": time.perf_counter() - t_start}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
