"""End to end on your own data: the default methods through `dvc repro` on a custom CSV dataset,
then on the same images as a folder tree (`<folder>/<domain>/<class>/<image>`), made here as
real PNG files; official-style metrics, the ID / OOD split by domain, the MLflow runs; and the
stages read from the image cache give the metrics they give from the original files."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.e2e_project import ROOT, copy_pipeline, init_and_repro, sh

pytestmark = pytest.mark.slow

CLASSES = ("cat", "dog", "fox")
ID_DOMAINS = ("clinic_a", "clinic_b")
OOD_DOMAINS = ("clinic_c",)
METHODS = ("lp", "ft", "flyp", "dive")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    work = tmp_path_factory.mktemp("custom")
    env = copy_pipeline(work)
    # the images: a colour per class (so something is learnable), a brightness per domain
    data = work / "mydata"
    rng = np.random.default_rng(0)
    rows = []
    for d, domain in enumerate(ID_DOMAINS + OOD_DOMAINS):
        for c, label in enumerate(CLASSES):
            (data / "tree" / domain / label).mkdir(parents=True)
            for i in range(10):  # larger than the model's 32 px and not square: resize and crop both act
                pixels = np.zeros((32, 44, 3)) + 40 + 30 * d
                pixels[8:24, 12:32, c] = 220
                img = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(data / "tree" / domain / label / f"{i}.png")
                rows.append(f"tree/{domain}/{label}/{i}.png,{label},{domain}")
    (data / "images.csv").write_text("path,label,domain\n" + "\n".join(rows) + "\n")
    (data / "captions.csv").write_text("filepath,title\n" + "\n".join(
        f"{r.split(',')[0]},a photo of a {r.split(',')[1]}" for r in rows) + "\n")
    # random tiny-clip weights as a local file (the offline rule: weights come from a file)
    sh([sys.executable, "-c", "import sys; from pipeline import models; c = models.create('tiny-clip'); "
        "from pathlib import Path; models.save_state_dict(c.model.state_dict(), Path(sys.argv[1]))", str(data / "weights.safetensors")], work, env)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update({
        "dataset": {"name": "custom", "root": "data/wilds", "download": False},
        "model": {"arch": "tiny-clip", "pretrained": "mydata/weights.safetensors"},
        "reference": {"csv": "mydata/captions.csv", "separator": ",", "max_samples": 40},
        "prepare": {"custom": {"csv": "mydata/images.csv", "id_domains": list(ID_DOMAINS),
                               "ood_domains": list(OOD_DOMAINS), "templates": ["a photo of a {c}."]}},
        "embed": {**params["embed"], "iimm_samples": 40},
        "sample": {"levels": [2], "seeds": [0]},
    })
    params["finetune"]["methods"] = list(METHODS)
    params["finetune"]["trials"] = {f"{m}-a": {"method": m} for m in METHODS}
    params["finetune"]["search"] = {}
    params["finetune"]["train"].update(epochs=1.0, min_steps=4, max_steps=4, batch_size=6, checkpoint_every=2)
    params["evaluate"].update(rsa_samples=20)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_and_repro(work, env, ignore="mlflow.db\nmlruns/\nmydata/\n")
    return work, env, params


def _check_run(work: Path) -> None:
    for m in METHODS:
        metrics = json.loads((work / "runs/evaluate" / m / "2/seed0/metrics.json").read_text())
        for split in ("id_test", "test"):
            assert {f"{split}/acc_avg", f"{split}/F1-macro_all", f"{split}/acc_worst_domain"} <= metrics.keys()
            assert 0.0 <= metrics[f"{split}/acc_avg"] <= 1.0
        # ID splits hold the ID domains only, OOD splits the OOD domain only
        assert metrics["id_test/count_domain:clinic_a"] > 0 and metrics["id_test/count_domain:clinic_b"] > 0
        assert metrics.get("id_test/count_domain:clinic_c", 0) == 0
        assert metrics["test/count_domain:clinic_c"] > 0
        assert metrics.get("test/count_domain:clinic_a", 0) == 0 and metrics.get("test/count_domain:clinic_b", 0) == 0
    md = (work / "reports/summary.md").read_text()
    assert md.startswith("# Report: custom") and "No zero-shot retention task for custom" in md


def test_custom_csv_dataset_runs_every_default_method(project):
    work, env, _ = project
    _check_run(work)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("custom")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags.get("method") for r in runs} >= set(METHODS) | {"zeroshot"}
    info = json.loads((work / "data/prepared/dataset.json").read_text())
    assert info["n_classes"] == 3 and sum(info["splits"].values()) == 90


def _stage(work: Path, env: dict, *args: str) -> None:
    sh([sys.executable, f"stages/{args[0]}.py", *args[1:]], work, env)


def test_the_image_cache_gives_the_metrics_of_the_originals(project):
    """The same stages with `images.format: none` (reading the original files): LP (trained on
    features of the evaluation transform) gives bit-identical weights and evaluate the same
    metrics, exactly. FT's random crops come from the cached image instead of the original:
    the originals here (44x32) already have the model's 32-px shorter side, so the cache's
    resize step is the identity, the crops see the same pixels, and FT too is bit-identical,
    step by step (its losses) and in its weights and scores. (With larger originals the crops
    would differ by a resampling: `pipeline.data.imagecache`.)"""
    work, env, params = project
    run = lambda trial: work / "runs/finetune" / trial / "2/seed0"  # noqa: E731
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    cached = {"lp": (run("lp-a") / "weights.safetensors").read_bytes(), "ft": read(run("ft-a") / "scores.json"),
              "ft_log": (run("ft-a") / "train_log.csv").read_text(),
              "ft_weights": (run("ft-a") / "weights.safetensors").read_bytes(),
              "eval": read(work / "runs/evaluate/lp/2/seed0/metrics.json")}
    assert read(work / "data/images/index.json")["collections"]["main"]["images"] == 90
    original = (work / "params.yaml").read_text()
    # the resumable-state folders are persistent outputs DVC does not cache (so `dvc checkout`
    # cannot bring them back): kept aside and put back after the stages run by hand below
    shutil.copytree(work / "checkpoints", work.parent / f"{work.name}-checkpoints-kept", symlinks=True)
    (work / "params.yaml").write_text(yaml.safe_dump({**params, "images": {"format": "none"}}, sort_keys=False))
    try:
        for args in (("check",), ("images",), ("finetune", "--trial", "lp-a", "--level", "2"),
                     ("finetune", "--trial", "ft-a", "--level", "2")):
            _stage(work, env, *args)
        assert not list((work / "data/images").glob("*.bin"))  # nothing cached: the originals were read
        # (before evaluate, which refuses weights changed since the selection)
        assert (run("lp-a") / "weights.safetensors").read_bytes() == cached["lp"]
        _stage(work, env, "evaluate", "--method", "lp")
        metrics = read(work / "runs/evaluate/lp/2/seed0/metrics.json")
        same = [k for k in cached["eval"] if k.split("/")[0] in ("id_test", "test", "wise", "selected", "rsa", "zs")]
        assert len(same) > 50 and {k: metrics[k] for k in same} == {k: cached["eval"][k] for k in same}
        # every step's loss and gradient norm, then the weights and the scores they give
        assert (run("ft-a") / "train_log.csv").read_text() == cached["ft_log"]
        assert (run("ft-a") / "weights.safetensors").read_bytes() == cached["ft_weights"]
        assert read(run("ft-a") / "scores.json") == cached["ft"]
    finally:
        (work / "params.yaml").write_text(original)
        # the stages above rewrote outputs behind DVC's back: back to what dvc.lock records (else
        # `dvc repro` re-runs evaluate@lp: its MLflow record, a persistent output, keeps DVC from
        # restoring it out of the run cache)
        sh([sys.executable, "-m", "dvc", "checkout", "-f"], work, env)
        shutil.rmtree(work / "checkpoints")
        shutil.move(work.parent / f"{work.name}-checkpoints-kept", work / "checkpoints")


def test_the_same_images_as_a_folder_tree(project):
    """Read as a folder tree `<folder>/<domain>/<class>/<image>`, the same images make the same
    WILDS dataset, file for file."""
    work, env, params = project
    params["prepare"]["custom"] = {"folder": "mydata/tree", "id_domains": list(ID_DOMAINS),
                                   "ood_domains": list(OOD_DOMAINS)}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([sys.executable, "-m", "dvc", "repro"], work, env).stdout
    # the same images, labels, domains and splits: `prepare` writes the same dataset, so every
    # method's runs above are this dataset's, and nothing after `prepare` re-runs
    assert "Running stage 'prepare'" in out and "Stage 'embed' didn't change" in out, out
    assert "Running stage 'finetune" not in out and "Running stage 'evaluate" not in out, out
    _check_run(work)
    meta = (work / "data/prepared/wilds/custom_v1.0/metadata.csv").read_text()
    assert "mydata/tree/clinic_c/fox/9.png" in meta
