"""DDP equivalence on this machine's devices: 2 processes (torchrun; NCCL on CUDA, gloo on
CPU) against one process with the same global batch and seed, for the cases of
`tests/test_ddp.py` (every method that draws random numbers in its loss).

    python benchmarks/check_ddp.py --device cuda --json out/ddp.json      # needs 2 GPUs, else records a skip
    python benchmarks/check_ddp.py --device cpu --cases flyp --json /tmp/ddp.json

It reuses `tests.test_ddp.run_case` (the tiny test model in float64, so that Adam does not
amplify rounding noise; see there), so it needs the test extras (`pip install -e '.[test]'`).
Per case: the largest weight difference between the two ranks and between rank 0 and the
single process, how far training moved the weights, and pass = both differences ≤ 1e-5
while the weights moved by more than 20× that.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (first, as everywhere)
import torch  # noqa: E402

TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    from pipeline.core import dist
    from tests.test_ddp import run_case

    torch.set_num_threads(1)
    device = torch.device(args.device)
    assert dist.init_from_env(device), "not started by torchrun"
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rank = dist.rank()
    for name in args.cases.split(","):
        r = run_case(name, device=device)
        torch.save({"state": {k: v.cpu() for k, v in r["state"].items()}, "world": dist.world_size()},
                   Path(args.worker) / f"{name}_rank{rank}.pt")
    dist.cleanup()


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    if set(a) != set(b):
        return float("inf"), f"keys differ: {sorted(set(a) ^ set(b))[:3]}"
    worst = max(a, key=lambda k: float((a[k].double() - b[k].double()).abs().max()))
    return float((a[worst].double() - b[worst].double()).abs().max()), worst


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--cases", default="", help="comma-separated names from tests/test_ddp.py CASES (default: all)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--timeout", type=float, default=300, help="seconds for the 2-process run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cases:
        from tests.test_ddp import CASES

        args.cases = ",".join(CASES)
    if args.worker:
        worker(args)
        return {}

    t0 = time.perf_counter()
    res: dict = {"device": args.device, "cases": {}}
    n_gpu = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and n_gpu < 2:
        res.update(status="skipped", reason=f"{n_gpu} CUDA device(s); the NCCL check needs 2")
    else:
        import tempfile

        from tests.test_ddp import SINGLE_BATCH, run_case

        with tempfile.TemporaryDirectory(prefix="check-ddp-") as tmp:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   str(Path(__file__).resolve()), "--device", args.device, "--cases", args.cases, "--worker", tmp]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                res.update(status="failed", reason=(proc.stderr or proc.stdout)[-2000:])
            else:
                device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
                for name in args.cases.split(","):
                    r0 = torch.load(Path(tmp) / f"{name}_rank0.pt", weights_only=False)
                    r1 = torch.load(Path(tmp) / f"{name}_rank1.pt", weights_only=False)
                    single = run_case(name, batch_size=SINGLE_BATCH.get(name), device=device)
                    ranks, _ = max_diff(r0["state"], r1["state"])
                    one, key = max_diff(r0["state"], {k: v.cpu() for k, v in single["state"].items()})
                    res["cases"][name] = {"world": r0["world"], "max_diff_ranks": ranks,
                                          "max_diff_single": one, "worst_key": key, "moved": single["moved"],
                                          "pass": ranks <= TOL and one <= TOL and single["moved"] > 20 * TOL}
                ok = all(c["pass"] for c in res["cases"].values())
                res["status"] = "pass" if ok else "fail"
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    print(f"\n### DDP equivalence, 2 processes vs 1 ({'NCCL' if args.device == 'cuda' else 'gloo'}, {args.device})\n")
    if res["status"] in ("skipped", "failed"):
        print(f"{res['status']}: {res['reason'].strip().splitlines()[-1] if res['reason'].strip() else ''}")
    else:
        print("| case | max diff rank 0 vs 1 | max diff vs one process | weights moved | pass |")
        print("|---|---:|---:|---:|---|")
        for name, c in res["cases"].items():
            print(f"| {name} | {c['max_diff_ranks']:.2e} | {c['max_diff_single']:.2e} | {c['moved']:.2e} | "
                  f"{'yes' if c['pass'] else 'NO'} |")
        print(f"\nTolerance {TOL:g}; float64 weights (tests/test_ddp.py).")
    print(f"\n(total {res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
