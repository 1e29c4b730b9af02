"""Real-size images: decoding + preprocessing from the original files against reading the
prepared image cache (`pipeline.data.imagecache`), and the evaluation overhead of each against
the model alone.

    python benchmarks/bench_images.py                        # CPU: 32 JPEGs of 1920x1080, ViT-B-32 @ 224 (~3 min)
    python benchmarks/bench_images.py --device cuda          # GPU: 512 JPEGs, batch 256
    python benchmarks/bench_images.py --gpu-images-per-s 5000  # the model throughput the core count assumes

The JPEGs are iWildCam's size class (1920x1080, quality 90, ~0.4 MB each: smooth gradients,
shapes and sensor noise, so they neither compress like a flat picture nor like pure noise).
Per-core figures run in this process with one torch thread and no workers: what one
DataLoader worker delivers. "originals" is what every stage did before the cache (`PIL.open`
+ decode + the model's evaluation transform); "cache" is `ImageStore.get` + the same
transform, for each format. The evaluation figures run `encode_images` (the embed/evaluate
path) over `LabeledImages` of each source against `EvalModel.encode_image` on tensors already
on the device, for each `num_workers`. Cores a GPU needs = the stated model throughput / the
per-core rate.
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

import bench_eval as be  # noqa: E402  (the timing loops: the model alone, encode_images)
import bench_train as bt  # noqa: E402  (imports pipeline first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.imagecache import ImageCache, build, image_key, resize_step  # noqa: E402
from pipeline.data.torchdata import LabeledImages  # noqa: E402
from pipeline.models.evalmodel import EvalModel  # noqa: E402


class JpegDataset:
    """The part of a WILDS dataset the pipeline reads: `y_array` and `get_input` (a lazily
    decoded `PIL.Image.open`, as WILDS returns)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.y_array = torch.arange(len(files)) % 10

    def __len__(self) -> int:
        return len(self.files)

    def get_input(self, i: int) -> Image.Image:
        return Image.open(self.files[i])


def write_jpegs(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    files = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        arr = np.asarray(base, dtype=np.float32)
        for _ in range(6):
            cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(height // 20, height // 5)
            arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        arr += rng.normal(0, 6, arr.shape)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def per_image(fn, n: int, rounds: int) -> float:
    """Best images/s of `rounds` passes over fn(0..n-1)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--images", type=int, default=None, help="JPEG files (default: 32 CPU, 512 CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 CPU, 256 CUDA")
    p.add_argument("--workers", default=None, help="num_workers values for the evaluation figures "
                                                  "(default: 0,1 CPU; 0,4,8 CUDA)")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per figure (best of)")
    p.add_argument("--gpu-images-per-s", type=float, default=3000.0,
                   help="the model throughput the core count is for (default 3000/s: a ViT-B/16 forward "
                        "in bf16 on one current data-centre GPU, an assumption, not measured here)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for the model (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args, device = bt.start(argv, parse_args)
    gpu = device.type == "cuda"
    n = args.images or (512 if gpu else 32)
    bs = args.batch_size or (256 if gpu else 16)
    workers = [int(w) for w in (args.workers or ("0,4,8" if gpu else "0,1")).split(",")]
    model_threads = torch.get_num_threads()
    t_start = time.perf_counter()

    clip, _, size, preprocess = bt.build_model(args.arch, 0, device)
    model = EvalModel(clip.eval())
    folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
    try:
        files = write_jpegs(folder / "jpg", n, args.width, args.height)
        mb = sum(f.stat().st_size for f in files) / n / 2**20
        source = JpegDataset(files)
        resize = resize_step(preprocess)
        caches, build_rate, disk = {}, {}, {}
        torch.set_num_threads(1)  # per-core figures: one core, as one DataLoader worker
        for fmt in ("raw", "jpeg"):
            key = image_key("bench", preprocess, fmt, 95)
            t0 = time.perf_counter()
            build(folder / fmt, key, resize, [("main", source.get_input, range(n))])
            build_rate[fmt] = n / (time.perf_counter() - t0)
            caches[fmt] = ImageCache.open(folder / fmt, key).dataset("main", source)
            disk[fmt] = (folder / fmt / "main.bin").stat().st_size / n / 2**10
        rate = {
            "decode only": per_image(lambda i: source.get_input(i).convert("RGB"), n, args.rounds),
            "originals": per_image(lambda i: preprocess(source.get_input(i).convert("RGB")), n, args.rounds),
        }
        for fmt, ds in caches.items():
            rate[f"cache {fmt}"] = per_image(lambda i, ds=ds: preprocess(ds.get_input(i)), n, args.rounds)
        torch.set_num_threads(model_threads)

        sets = {"originals": source, **{f"cache {f}": ds for f, ds in caches.items()}}
        datasets = {k: LabeledImages(ds, range(n), preprocess) for k, ds in sets.items()}
        images = torch.stack([datasets["cache raw"][i]["image"] for i in range(n)]).to(device)
        be.model_only(model, images[:bs], bs, device)  # warm-up
        t_model = min(be.model_only(model, images, bs, device) for _ in range(args.rounds))
        real = {}
        for name, ds in datasets.items():
            be.real_path(model, ds, bs, workers[0], device)  # warm-up (and the page cache)
            for w in workers:
                real[name, w] = min(be.real_path(model, ds, bs, w, device) for _ in range(args.rounds))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    T = args.gpu_images_per_s
    print(f"\n### Real-size images: {n} JPEGs of {args.width}x{args.height} ({mb:.2f} MiB each), "
          f"{args.arch} @ {size} px, {device.type}\n")
    print(f"Machine: {bt.machine(device)}. Best of {args.rounds} passes.\n")
    print("Per core (one process, one thread: what one DataLoader worker delivers):\n")
    print(f"| source | images/s per core | vs originals | cores for {T:,.0f} images/s |")
    print("|---|---:|---:|---:|")
    for name, r in rate.items():
        print(f"| {name} | {r:.1f} | {r / rate['originals']:.1f}× | {T / r:.1f} |")
    print(f"\nCache: raw {disk['raw']:.0f} KiB per image, jpeg (q95, 4:4:4) {disk['jpeg']:.0f} KiB "
          f"(originals {1024 * mb:.0f} KiB); building it runs at {build_rate['raw']:.1f} (raw) and "
          f"{build_rate['jpeg']:.1f} (jpeg) images/s per core, once.\n")
    print(f"Evaluation (`encode_images`, batch {bs}) against the model alone on tensors "
          f"({n / t_model:.1f} images/s, {model_threads} torch threads):\n")
    print("| source | num_workers | images/s | overhead vs model only |")
    print("|---|---:|---:|---:|")
    for (name, w), t in real.items():
        print(f"| {name} | {w} | {n / t:.1f} | {100 * (t / t_model - 1):+.1f} % |")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")
    res = {"arch": args.arch, "image_size": size, "device": device.type, "machine": bt.machine(device),
           "images": n, "source": [args.width, args.height], "mib_per_image": mb,
           "per_core_images_per_s": rate, "cache_kib_per_image": disk, "build_images_per_s": build_rate,
           "gpu_images_per_s": T, "cores_needed": {k: T / r for k, r in rate.items()},
           "model_only_images_per_s": n / t_model,
           "eval": {f"{name}/{w}": {"images_per_s": n / t, "overhead": t / t_model - 1}
                    for (name, w), t in real.items()},
           "seconds": time.perf_counter() - t_start}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
