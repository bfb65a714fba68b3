"""The plain `normbench train norm=X`: one recipe for every norm, and it trains them.

scripts/default_runs.py measures every norm's run (docs/data.md keeps its table); here the
recipe is checked to be the same whatever the norm, and the hardest norm for it (DyT, whose
ResNet starts with the smallest signal) is trained once."""

from __future__ import annotations

import json

import pytest

from normbench.config.compose import compose_jobs
from normbench.models.external import NATIVE
from normbench.norms import norm_names
from tests.helpers.common import compose_config, run_cli

IMAGE_NORMS = [name for name in norm_names("images") if name != NATIVE]
# Everything but the norm itself: what a comparison of plain runs holds fixed.
RECIPE_KEYS = ("dataset", "model", "optim", "sched", "lr", "batch_size", "steps", "epochs",
               "seed", "precision")


def test_the_plain_run_is_one_recipe_for_every_norm():
    # composed as the jobs of one sweep, `normbench train -m norm=<all>`: one Hydra start
    jobs = compose_jobs([f"norm={','.join(IMAGE_NORMS)}"], multirun=True)
    recipes = {job["norm"]["name"]: {k: job[k] for k in RECIPE_KEYS} for job in jobs}
    assert sorted(recipes) == sorted(IMAGE_NORMS)
    first = recipes[IMAGE_NORMS[0]]
    assert len(IMAGE_NORMS) >= 11
    for name, recipe in recipes.items():
        assert recipe == first, name
    assert first["optim"]["name"] == "adamw" and first["lr"] == first["optim"]["default_lr"]
    assert (first["model"]["depth"], first["dataset"]["image_size"]) == (8, 16)


def test_the_lr_follows_the_optimizer_unless_given_or_scaled_by_a_setup():
    assert compose_config([])["lr"] == 0.002
    assert compose_config(["optim=sgd"])["lr"] == 0.1
    assert compose_config(["optim=sgd", "lr=0.03"])["lr"] == 0.03
    assert compose_config(["optim.default_lr=0.01"])["lr"] == 0.01
    # a setup's linear scaling wins over the optimizer's default
    assert compose_config(["setup=shapes_small", "batch_size=64"])["lr"] == pytest.approx(0.4)


def test_setup_shapes_keeps_resnet_20_on_5000_images_of_32_px():
    config = compose_config(["setup=shapes"])
    assert config["model"]["depth"] == 20
    assert (config["dataset"]["n_train"], config["dataset"]["image_size"]) == (5000, 32)
    assert config["optim"]["name"] == "sgd"


@pytest.mark.slow
def test_dyt_trains_well_above_chance_in_the_plain_run(tmp_path):
    """norm=dyt: at chance (0.10) in the previous plain run (SGD, 140 steps at batch 128),
    0.687 measured in this one."""
    run = tmp_path / "dyt"
    done = run_cli("train", "norm=dyt", f"hydra.run.dir={run}", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["val_acc"] >= 0.4
