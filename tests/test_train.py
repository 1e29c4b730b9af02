"""The trainer: determinism, non-finite guard, resume after a real kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.methods import METHODS
from pipeline.methods.base import Method
from pipeline.training.train import NonFiniteLossError, batch_plan, budget_steps, cosine_lr, epoch_steps, fit

from .methods_fixtures import context, single_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def train(name: str, steps: int = 4, seed: int = 0, **kw) -> Method:
    ctx = context(reference=True, seed=seed)
    m = METHODS[name](METHODS[name].Hparams(), ctx)
    fit(m, ctx.train_set, steps=steps, batch_size=6, seed=seed, device=torch.device("cpu"),
        progress=False, **kw)
    return m


@pytest.mark.parametrize("name", ["ft", "dive"])
def test_same_seed_same_weights(name):
    a, b = train(name).trained_state(), train(name).trained_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_seed_different_weights():
    a, b = train("ft", seed=0).trained_state(), train("ft", seed=1).trained_state()
    assert any(not torch.equal(a[k], b[k]) for k in a)


class ExplodingFT(METHODS["ft"]):
    def loss(self, batch, step):
        terms = super().loss(batch, step)
        if step == 2:
            terms["ce_loss"] = terms["ce_loss"] * float("nan")
        return terms


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    ctx = context()
    m = ExplodingFT(ExplodingFT.Hparams(), ctx)
    with pytest.raises(NonFiniteLossError, match="step 2.*ce_loss"):
        fit(m, ctx.train_set, steps=5, batch_size=6, seed=0, device=torch.device("cpu"),
            progress=False, checkpoint_dir=tmp_path, checkpoint_every=100)
    assert not (tmp_path / "last.pt").exists()


def test_batch_plan_has_no_duplicates_and_covers_epochs():
    plan = batch_plan(10, 4, steps=6, seed=0)
    assert all(len(b) == 4 and len(set(b)) == 4 for b in plan)
    small = batch_plan(3, 8, steps=2, seed=0)
    assert all(sorted(b) == [0, 1, 2] for b in small)
    assert batch_plan(10, 4, 6, seed=0) == plan


# budget_steps' docstring: batch 32, 15 epochs, bounded by [30, 300]
@pytest.mark.parametrize("n, steps", [(8, 30), (128, 60), (4000, 300)])
def test_budget_steps_documented_examples(n, steps):
    assert budget_steps(n, 32, 15.0, 30, 300) == steps


@pytest.mark.parametrize("n, batch, epochs, multiple, steps", [
    (128, 32, 2.5, 1, 10),    # 4 steps per epoch × 2.5
    (128, 32, 0.3, 1, 2),     # 1.2 steps: rounded up to whole steps
    (960, 32, 0.1, 1, 3),     # 30 × 0.1 = 3.0000000000000004 in floats: still 3, not 4
    (100, 32, 15.0, 3, 45),   # batch rounded down to 30 (3 processes): 3 steps per epoch
    (10, 32, 4.0, 4, 4),      # set smaller than the batch: 8 of 10 per batch, 1 step per epoch
    (100, 32, 15.0, 1, 45),   # the last partial batch (4 of 100) is dropped: 3 steps per epoch
])
def test_budget_steps_fractional_epochs_and_multiples(n, batch, epochs, multiple, steps):
    assert budget_steps(n, batch, epochs, 1, 10_000, multiple) == steps


def test_budget_steps_bounds():
    assert budget_steps(128, 32, 0.01, 5, 300) == 5       # min_steps
    assert budget_steps(128, 32, 1000.0, 5, 300) == 300   # max_steps
    assert budget_steps(128, 32, 15.0, 60, 60) == 60      # min = max: a fixed budget
    assert epoch_steps(3, 8, multiple=4) == 0             # no batch fits: only the bound remains
    assert budget_steps(3, 8, 15.0, 30, 300, multiple=4) == 30


@pytest.mark.parametrize("n, batch, epochs, multiple", [
    (8, 32, 15.0, 1), (128, 32, 15.0, 1), (4000, 32, 15.0, 1), (128, 32, 2.5, 1), (100, 32, 15.0, 3),
])
def test_batch_plan_yields_the_budget(n, batch, epochs, multiple):
    steps = budget_steps(n, batch, epochs, 30, 300, multiple)
    plan = batch_plan(n, batch, steps, seed=0, multiple=multiple)
    assert len(plan) == steps
    per_batch = min(batch, n) - min(batch, n) % multiple
    assert all(len(b) == per_batch and len(set(b)) == per_batch for b in plan)


def test_an_epoch_of_the_budget_is_a_pass_of_the_batch_plan():
    """Unbounded, `epochs` = 3 over 128 samples in batches of 32 sees every sample 3 times."""
    steps = budget_steps(128, 32, 3.0, 1, 10_000)
    assert steps == 3 * epoch_steps(128, 32) == 12
    seen = torch.bincount(torch.tensor([i for b in batch_plan(128, 32, steps, seed=4) for i in b]))
    assert seen.tolist() == [3] * 128


def test_cosine_schedule():
    assert cosine_lr(0, 10, 2) == pytest.approx(0.5)
    assert cosine_lr(1, 10, 2) == pytest.approx(1.0)
    assert cosine_lr(2, 10, 2) == pytest.approx(1.0)
    assert cosine_lr(9, 10, 2) < 0.05


SCRIPT = r'''
import sys, time
import pipeline
import torch
from safetensors.torch import save_file
from tests.methods_fixtures import context
from pipeline.methods import METHODS
from pipeline.training.train import fit

torch.set_num_threads(1)
name, ckpt, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ctx = context(reference=True)
m = METHODS[name](METHODS[name].Hparams(), ctx)
fit(m, ctx.train_set, steps=12, batch_size=6, seed=0, device=torch.device("cpu"), progress=False,
    checkpoint_dir=None if ckpt == "-" else __import__("pathlib").Path(ckpt), checkpoint_every=3,
    log=lambda step, rec: time.sleep(delay))
save_file({k: v.contiguous() for k, v in m.trained_state().items()}, out)
'''


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ft", "dive"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, name):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ckpt = tmp_path / "ckpt"
    # uninterrupted reference
    subprocess.run([sys.executable, str(script), name, "-", str(tmp_path / "ref.safetensors"), "0"],
                   check=True, env=env, cwd=ROOT)
    # a run that is killed (SIGKILL, no chance to clean up) once a checkpoint exists
    proc = subprocess.Popen([sys.executable, str(script), name, str(ckpt), str(tmp_path / "x.safetensors"), "0.5"],
                            env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not (ckpt / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert (ckpt / "last.pt").exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "x.safetensors").exists()
    step_at_kill = torch.load(ckpt / "last.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 12
    # resume to the end
    subprocess.run([sys.executable, str(script), name, str(ckpt), str(tmp_path / "resumed.safetensors"), "0"],
                   check=True, env=env, cwd=ROOT)
    ref = load_file(str(tmp_path / "ref.safetensors"))
    got = load_file(str(tmp_path / "resumed.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_one_weight_decay_rule_and_one_schedule():
    """Fine-tuning and pre-training share `pipeline.training.optim`: no decay on tensors with
    ndim < 2; linear warm-up then cosine to 0."""
    from torch import nn

    from pipeline.training.optim import decay_groups, scheduled_lr

    layer = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = decay_groups(layer.named_parameters(), 0.1, lr_scale=2.0)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 3]  # the weight; bias, LN gain, LN bias
    assert all(g["lr_scale"] == 2.0 for g in groups)
    assert decay_groups([], 0.1) == []
    lrs = [scheduled_lr(1e-3, s, 10, 4) for s in range(10)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] < 1e-4
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert scheduled_lr(1e-3, 0, 1, 5) == pytest.approx(1e-3)  # warm-up never exceeds the run
