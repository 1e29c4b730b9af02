"""bf16 against fp32 at θ = θ_pre: DiVE's regulariser and its gradient, and the losses of the
same features with and without autocast, on a real open_clip architecture (random weights).

    python benchmarks/check_precision.py                          # CPU: tiny-clip, bf16 autocast on CPU
    python benchmarks/check_precision.py --device cuda --arch ViT-B-16 --json out/precision.json

DiVE part. The reference cache is built the way the embed stage builds it
(`pipeline.models.encode.encode_images` / `encode_texts`: fp32, eval mode, no autocast). Then, at the
pre-trained weights, one DiVE loss (B' = all reference rows, λ = 1000, m = 0) is computed
as the trainer does, under bf16 autocast and without, and the gradient norms of
λ(AVL + PVL) and of the FLYP term are taken separately. Two paths:
- `method`: DiVE as implemented (`DiVE.embed`: under autocast the reference rows get their
  own fp32 forward with autocast off; in fp32 they share the target rows' batch);
- `ref-in-autocast`: the pre-fix forward (target and reference rows in one batch inside the
  step's autocast region, issue #17), to show what the rule prevents.
In fp32 the regulariser is zero up to the rounding difference between the embed stage's
eval-mode kernels and the training forward (~1e-7 per coordinate).

Loss part. Features from one bf16 forward of a target batch; each loss of those same
features in fp32 (autocast off) and inside bf16 autocast, with and without `fp32_loss`
(the unprotected call is the undecorated function: what the `.float()` casts alone gave).

Writes a JSON file (`--json`) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train as bt  # noqa: E402  (imports pipeline first)
import torch  # noqa: E402

from pipeline.models import losses  # noqa: E402
from pipeline.models.encode import encode_images, encode_texts  # noqa: E402
from pipeline.methods.base import EvalModel, ReferenceData  # noqa: E402
from pipeline.methods.common import image_features, text_features  # noqa: E402
from pipeline.methods.dive import DiVE, DiVEHparams  # noqa: E402


def build(args, device):
    model, tokenizer, size, _ = bt.build_model(args.arch, args.image_size, device)
    class_tokens = bt.class_tokens_for(tokenizer, args.classes)
    g = torch.Generator().manual_seed(1)
    ref_images = torch.randn(args.ref_rows, 3, size, size, generator=g)
    ref_tokens = tokenizer([f"a picture of thing {i} next to thing {i + 1}" for i in range(args.ref_rows)])
    # the embed stage's cache: fp32, eval mode, no autocast
    ev = EvalModel(model).eval()
    image_pre = encode_images(ev, ref_images, device).float()
    text_pre = encode_texts(ev, ref_tokens, device).float()
    ctx = bt.make_context(model, class_tokens, device)
    ctx.reference = ReferenceData(images=list(ref_images), tokens=ref_tokens, image_pre=image_pre, text_pre=text_pre)
    method = DiVE(DiVEHparams(lam=args.lam, ref_batch_size=args.ref_rows), ctx)
    method.setup()
    method.root.to(device)
    method.root.train()
    data = bt.make_data(args.batch_size, size, args.classes, seed=2)
    batch = {"image": data.images.to(device), "y": data.labels.to(device), "index": torch.arange(args.batch_size, device=device)}
    return method, batch, size


def norm(grads) -> float:
    return float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads if gr is not None)))


def one_pass(method, images, tokens, rows, device):
    """The pre-fix DiVE forward: target and reference rows in one batch per tower, inside
    whatever autocast region the step runs in (bf16 reference rows under bf16 autocast)."""
    ref, model = method.ctx.reference, method.ctx.model
    ref_images = torch.stack([torch.as_tensor(ref.images[int(j)]) for j in rows]).to(device)
    n = images.shape[0]
    f = image_features(model, torch.cat([images, ref_images.to(images.dtype)]))
    g = text_features(model, torch.cat([tokens, ref.tokens[rows].to(device)]))
    return f[:n], g[:n], f[n:], g[n:]


def dive_row(method, batch, device, bf16: bool, path: str) -> dict:
    params = [p for p in method.root.parameters() if p.requires_grad]
    method.extra["avg"].m.zero_()
    seen = {}
    own = method.embed

    def spy(images, tokens, rows, dev):
        out = own(images, tokens, rows, dev) if path == "method" else one_pass(method, images, tokens, rows, dev)
        seen["rows"], seen["f"], seen["g"] = rows, out[2].detach(), out[3].detach()
        return out

    method.embed = spy
    try:
        torch.manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms = method.loss(batch, 0)
    finally:
        del method.embed  # the class's method again
    ref, rows = method.ctx.reference, seen["rows"]
    u, v = losses.difference_vectors(seen["f"], seen["g"], ref.image_pre[rows], ref.text_pre[rows])
    reg = terms["avl_loss"] + terms["pvl_loss"]
    g_reg = torch.autograd.grad(reg, params, retain_graph=True, allow_unused=True)
    g_flyp = torch.autograd.grad(terms["flyp_loss"], params, allow_unused=True)
    return {"precision": "bf16" if bf16 else "fp32", "path": path, "reg": float(reg.detach()),
            "avl": float(terms["avl_loss"].detach()), "pvl": float(terms["pvl_loss"].detach()),
            "u_norm_max": float(u.norm(dim=1).max()), "v_norm_max": float(v.norm(dim=1).max()),
            "grad_reg": norm(g_reg), "grad_flyp": norm(g_flyp)}


def loss_rows(method, batch, device) -> list[dict]:
    model = method.ctx.model
    from pipeline.methods.common import sample_class_prompts

    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        f = image_features(model, batch["image"])
        g = text_features(model, sample_class_prompts(method.ctx.class_tokens, batch["y"]))
        head = text_features(model, method.ctx.class_tokens[:, 0].to(device))
    y = batch["y"]
    scale = torch.tensor(100.0, device=device)
    m = (f - g).mean(0) / 2
    def dive_reg(u, v, m):
        return losses.average_vector_loss(u, v, m) + losses.pairwise_vector_loss(u, v)

    dive_reg.__wrapped__ = lambda u, v, m: (losses.average_vector_loss.__wrapped__(u, v, m)
                                            + losses.pairwise_vector_loss.__wrapped__(u, v))
    cases = {
        "clip_loss (FLYP)": (losses.clip_loss, (f, g, scale)),
        "mpm_nce_loss": (losses.mpm_nce_loss, (f, g, y, 0.01)),
        "classification_loss": (losses.classification_loss, (f, 100.0 * head, y)),
        # element-wise: autocast leaves it alone either way (shown for completeness)
        "DiVE AVL + PVL": (dive_reg, (0.01 * f, 0.01 * g, 0.01 * m)),
    }
    rows = []
    for name, (fn, inputs) in cases.items():
        raw = getattr(fn, "__wrapped__", None)
        with torch.no_grad():
            ref = float(fn(*inputs))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                got = float(fn(*inputs))
                bare = float(raw(*inputs)) if raw is not None else float("nan")
        rows.append({"loss": name, "fp32": ref, "autocast": got, "rel_diff": abs(got - ref) / abs(ref),
                     "autocast_unprotected": bare, "rel_diff_unprotected": abs(bare - ref) / abs(ref)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny-clip")
    p.add_argument("--image-size", type=int, default=0, help="force_image_size (0 = the config's)")
    p.add_argument("--batch-size", type=int, default=16, help="target batch")
    p.add_argument("--ref-rows", type=int, default=8, help="reference rows (= B')")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lam", type=float, default=1000.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args, device = bt.start(argv, parse_args)
    t0 = time.perf_counter()
    method, batch, size = build(args, device)
    dive = [dive_row(method, batch, device, bf16, path)
            for path in ("method", "ref-in-autocast") for bf16 in (False, True)]
    loss = loss_rows(method, batch, device)
    res = {"arch": args.arch, "image_size": size, "device": device.type, "machine": bt.machine(device),
           "batch_size": args.batch_size, "ref_rows": args.ref_rows, "lam": args.lam, "dive": dive,
           "losses": loss, "seconds": time.perf_counter() - t0}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    print(f"\n### Precision at θ_pre: {args.arch} @ {size} px, {device.type}, target batch {args.batch_size}, "
          f"B' = {args.ref_rows}, λ = {args.lam:g}\n")
    print("| path | precision | λ(AVL+PVL) | max ‖u‖ | max ‖v‖ | ‖∇ λ(AVL+PVL)‖ | ‖∇ FLYP‖ |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in dive:
        print(f"| {r['path']} | {r['precision']} | {r['reg']:.3g} | {r['u_norm_max']:.3g} | {r['v_norm_max']:.3g} | "
              f"{r['grad_reg']:.3g} | {r['grad_flyp']:.3g} |")
    print("\n| loss of the same features | fp32 | bf16 autocast | rel. diff | autocast without fp32_loss | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in loss:
        print(f"| {r['loss']} | {r['fp32']:.6g} | {r['autocast']:.6g} | {r['rel_diff']:.2g} | "
              f"{r['autocast_unprotected']:.6g} | {r['rel_diff_unprotected']:.2g} |")
    print(f"\n(total {res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
