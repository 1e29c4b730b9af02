"""Step time and peak memory of each robust fine-tuning method against FT and FLYP, in one run,
through `pipeline.training.train.fit` (bench_steps' workers: each method in a fresh process).

    python benchmarks/bench_robust.py                                  # CPU: the built-in tiny-clip @ 32 px, batch 8
    python benchmarks/bench_robust.py --arch ViT-B-32 --image-size 64  # CPU, a real architecture
    python benchmarks/bench_robust.py --device cuda --arch ViT-B-16 --batch-sizes 128 --json out/robust.json

Methods: ft, flyp, flyp_replay, snd, lipsum_ft, clipood, ftp, model_stock and dive (override
with --methods). A method with reference data gets B' in its own default ratio to the target
batch (its `ref_batch_size` default over the default finetune.train.batch_size 32: DiVE and
FLYP+replay B/4, SnD 2B), from an in-memory reference set as the embed stage's cache provides
it. Time: mean optimiser-step time after the warm-up steps. Model Stock's steps cost FT's, but an
entry trains `n_runs` = 2 runs: the "× FT per entry" column multiplies by the method's runs.
Memory: peak RSS on CPU (CUDA: max_memory_allocated, total and added by training).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_steps  # noqa: E402  (imports bench_train, which imports pipeline first)

METHODS = ("ft", "flyp", "flyp_replay", "snd", "lipsum_ft", "clipood", "ftp", "model_stock", "dive")


def table(res: dict) -> str:
    """Wall and process-CPU time per step (CPU time is the steadier figure on a shared machine),
    each against FT's and FLYP's; per entry = × the method's runs; peak memory."""
    from pipeline.methods import METHODS as REGISTRY

    ok = [r for r in res["runs"] if "error" not in r]

    def ratio(r, base, key, n=1):
        b = next((x for x in ok if x["method"] == base and x["batch_size"] == r["batch_size"]), None)
        return f"{n * r[key] / max(b[key], 1e-12):.2f}" if b else "–"

    lines = ["| method | batch | step ms (wall) | CPU ms | × FT (CPU) | × FLYP (CPU) | runs per entry "
             "| × FT per entry (CPU) | × FT (wall) | peak MiB | added MiB | × FT added |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch_size']} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        n = REGISTRY[r["method"]].n_runs
        lines.append(f"| {r['method']} | {r['batch_size']} | {1e3 * r['step_s']:.1f} | {1e3 * r['cpu_s']:.1f} | "
                     f"{ratio(r, 'ft', 'cpu_s')} | {ratio(r, 'flyp', 'cpu_s')} | {n} | {ratio(r, 'ft', 'cpu_s', n)} | "
                     f"{ratio(r, 'ft', 'step_s')} | {r['peak_bytes'] / 2**20:.0f} | {r['added_bytes'] / 2**20:.0f} | "
                     f"{ratio(r, 'ft', 'added_bytes')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    defaults = []
    if "--methods" not in given:
        defaults += ["--methods", ",".join(METHODS)]
    if "--arch" not in given:
        defaults += ["--arch", "tiny-clip", "--image-size", "0"]
    res = bench_steps.main(defaults + argv)
    print("\n### Robust baselines: step time and peak memory against FT and FLYP\n")
    print(table(res))
    return res


if __name__ == "__main__":
    main()
