"""What digesting the files params.yaml names outside the project costs (`data/external`,
`pipeline.core.external`): a ViT-B-16 weights file (~600 MB) as `model.pretrained` and a
reference CSV of 10k images as `reference.csv`, in a fresh DVC project holding the pipeline.

    python benchmarks/bench_external.py                       # ~600 MB weights, 10k images (~3-5 min)
    python benchmarks/bench_external.py --images 1000 --arch ViT-B-32   # quicker

Timed, first (nothing cached: every byte hashed) then repeated (nothing changed):
- `digest`: `write_external` in this process: the links under data/external and their
  SHA-256 (`DigestCache`, keyed by size, times and inode), the part the issue asked to keep cheap;
- `check --write`: the DVC stage's command as a process (imports, the model built with random
  weights, the weights file read and fitted, every reference image checked, then the digest);
- `check`: `python -m pipeline check` (validation only, writes nothing);
- `dvc repro check` / `dvc status`: DVC hashing the links for `check`'s output and
  `prepare`/`pretrained`'s deps (its own state database, keyed the same way).
The files are generated in --workdir (default a temp folder under /tmp) and removed after,
unless --keep. The first pass reads them from the page cache (they were just written): on a
cold disk it is bounded by the disk's read speed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_files(work: Path, arch: str, n_images: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    from pipeline import models

    weights = work / "files" / f"{arch}.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    models.save_state_dict(models.create(arch).model.state_dict(), weights)
    images = work / "files" / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
        rows.append(f"images/{i:05d}.png,a picture number {i}")
    csv = work / "files" / "captions.csv"
    csv.write_text("\n".join(rows) + "\n")
    return weights, csv


def timed(cmd: list, cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="ViT-B-16", help="open_clip architecture of the weights file (ViT-B-16: ~600 MB)")
    ap.add_argument("--images", type=int, default=10_000, help="reference images (64x64 PNGs)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="leave the generated files and project in --workdir")
    args = ap.parse_args()

    import yaml

    from tests.e2e_project import copy_pipeline, sh

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_external_"))
    try:
        weights, csv = make_files(work, args.arch, args.images)
        project = work / "project"
        project.mkdir()
        env = copy_pipeline(project)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["model"].update(arch=args.arch, pretrained=str(weights))
        params["reference"].update(csv=str(csv), max_samples=args.images)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        sh(["git", "init", "-q"], project, env)
        sh([sys.executable, "-m", "dvc", "init", "-q"], project, env)
        sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], project, env)
        size_mb = weights.stat().st_size / 2**20

        os.chdir(project)
        sys.path.insert(0, str(project))
        from pipeline.config import load_params
        from pipeline.core import external
        from pipeline.stages.check import write_external

        loaded = load_params("params.yaml")
        rows = []
        for label in ("first", "repeated"):
            hashed = []
            original = external.DigestCache.save

            def save(self, _orig=original, _hashed=hashed):
                _hashed.append(self.hashed)
                _orig(self)

            external.DigestCache.save = save
            start = time.perf_counter()
            write_external(loaded)
            digest_s = time.perf_counter() - start
            external.DigestCache.save = original
            rows.append((label, "digest (write_external)", digest_s, hashed[0]))
        # the stage's command and the validation-only command, as processes (the digest cache
        # is warm now, so both are "repeated"; the first row of each is with a cold cache)
        shutil.rmtree(project / "data")
        (project / ".dvc/tmp/external-digests.json").unlink()
        py = [sys.executable]
        rows.append(("first", "check --write (stage)", timed([*py, "stages/check.py", "--write"], project, env), None))
        rows.append(("repeated", "check --write (stage)", timed([*py, "stages/check.py", "--write"], project, env), None))
        rows.append(("repeated", "check (validation only)", timed([*py, "-m", "pipeline", "check"], project, env), None))
        # DVC's side: the first `dvc repro check` hashes every link for the stage's lock (the
        # digest cache is warm by now: this is DVC's own hashing), then `dvc status` re-stats them
        rows.append(("first", "dvc repro check (DVC hashes the links)",
                     timed([*py, "-m", "dvc", "repro", "check"], project, env), None))
        rows.append(("repeated", "dvc status", timed([*py, "-m", "dvc", "status"], project, env), None))
        rows.append(("repeated", "dvc repro check (nothing to do)",
                     timed([*py, "-m", "dvc", "repro", "check"], project, env), None))
        files = json.loads((project / "data/external/reference/digest.json").read_text())["files"]
        print(f"\n{args.arch} weights: {size_mb:.0f} MiB; reference: {files - 1} images + the CSV; "
              f"{os.cpu_count()} CPUs\n")
        print("| pass | what | seconds | files hashed |\n|---|---|---:|---:|")
        for label, what, seconds, n in rows:
            print(f"| {label} | {what} | {seconds:.2f} | {'' if n is None else n} |")
    finally:
        if not args.keep:
            os.chdir("/")
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
