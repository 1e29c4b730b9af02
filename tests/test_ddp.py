"""Distributed training: 2-process DDP on CPU (gloo, launched with torchrun) gives the same
trained weights as one process with the same global batch and seed, for FLYP (features
gathered across ranks with gradients), DiVE (plus the reference losses and the average
vector m averaged across ranks) and every other method that draws random numbers in its
loss: R-Adapter (per-sample drop masks and prompt templates; shared drop draws for the
class head of `loss: ce`) and BitFit / A-CLIP / LoRA (templates drawn for the training
head); BitFit with its class-prompt head encoded
in chunks under activation checkpointing; only rank 0 writes checkpoints and logs. LP, FT, LP-FT and CLIP-Adapter draw nothing
in their losses; FTP (FT with a projection after each step, from the averaged gradients) and Model
Stock (two FT runs, the second under a derived seed, merged) are checked for what they add.

Why the weights can match exactly (up to float summation order): the global batch of each
step is the same list of indices in both runs (`batch_plan`); rank r takes `mb[r::world]` of
every micro-batch; the contrastive loss is computed on every rank over the gathered (whole)
batch, whose order is a permutation of the single-process batch, and the CLIP loss is
invariant to a permutation applied to both towers; `gather`'s backward sums each rank's
gradient for its slice and `average_gradients` divides by the world size; random draws in
the loss come from the RNG the trainer seeds per step and micro-batch, identically on every
rank: per-sample draws (template per image, drop mask per sample) are made for the whole
micro-batch and each rank keeps its own positions (`common.per_row`), shared draws (the
reference batch, a class head's templates and drop masks) are the same on every rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pipeline  # noqa: F401
import pytest
import torch

from pipeline.methods import METHODS
from pipeline.methods.base import BaseHparams, Method, TaskContext
from pipeline.training.train import fit
from tests import methods_fixtures as mf
from tests.methods_fixtures import single_thread  # noqa: F401  (autouse)

REPO = Path(__file__).resolve().parents[1]

# name -> (method, hparam overrides, fit settings). Sizes chosen so that some slices are
# uneven where the code allows it: DiVE's reference batch of 5 splits 3 / 2 over 2 ranks.
CASES = {
    "flyp": ("flyp", {"lr": 3e-4, "warmup_steps": 0}, {"steps": 3, "batch_size": 8}),
    "flyp_accum": ("flyp", {"lr": 3e-4, "warmup_steps": 1}, {"steps": 3, "batch_size": 8, "grad_accum": 2}),
    "dive": ("dive", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 4, "lam": 10.0, "momentum": 0.5},
             {"steps": 3, "batch_size": 8}),
    "dive_uneven_ref": ("dive", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 5, "lam": 10.0},
                        {"steps": 2, "batch_size": 6}),
    # a global batch of 7 cannot be split over 2 ranks: DDP trains on 6 (a single process
    # with batch 6 is the reference) instead of failing in the all-gather
    "flyp_batch7": ("flyp", {"lr": 3e-4, "warmup_steps": 0}, {"steps": 2, "batch_size": 7}),
    # every other method that draws random numbers in its loss. R-Adapter: per-sample drop
    # masks (p = 0.5, so that a mask repeated across ranks shows) and prompt templates; with
    # `loss: ce` the class head's rows, the same on every rank, take shared drop draws
    "radapter": ("radapter", {"lr": 1e-2, "warmup_steps": 0, "drop": 0.5, "ema_momentum": 0.5},
                 {"steps": 3, "batch_size": 8}),
    "radapter_ce_accum": ("radapter", {"lr": 1e-2, "warmup_steps": 0, "drop": 0.5, "ema_momentum": 0.5,
                                       "loss": "ce"}, {"steps": 2, "batch_size": 8, "grad_accum": 2}),
    "dive_accum": ("dive", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 4, "lam": 10.0, "momentum": 0.5},
                   {"steps": 2, "batch_size": 8, "grad_accum": 2}),
    # BitFit / A-CLIP / LoRA: templates per class drawn for the training head (shared)
    "bitfit": ("bitfit", {"lr": 1e-3, "warmup_steps": 0, "head_templates": 1}, {"steps": 2, "batch_size": 8}),
    "aclip": ("aclip", {"lr": 3e-4, "warmup_steps": 0, "head_templates": 1}, {"steps": 2, "batch_size": 8}),
    "lora": ("lora", {"lr": 1e-2, "warmup_steps": 0, "head_templates": 1}, {"steps": 2, "batch_size": 8}),
    # CLIP-LoRA: dropout on the LoRA branch's input, one mask per sample across ranks (p = 0.5,
    # so that a mask repeated across ranks shows); the text tower's draws are shared
    "clip_lora": ("clip_lora", {"lr": 1e-2, "dropout": 0.5}, {"steps": 2, "batch_size": 8}),
    # the prompt-CE head in chunks of one prompt under activation checkpointing (the budget
    # below fits less than one prompt): every rank encodes every class, chunked alike
    "bitfit_chunked": ("bitfit", {"lr": 3e-4, "warmup_steps": 0}, {"steps": 3, "batch_size": 8}),
    # both towers and the logit scale against every class prompt (templates drawn per class: shared)
    "prompt_ce": ("prompt_ce", {"lr": 3e-4, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
    # issue 28's baselines: DiVE's reference sampler (FLYP+replay gathers its reference rows: an
    # even split; SnD weights uneven slices), Lipsum-FT's random texts (seeded by seed and step),
    # CLIPood's Beta average (kept by every rank), each also under grad_accum where it has a rule
    "flyp_replay": ("flyp_replay", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 4, "lam_r": 2.0},
                    {"steps": 3, "batch_size": 8}),
    "flyp_replay_accum": ("flyp_replay", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 4},
                          {"steps": 2, "batch_size": 8, "grad_accum": 2}),
    "snd_uneven_ref": ("snd", {"lr": 3e-4, "ref_batch_size": 5, "r_pre": 50.0}, {"steps": 3, "batch_size": 8}),
    "lipsum_ft": ("lipsum_ft", {"lr": 3e-4, "warmup_steps": 0, "n_texts": 7, "lam": 10.0},
                  {"steps": 3, "batch_size": 8}),
    "clipood": ("clipood", {"lr": 3e-4}, {"steps": 3, "batch_size": 8}),
    # ARF: FLYP+replay's reference rule over its retrieved pool (4 of the 7 references) plus the
    # caption term, gathered like FLYP's; CaRot: the EMA teacher's features gathered like the
    # student's (distillation from step 1; teacher updated after every step), the projection
    # terms once per step under grad_accum
    "arf": ("arf", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 2, "lam_c": 2.0, "retrieval_fraction": 0.5,
                    "retrieval_min_batches": 1}, {"steps": 3, "batch_size": 8}),
    "arf_accum": ("arf", {"lr": 3e-4, "warmup_steps": 0, "ref_batch_size": 4},
                  {"steps": 2, "batch_size": 8, "grad_accum": 2}),
    "carot": ("carot", {"lr": 3e-4, "warmup_steps": 0, "teacher_updates": 3, "beta_distill": 5.0},
              {"steps": 3, "batch_size": 8}),
    "carot_accum": ("carot", {"lr": 3e-4, "warmup_steps": 0, "teacher_updates": 3, "beta_distill": 5.0},
                    {"steps": 3, "batch_size": 8, "grad_accum": 2}),
    # issue 29's ViT methods: AdaptFormer's dropout, one mask per element of each sample's
    # bottleneck across ranks (p = 0.5); MaPLe's prompts through both towers, its class head
    # of every class encoded alike on every rank, in chunks of one prompt under checkpointing
    "adaptformer": ("adaptformer", {"lr": 0.5, "warmup_steps": 0, "dropout": 0.5, "bottleneck": 4},
                    {"steps": 3, "batch_size": 8}),
    "maple_chunked": ("maple", {"lr": 0.5, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
    # FTP's projection after the step (averaged gradients: every rank projects the same, its
    # radius learned from step 2 on), also under grad_accum; Model Stock's two runs (the second
    # with the derived seed) and their merge
    "ftp": ("ftp", {"lr": 1e-3, "warmup_steps": 0}, {"steps": 4, "batch_size": 8}),
    "ftp_accum": ("ftp", {"lr": 1e-3, "warmup_steps": 0}, {"steps": 3, "batch_size": 8, "grad_accum": 2}),
    "model_stock": ("model_stock", {"lr": 1e-3, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
    # issue 29's prompt methods: nothing random in the loss, every rank encodes every class
    # prompt (CoOp) or its own images' prompts (CoCoOp, the meta-net's shift per image); the
    # random context init and the meta-net init are seeded by the run's seed. SGD: a large lr
    # so that the two steps move the context well beyond the tolerance
    "coop": ("coop", {"lr": 0.5, "warmup_steps": 0, "n_ctx": 4}, {"steps": 2, "batch_size": 8}),
    "cocoop": ("cocoop", {"lr": 0.5, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
    "cocoop_chunked": ("cocoop", {"lr": 0.5, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
    # a new head on the vision-only backbone (created under the same seed on every rank)
    "vision_ft": ("vision_ft", {"lr": 3e-4, "warmup_steps": 0}, {"steps": 2, "batch_size": 8}),
}
SINGLE_BATCH = {"flyp_batch7": 6}
CONTEXT = {"bitfit_chunked": {"prompt_memory_bytes": 1}, "maple_chunked": {"prompt_memory_bytes": 1},
           "cocoop_chunked": {"prompt_memory_bytes": 1}}  # TaskContext fields per case
SEED = 3
TOL = 1e-5  # observed on CPU: < 2e-6 (float64 weights, float32 losses)


def _double(dataset) -> mf.ListDataset:
    def conv(x):
        return {k: _double_t(v) for k, v in x.items()} if isinstance(x, dict) else _double_t(x)
    return mf.ListDataset([conv(dataset[i]) for i in range(len(dataset))])


def _double_t(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def run_case(name: str, checkpoint_dir: Path | None = None, batch_size: int | None = None,
             device: torch.device = torch.device("cpu")) -> dict:
    """Train one case on the tiny model in this process (single or one DDP rank).

    In float64: Adam turns float32 rounding noise in a gradient that is exactly zero in
    exact arithmetic (the key bias of attention; at step 1 DiVE's u = v = 0) into a full
    lr-sized step of random sign, which would hide the comparison. In float64 that noise
    stays far below Adam's eps. DiVE starts from perturbed weights so that its reference
    losses act from the first step (the cached f_pre / g_pre stay the unperturbed ones).
    """
    method_name, overrides, settings = CASES[name]
    settings = {**settings, "batch_size": batch_size or settings["batch_size"]}
    cls = METHODS[method_name]
    model = mf.fresh_for(cls).double()  # built on the CPU; `fit` moves it to `device`
    ctx = mf.context(model, seed=SEED, reference=False)
    ctx.device = device
    ctx.train_set = _double(ctx.train_set)
    for key, value in CONTEXT.get(name, {}).items():
        setattr(ctx, key, value)
    if cls.needs_reference:
        ref = mf.reference_data(mf.fresh_model(), n=7)
        ref.images = _double(ref.images)
        ctx.reference = ref
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    torch.manual_seed(SEED)  # inserted modules (LoRA's A) start the same in every process
    method = cls(cls.Hparams(**overrides), ctx)
    method.setup()  # `fit` runs it again; every method's setup is idempotent
    method.extra.double()  # inserted modules (adapters, LoRA factors) in float64 too
    start = {k: v.clone() for k, v in method.trained_state().items()}
    logged = []
    result = fit(method, ctx.train_set, seed=SEED, device=device, progress=False,
                 checkpoint_dir=checkpoint_dir, checkpoint_every=1,
                 log=lambda step, rec: logged.append(step), **settings)
    state = {k: v.clone() for k, v in method.trained_state().items()}
    moved = max(float((v.double() - start[k].double()).abs().max()) for k, v in state.items())
    return {"state": state, "history": result.history, "logged": logged, "moved": moved}


class _RandomItems(torch.utils.data.Dataset):
    """Items carry a draw from the global RNG, as random augmentation does."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {"y": torch.tensor(0), "index": torch.tensor(i), "aug": torch.rand(())}


class _Probe(Method):
    """Records what each step saw: the items' augmentation draws and a draw in the loss."""

    name = "probe"

    def setup(self):
        self.seen = []

    def param_groups(self):
        return [{"named_params": [("w", self.ctx.model.weight)]}]

    def loss(self, batch, step):
        self.seen.append((batch["index"].tolist(), batch["aug"].tolist(), float(torch.rand(()))))
        return {"probe_loss": (self.ctx.model.weight * batch["aug"].mean()).sum()}


def run_probe(num_workers: int) -> list:
    model = torch.nn.Linear(2, 1, bias=False)
    ctx = TaskContext(model=model, class_tokens=torch.zeros(1, 1, 1, dtype=torch.long),
                      zeroshot_head=torch.zeros(1, 2), device=torch.device("cpu"))
    method = _Probe(BaseHparams(), ctx)
    fit(method, _RandomItems(), steps=3, batch_size=4, seed=SEED, device=torch.device("cpu"),
        num_workers=num_workers, progress=False)
    return method.seen


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import pipeline
    import torch
    from pipeline.core import dist
    from tests.test_ddp import run_case, run_probe

    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.set_num_threads(1)
    assert dist.init_from_env(torch.device("cpu")), "not started by torchrun"
    rank, world = dist.rank(), dist.world_size()
    for name in names:
        # a checkpoint folder per rank: only rank 0's may receive a file
        r = run_case(name, checkpoint_dir=out / name / f"ckpt_rank{rank}")
        torch.save({"state": r["state"], "history": r["history"], "logged": r["logged"],
                    "world": world}, out / name / f"rank{rank}.pt")
    torch.save({w: run_probe(w) for w in (0, 1)}, out / f"probe_rank{rank}.pt")
    dist.cleanup()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Every case under `torchrun --nproc_per_node 2` (one launch, ~20-40 s on 2 cores)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    for name in CASES:
        (out / name).mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(script), str(out), ",".join(CASES)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert set(a) == set(b)
    worst = max(a, key=lambda k: float((a[k].double() - b[k].double()).abs().max()))
    return float((a[worst].double() - b[worst].double()).abs().max()), worst


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_ddp_matches_single_process(name, ddp_runs):
    single = run_case(name, batch_size=SINGLE_BATCH.get(name))
    r0 = torch.load(ddp_runs / name / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_runs / name / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2

    # the training moved the weights by much more than the tolerance
    assert single["moved"] > 20 * TOL

    # the replicas stayed identical, and equal the single-process run
    diff, key = _max_diff(r0["state"], r1["state"])
    assert diff <= TOL, f"ranks diverged on {key}: {diff:.2e}"
    diff, key = _max_diff(r0["state"], single["state"])
    assert diff <= TOL, f"DDP != single process on {key}: {diff:.2e}"

    # the loss every rank reports is the single-process loss over the global batch
    for h_ddp, h_one in zip(r0["history"], single["history"], strict=True):
        for term, value in h_one.items():
            assert h_ddp[term] == pytest.approx(value, rel=1e-4, abs=1e-6), (h_ddp["step"], term)
    if name.startswith("dive"):  # the average vector m: same on every rank and as one process
        assert _max_diff({"m": r0["state"]["extra.avg.m"]}, {"m": single["state"]["extra.avg.m"]})[0] <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_only_rank0_writes(name, ddp_runs):
    steps = CASES[name][2]["steps"] * METHODS[CASES[name][0]].n_runs  # (numbered across a method's runs)
    r0 = torch.load(ddp_runs / name / "rank0.pt", weights_only=False)
    r1 = torch.load(ddp_runs / name / "rank1.pt", weights_only=False)
    assert (ddp_runs / name / "ckpt_rank0" / "last.pt").exists()  # checkpoint_every=1
    rank1_dir = ddp_runs / name / "ckpt_rank1"
    assert not rank1_dir.exists() or not any(rank1_dir.iterdir()), "rank 1 wrote a checkpoint"
    assert r0["logged"] == list(range(1, steps + 1))
    assert r1["logged"] == [], "the log callback ran on rank 1"


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_random_streams(num_workers, ddp_runs):
    """Augmentation draws (in this process or in DataLoader workers) differ between ranks;
    draws in the loss are the same on every rank and the same as in one process."""
    r0 = torch.load(ddp_runs / "probe_rank0.pt")[num_workers]
    r1 = torch.load(ddp_runs / "probe_rank1.pt")[num_workers]
    single = run_probe(num_workers)
    for (i0, aug0, loss0), (i1, aug1, loss1), (i, _, loss) in zip(r0, r1, single, strict=True):
        assert sorted(i0 + i1) == sorted(i) and not set(i0) & set(i1)
        assert not set(aug0) & set(aug1), "ranks drew the same augmentation"
        assert loss0 == loss1 == loss


def test_batch_plan_multiple_of_world():
    """A global batch that does not split evenly over the ranks is trimmed to a multiple of
    the world size (uneven slices cannot be gathered); in one process nothing changes."""
    from pipeline.training.train import batch_plan

    assert [len(b) for b in batch_plan(10, 7, 3, seed=0)] == [7, 7, 7]
    assert [len(b) for b in batch_plan(10, 7, 3, seed=0, multiple=2)] == [6, 6, 6]
    assert batch_plan(10, 7, 3, seed=0, multiple=2) == batch_plan(10, 6, 3, seed=0)
    assert batch_plan(10, 7, 3, seed=0, multiple=1) == batch_plan(10, 7, 3, seed=0)
    with pytest.raises(ValueError, match="cannot be split"):
        batch_plan(3, 8, 1, seed=0, multiple=4)
