"""The config tree's presets: every preset composes on every setup it is meant for, sweeps
expand to the intended jobs with the swept values in their folder names, the gap setups and
the tiny debug setting select what they say, and the HParams entry shows the swept keys."""

from __future__ import annotations

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from normbench.cli import preflight
from normbench.config.checks import check_config
from normbench.config.compose import PRIMARY, initialized
from normbench.config.compose import expand_sweep as expand
from normbench.config.resolvers import register_resolvers
from normbench.config.tree import conf_dir
from normbench.engine.dashboards import hparams_of, swept_settings, write_dashboards
from tests.helpers.common import compose_config
from tests.helpers.images import write_imagefolder

PRESETS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
SETUPS = sorted(p.stem for p in (conf_dir() / "setup").glob("*.yaml"))
# stat_gap's gap setups each pick their own scale: a setup= would override all three.
# landscape sweeps the ResNet's depth itself (a shallow and a deep one): its own test below.
SCALED_PRESETS = [p for p in PRESETS if p not in ("stat_gap", "landscape")]


def compose_full(overrides: list[str]):
    """The composed config with its `hydra` node, as a job of a sweep receives it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as the CLI's pre-flight expands the sweep (compose_jobs does
    the same, then composes each job; the tests compose only the jobs they look at)."""
    with initialized():
        plain = [o for o in overrides if "," not in o]
        base = compose(PRIMARY, overrides=plain, return_hydra_config=True)
        return expand(list(overrides), base)


def job_folder(job: list[str]) -> str:
    """A job's folder name after its number (hydra.sweep.subdir: <num>_<override_dirname>)."""
    return compose_full(job).hydra.job.override_dirname


def compose_job(job: list[str]) -> tuple[dict, str]:
    """A job's resolved config and its folder name after the number, from one composition."""
    full = compose_full(job)
    config = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    return OmegaConf.to_container(config, resolve=True), str(full.hydra.job.override_dirname)


# What each setup promises: (dataset, model, image_size or None for text, depth (or a
# torchvision model's arch), epochs, base_lr).
SETUP_SCALES = {
    "shapes_small": ("shapes", "resnet", 16, 8, 18, 0.2),
    "shapes": ("shapes", "resnet", 32, 20, 10, 0.1),
    "cifar10": ("cifar10", "resnet", 32, 20, 15, 0.1),
    "cifar100": ("cifar100", "resnet", 32, 20, 15, 0.1),
    "imagefolder": ("imagefolder", "resnet", 32, 20, 15, 0.1),
    "text_char": ("synthetic_text", "transformer", None, 2, 10, 1e-3),
    "tinyshakespeare": ("tinyshakespeare", "transformer", None, 2, 5, 1e-3),
    "text": ("text", "transformer", None, 2, 5, 1e-3),
    "cifar10_resnet18": ("cifar10", "torchvision", 32, "resnet18", 30, 0.025),
    "shapes_resnet18": ("shapes", "torchvision", 32, "resnet18", 10, 0.025),
    "imagenet": ("imagefolder", "torchvision", 224, "resnet50", 90, 0.0125),
}
# Recipe and scale keys belong to the setups: a preset that set one would override every setup.
SETUP_KEYS = {"dataset", "model", "optim", "epochs", "steps", "lr", "base_lr", "base_batch_size"}


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
    """The files the setups that read local data need: an image folder and a text file."""
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "images", per_class=2)
    (root / "corpus.txt").write_text("To be, or not to be: that is the question.\n" * 40)
    return {"imagefolder": [f"dataset.root={root / 'images'}"],
            "imagenet": [f"dataset.root={root / 'images'}"],
            "text": [f"dataset.path={root / 'corpus.txt'}"]}


def test_every_setup_is_listed():
    assert sorted(SETUP_SCALES) == SETUPS


@pytest.mark.parametrize("preset, setup", list(itertools.product(SCALED_PRESETS, SETUPS)))
def test_every_preset_composes_and_checks_on_every_setup(preset, setup, data_paths):
    # The first job of the preset's grid on this setup: composed and checked as a job
    # (strict keys included), so a setup that sets a key its dataset/model does not read
    # fails here; and the job trains at the setup's scale with the setup's recipe.
    job = expand_sweep([f"experiment={preset}", f"setup={setup}", *data_paths.get(setup, [])])[0]
    full = compose_full(job)
    config, _ = compose_job(job)
    check_config(config)
    assert full.hydra.runtime.choices.setup == setup
    dataset, model, image_size, size, epochs, base_lr = SETUP_SCALES[setup]
    model_size = config["model"].get("depth", config["model"].get("arch"))
    assert (config["dataset"]["name"], config["model"]["name"], model_size) == \
        (dataset, model, size)
    assert config["dataset"].get("image_size") == image_size
    assert (config["epochs"], config["steps"], config["base_lr"]) == (epochs, None, base_lr)
    factor = config["lr_factor"] or 1.0  # lr_sweep's grid: multiples of the setup's lr
    assert (factor == 1.0) == (preset != "lr_sweep")
    assert config["lr"] == pytest.approx(factor * base_lr * config["batch_size"] / 32)
    if setup == "shapes_small":
        assert (config["dataset"]["n_train"], config["dataset"]["n_val"]) == (2000, 1000)
    if setup.startswith("cifar"):
        assert (config["dataset"]["n_train"], config["dataset"]["n_val"]) == (None, None)


@pytest.mark.parametrize("preset", SCALED_PRESETS)
def test_presets_take_the_small_shapes_setup_by_default_and_set_no_scale_keys(preset):
    config = compose_config([f"experiment={preset}"])
    assert compose_full([f"experiment={preset}"]).hydra.runtime.choices.setup == "shapes_small"
    assert (config["dataset"]["name"], config["model"]["name"]) == ("shapes", "resnet")
    written = OmegaConf.load(conf_dir() / "experiment" / f"{preset}.yaml")
    written_keys = SETUP_KEYS & set(written)
    if preset == "lr_sweep":  # its lr is a multiple of the setup's, not a value of its own
        lr = OmegaConf.to_container(written)["lr"]
        assert "${lr_factor}" in lr and "${base_lr}" in lr
        written_keys -= {"lr"}
    assert not written_keys, "the scale and the recipe are the setup's"
    overridden = {next(iter(d)).split("/")[-1] for d in written.get("defaults", [])
                  if isinstance(d, dict)}
    # The schedule too: a preset comes after the setup in the defaults list, so its choice
    # would replace setup=imagenet's step schedule.
    assert not {"dataset", "model", "optim", "sched"} & overridden


def test_setup_cifar10_gives_each_preset_resnet20_at_32px_with_its_epochs_and_lr():
    # The case: no hand overrides of image_size, depth, epochs or lr.
    stats = [compose_config(job) for job in expand_sweep(
        ["experiment=stats_batch_sweep", "setup=cifar10"])[:3]]
    for config in stats:
        assert (config["dataset"]["image_size"], config["model"]["depth"], config["epochs"],
                config["lr"], config["batch_size"]) == (32, 20, 15, 0.1, 32)
    jobs = expand_sweep(["experiment=batch_size_sweep", "setup=cifar10", "norm=batch", "seed=0"])
    lrs = {c["batch_size"]: c["lr"] for c in map(compose_config, jobs)}
    assert lrs == {2: 0.00625, 4: 0.0125, 8: 0.025, 16: 0.05, 32: 0.1}  # linear in the batch
    assert {compose_config(j)["epochs"] for j in jobs} == {15}
    # A value on the command line still wins over the setup's.
    given = compose_config(["experiment=stats_batch_sweep", "setup=cifar10", "epochs=6", "lr=0.05"])
    assert (given["epochs"], given["lr"]) == (6, 0.05)


def test_setup_cifar10_resnet18_is_torchvisions_resnet18_with_the_cifar_stem_and_its_recipe():
    stats = [compose_config(job) for job in expand_sweep(
        ["experiment=stats_batch_sweep", "setup=cifar10_resnet18"])[:3]]
    for config in stats:
        assert config["model"] == {"name": "torchvision", "arch": "resnet18", "kwargs": {},
                                   "cifar_stem": True}
        assert (config["dataset"]["name"], config["dataset"]["image_size"],
                config["dataset"]["n_train"]) == ("cifar10", 32, None)
        assert (config["epochs"], config["lr"], config["batch_size"]) == (30, 0.025, 32)
        assert (config["optim"]["name"], config["optim"]["momentum"],
                config["optim"]["weight_decay"], config["sched"]["name"]) == \
            ("sgd", 0.9, 5e-4, "cosine")
    jobs = expand_sweep(["experiment=batch_size_sweep", "setup=cifar10_resnet18", "norm=batch",
                         "seed=0"])
    lrs = {c["batch_size"]: c["lr"] for c in map(compose_config, jobs)}
    assert lrs == {2: 0.0015625, 4: 0.003125, 8: 0.00625, 16: 0.0125, 32: 0.025}
    # The offline twin: the same model and recipe on the generated shapes.
    shapes = compose_config(expand_sweep(["experiment=stats_batch_sweep",
                                          "setup=shapes_resnet18"])[0])
    assert {k: v for k, v in shapes.items() if k not in ("dataset", "epochs", "run_name")} == \
        {k: v for k, v in stats[0].items() if k not in ("dataset", "epochs", "run_name")}
    assert (shapes["dataset"]["name"], shapes["dataset"]["image_size"], shapes["epochs"]) == \
        ("shapes", 32, 10)
    assert preflight(["experiment=stats_batch_sweep", "setup=cifar10_resnet18", "seed=0"],
                     True) is not None


IMAGENET_RECIPE = {
    "model": {"name": "torchvision", "arch": "resnet50", "kwargs": {}, "cifar_stem": False},
    "optim": {"name": "sgd", "default_lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
              "implementation": "auto"},
    "sched": {"name": "step", "warmup_frac": pytest.approx(5 / 90),
              "milestones": pytest.approx([30 / 90, 60 / 90, 80 / 90], rel=1e-9), "gamma": 0.1},
}


def test_setup_imagenet_is_resnet50_at_224_px_with_goyal_et_al_s_recipe_in_every_preset(data_paths):
    root = data_paths["imagenet"]
    for preset in SCALED_PRESETS:
        for job in expand_sweep([f"experiment={preset}", "setup=imagenet", *root])[:3]:
            config = compose_config(job)
            assert {k: config[k] for k in IMAGENET_RECIPE} == IMAGENET_RECIPE, preset
            assert (config["dataset"]["name"], config["dataset"]["image_size"],
                    config["epochs"], config["steps"]) == ("imagefolder", 224, 90, None)
            factor = config["lr_factor"] or 1.0
            assert config["lr"] == pytest.approx(factor * 0.1 * config["batch_size"] / 256)
    jobs = expand_sweep(["experiment=batch_size_sweep", "setup=imagenet", *root, "norm=batch",
                         "seed=0"])
    lrs = {c["batch_size"]: c["lr"] for c in map(compose_config, jobs)}
    assert lrs == pytest.approx({b: 0.1 * b / 256 for b in (2, 4, 8, 16, 32)})
    # debug=tiny shortens the run and the data, not the model, the image size or the recipe.
    tiny = compose_config(["experiment=stats_batch_sweep", "setup=imagenet", *root, "debug=tiny"])
    assert {k: tiny[k] for k in IMAGENET_RECIPE} == IMAGENET_RECIPE
    assert (tiny["dataset"]["image_size"], tiny["steps"], tiny["epochs"],
            tiny["dataset"]["n_train"]) == (224, 6, None, 256)
    # The literal per-GPU version: lr 0.1 per 32 images per process, 0.1 per 256 on 8.
    per_gpu = compose_config(["setup=imagenet", *root, "batch_size=4", "base_lr=0.1"])
    assert per_gpu["lr"] == pytest.approx(0.1 * 4 / 32)


def test_a_setup_on_the_command_line_keeps_a_chosen_dataset():
    # experiment=stats_batch_sweep setup=cifar10 dataset=cifar100: CIFAR-100 at the
    # setup's scale, not the setup's own CIFAR-10.
    config = compose_config(["experiment=stats_batch_sweep", "setup=cifar10",
                             "dataset=cifar100"])
    assert (config["dataset"]["name"], config["model"]["depth"]) == ("cifar100", 20)
    assert preflight(["experiment=stats_batch_sweep", "setup=cifar10",
                      "dataset=cifar100", "seed=0"], True) is not None


@pytest.mark.parametrize("model, depth", [("resnet", 8), ("transformer", 8), ("lstm", 8),
                                          ("torchvision", None), ("timm", None)])
def test_setup_shapes_small_sizes_the_models_with_a_depth_and_takes_the_others(model, depth):
    # The depth is the setup's per model (conf/setup/model/): a model without one, such as
    # model=torchvision, composes with the setup (and the presets that pick it; the sweep
    # of test_external_models_run) instead of being refused.
    config = compose_config(["setup=shapes_small", f"model={model}"])
    check_config(config)
    assert config["model"].get("depth") == depth
    assert (config["dataset"]["image_size"], config["epochs"]) == (16, 18)
    if model == "resnet":  # the command line still wins
        assert compose_config(["setup=shapes_small", "model.depth=14"])["model"]["depth"] == 14


def test_both_lengths_null_is_one_line():
    from normbench.errors import UserError

    config = compose_config(["setup=shapes", "epochs=null"])
    with pytest.raises(UserError, match="steps and epochs are both null"):
        check_config(config)


# ----------------------------------------------------------------------------- end to end

def run_first_job(overrides, run_dir):
    """The sweep's first job, composed and checked as the CLI does and run in this process
    (so that a monkeypatched dataset checksum applies); its config.json and summary.json."""
    from normbench.engine.train import run_experiment

    config = compose_config(expand_sweep(overrides)[0])
    check_config(config)
    run_experiment(config, run_dir, live=False)
    return (json.loads((run_dir / "config.json").read_text()),
            json.loads((run_dir / "summary.json").read_text()))


# The setting's own image size and depth; only the length and the data are cut down.
TINY_BUDGET = ["steps=3", "epochs=null", "dataset.n_train=64", "dataset.n_val=32", "log_every=1",
               "precise_bn_batches=1", "seed=0"]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    from tests.helpers.images import install_cifar10_fixture

    root = tmp_path / "cache"
    install_cifar10_fixture(root, monkeypatch, n_per_batch=40)  # 200 training, 40 test images
    return root


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["stats_batch_sweep", "batch_size_sweep"])
def test_presets_run_on_cifar10_in_its_on_disk_format(preset, cifar_root, tmp_path):
    config, summary = run_first_job([f"experiment={preset}", "setup=cifar10",
                                     f"dataset.root={cifar_root}", "dataset.download=false",
                                     *TINY_BUDGET], tmp_path / "run")
    assert summary["status"] == "completed"
    assert (summary["dataset"], summary["n_train"], summary["n_val"]) == ("cifar10", 64, 32)
    assert (config["dataset"]["image_size"], config["model"]["depth"]) == (32, 20)
    assert config["lr"] == pytest.approx(0.1 * config["batch_size"] / 32)


@pytest.mark.slow
def test_setup_cifar10_resnet18_trains_on_cifar10_in_its_on_disk_format(cifar_root, tmp_path):
    config, summary = run_first_job(["experiment=stats_batch_sweep", "setup=cifar10_resnet18",
                                     f"dataset.root={cifar_root}", "dataset.download=false",
                                     *TINY_BUDGET], tmp_path / "run")
    assert summary["status"] == "completed"
    assert (summary["dataset"], summary["n_train"], summary["n_val"]) == ("cifar10", 64, 32)
    assert (config["model"]["arch"], config["model"]["cifar_stem"]) == ("resnet18", True)
    assert config["norm"]["stats_batch"] == 2  # the sweep's first job: ghost BN in torchvision's model


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["stats_batch_sweep", "batch_size_sweep"])
def test_presets_run_on_an_image_folder(preset, tmp_path):
    write_imagefolder(tmp_path / "images", per_class=24)  # 3 classes: 72 images per split
    config, summary = run_first_job([f"experiment={preset}", "setup=imagefolder",
                                     f"dataset.root={tmp_path / 'images'}", *TINY_BUDGET],
                                    tmp_path / "run")
    assert summary["status"] == "completed"
    assert (summary["dataset"], summary["n_train"]) == ("imagefolder", 64)
    assert (config["dataset"]["image_size"], config["model"]["depth"]) == (32, 20)


@pytest.mark.slow
def test_setup_imagenet_trains_resnet50_on_an_image_folder(tmp_path):
    # At 64 px (typed explicitly) for CPU time: the setup's 224 px is checked above.
    write_imagefolder(tmp_path / "images", per_class=24)
    config, summary = run_first_job(["experiment=stats_batch_sweep", "setup=imagenet",
                                     f"dataset.root={tmp_path / 'images'}",
                                     "dataset.image_size=64", *TINY_BUDGET], tmp_path / "run")
    assert summary["status"] == "completed"
    assert (summary["dataset"], summary["n_train"]) == ("imagefolder", 64)
    assert (config["model"]["arch"], config["sched"]["name"], config["norm"]["stats_batch"]) == \
        ("resnet50", "step", 2)


def test_stats_batch_sweep_is_bn_at_each_k_with_k_in_the_folder_names():
    jobs = expand_sweep(["experiment=stats_batch_sweep"])
    assert len(jobs) == 5 * 3
    configs, folders = zip(*(compose_job(job) for job in jobs), strict=True)
    assert {c["norm"]["name"] for c in configs} == {"batch"}
    assert sorted({c["norm"]["stats_batch"] for c in configs}) == [2, 4, 8, 16, 32]
    assert {c["batch_size"] for c in configs} == {32}  # the optimization batch is fixed
    folders = set(folders)
    assert len(folders) == len(jobs)
    assert "norm.stats_batch=8,norm=batch,seed=1" in folders


def test_stats_batch_references_are_gn_and_ln_once_per_seed_on_the_same_recipe():
    jobs = expand_sweep(["experiment=stats_batch_references"])
    assert sorted(job_folder(job) for job in jobs) == [
        f"norm={norm},seed={seed}" for norm in ("group", "layer") for seed in (0, 1, 2)]
    reference = compose_config(jobs[0])
    bn = compose_config(expand_sweep(["experiment=stats_batch_sweep"])[0])
    recipe = ("batch_size", "lr", "epochs", "dataset", "model", "optim", "sched")
    assert {k: reference[k] for k in recipe} == {k: bn[k] for k in recipe}


def test_other_presets_name_their_job_folders_by_the_swept_values():
    assert job_folder(expand_sweep(["experiment=batch_size_sweep"])[7]) == \
        "batch_size=16,norm=batch,seed=1"
    gap_folders = sorted(job_folder(j) for j in expand_sweep(["experiment=stat_gap"]))
    assert gap_folders[0] == "gap_setup=lstm_text,seed=0" and len(gap_folders) == 9
    # Bookkeeping and scale keys stay out of the name; the study is in multirun.yaml.
    assert job_folder(["experiment=lr_sweep", "setup=shapes", "debug=tiny", "resume=auto",
                       "lr=0.4", "seed=1"]) == "lr=0.4,seed=1"


@pytest.mark.slow
@pytest.mark.parametrize("overrides, norms, jobs", [
    (["experiment=batch_size_sweep", "norm=batch,group,batch_renorm,frn"],
     {"batch", "group", "batch_renorm", "frn"}, 4 * 5 * 2),
    (["experiment=stats_batch_sweep", "norm=batch,batch_renorm"], {"batch", "batch_renorm"},
     2 * 5 * 3),
    (["experiment=stats_batch_references", "norm=group,frn"], {"group", "frn"}, 2 * 3),
    (["experiment=lr_sweep", "norm=rms,dyt,weight"], {"rms", "dyt", "weight"}, 3 * 7 * 2),
    (["experiment=stat_gap", "norm=batch,power"], {"batch", "power"}, 2 * 3 * 3),
])
def test_presets_take_other_norms_from_the_command_line(overrides, norms, jobs):
    expanded = expand_sweep(overrides)
    assert len(expanded) == jobs
    assert {o.split("=")[1] for job in expanded for o in job if o.startswith("norm=")} == norms
    # the whole sweep passes the pre-flight: every job composed, checked, its model built
    assert preflight([*overrides, "debug=tiny"], True) is not None


def test_a_preset_refuses_a_norm_without_the_swept_option_in_one_line():
    # stats_batch is BatchNorm's: GroupNorm has no statistics batch to sweep
    from normbench.errors import UserError

    with pytest.raises(UserError) as err:
        preflight(["experiment=stats_batch_sweep", "norm=batch,group"], True)
    assert "stats_batch" in err.value.line() and "\n" not in err.value.line()


@pytest.mark.parametrize("gap_setup, dataset, model, optim", [
    ("resnet_images", "shapes", "resnet", "sgd"),
    ("transformer_text", "synthetic_text", "transformer", "adamw"),
    ("lstm_text", "synthetic_text", "lstm", "adamw"),
])
def test_gap_setup_selects_model_and_data(gap_setup, dataset, model, optim):
    config = compose_config(["experiment=stat_gap", f"gap_setup={gap_setup}"])
    assert (config["dataset"]["name"], config["model"]["name"], config["optim"]["name"],
            config["norm"]["name"]) == (dataset, model, optim, "batch")
    assert config["steps"] == 600 and config["epochs"] is None


def test_debug_tiny_is_the_tiny_setting_and_shrinks_a_preset():
    tiny = compose_config(["debug=tiny"])
    assert (tiny["dataset"]["n_train"], tiny["dataset"]["n_val"], tiny["model"]["depth"]) == \
        (256, 128, 8)
    assert {k: tiny[k] for k in ("batch_size", "steps", "epochs", "eval_every", "log_every")} == \
        {"batch_size": 32, "steps": 6, "epochs": None, "eval_every": 0, "log_every": 2}
    preset = compose_config(["experiment=stats_batch_sweep", "debug=tiny"])
    assert (preset["steps"], preset["epochs"], preset["dataset"]["n_train"]) == (6, None, 256)


# Each model's tiny depth: the smallest of its own (ResNet-8; the Transformer's and the
# LSTM's defaults), never one model's value on another.
TINY_DEPTH = {"resnet": 8, "transformer": 2, "lstm": 1}


@pytest.mark.parametrize("model", sorted(TINY_DEPTH))
def test_debug_tiny_gives_each_model_its_own_small_depth(model):
    assert compose_config([f"model={model}", "debug=tiny"])["model"]["depth"] == TINY_DEPTH[model]
    # also where a preset picked the model (the gap setups) and on text
    text = compose_config([f"model={model}", "dataset=synthetic_text", "debug=tiny"])
    assert text["model"]["depth"] == TINY_DEPTH[model]
    assert compose_config([f"model={model}"])["model"]["depth"] >= TINY_DEPTH[model]


@pytest.mark.parametrize("gap_setup, model", [("resnet_images", "resnet"),
                                               ("transformer_shakespeare", "transformer"),
                                               ("lstm_text", "lstm")])
def test_debug_tiny_follows_the_model_a_preset_chose(gap_setup, model):
    config = compose_config(["experiment=stat_gap", f"gap_setup={gap_setup}", "debug=tiny"])
    assert (config["model"]["name"], config["model"]["depth"]) == (model, TINY_DEPTH[model])
    assert config["steps"] == 6


DATASET_ARGS = {"imagefolder": ["dataset.root=IMAGES"],
                "text": ["dataset.path=TEXT", "model=transformer"],
                "tinyshakespeare": ["model=transformer"], "synthetic_text": ["model=lstm"]}


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml")))
def test_debug_tiny_works_with_every_dataset(dataset, tmp_path):
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    write_imagefolder(tmp_path / "images")
    args = [a.replace("IMAGES", str(tmp_path / "images")).replace("TEXT", str(tmp_path / "t.txt"))
            for a in DATASET_ARGS.get(dataset, [])]
    config = compose_config([f"dataset={dataset}", *args, "debug=tiny"])
    assert config["steps"] == 6 and config["batch_size"] == 32
    if "n_train" in config["dataset"]:
        assert (config["dataset"]["n_train"], config["dataset"]["n_val"]) == (256, 128)
    check_config(config)


@pytest.mark.slow
def test_debug_tiny_trains_on_a_text_file_without_dropping_keys(tmp_path):
    from normbench.engine.train import run_experiment
    from tests.helpers.common import FIXTURES

    config = compose_config(["dataset=text", f"dataset.path={FIXTURES / 'sonnets.txt'}",
                             "dataset.seq_len=32", "model=transformer", "norm=layer", "debug=tiny",
                             "probes=false"])
    check_config(config)
    summary = run_experiment(config, tmp_path / "run", live=False)
    assert summary["status"] == "completed" and summary["steps"] == 6


@pytest.mark.slow
def test_debug_overfit_repeats_one_batch_and_drives_the_loss_down(tmp_path):
    from normbench.engine.train import run_experiment
    from tests.helpers.common import read_scalars

    config = compose_config(["debug=overfit", "optim=sgd", "model.depth=8", "batch_size=16", "steps=20",
                             "log_every=1", "dataset.n_train=64", "dataset.n_val=32",
                             "probes=false", "precise_bn_batches=0"])
    assert (config["overfit_batches"], config["epochs"]) == (1, None)
    assert compose_config(["debug=overfit"])["steps"] == 100
    summary = run_experiment(config, tmp_path / "run", live=False)
    losses = [value for _, value in read_scalars(tmp_path / "run")["train/loss"]]
    assert summary["status"] == "completed" and len(losses) == 20
    assert losses[-1] < losses[0] / 10, losses  # one batch of 16 images, memorized


def test_repeated_batches_are_the_same_tensors_and_resume_in_the_cycle():
    from normbench.data.sampling import RepeatedBatches

    stream = iter(range(100))
    repeated = RepeatedBatches(stream, 3)
    assert [next(repeated) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert repeated.steps_per_epoch == 3 and next(stream) == 3  # drew k batches, no more
    again = RepeatedBatches(iter(range(100)), 3)
    again.load_state_dict(repeated.state_dict())
    assert next(again) == next(repeated) == 1


def test_swept_settings_are_the_job_overrides_without_excluded_keys():
    exclude = list(compose_full([]).hydra.job.config.override_dirname.exclude_keys)
    swept = swept_settings(["seed=1", "experiment=stats_batch_sweep", "norm.stats_batch=8",
                            "debug=tiny", "+norm.eps=0.001"], exclude)
    assert swept == {"norm.eps": "0.001", "norm.stats_batch": "8", "seed": "1"}


def test_hparams_list_the_swept_keys_first_and_marked_as_differing(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    from torch.utils.tensorboard import SummaryWriter

    config = compose_config(["experiment=stat_gap", "gap_setup=lstm_text", "seed=2"])
    config["swept"] = {"gap_setup": "lstm_text", "model.hidden": "64", "seed": "2"}
    summary = {"dataset": "synthetic_text", "model": "lstm", "norm": "batch", "batch_size": 32,
               "stats_batch": 32, "lr": 1e-3, "seed": 2, "n_train": 4000}
    with SummaryWriter(tmp_path) as writer:
        write_dashboards(writer, hparams_of(summary, config), has_bn=True, has_norm=True,
                         has_saturation=True, swept=["gap_setup", "model.hidden", "seed"])
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    infos = [(info.name, info.differs) for info in experiment.hparam_infos]
    # TensorBoard's HParams table ticks the first five, differing ones first.
    assert infos[:3] == [("gap_setup", True), ("model.hidden", True), ("seed", True)]
    assert not any(differs for _, differs in infos[3:])
    assert {"stats_batch", "norm", "optim"} <= {name for name, _ in infos}
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["gap_setup"].string_value == "lstm_text"  # a group choice, as written
    assert start.hparams["model.hidden"].number_value == 64  # read from the config
    assert start.hparams["seed"].number_value == 2


@pytest.mark.slow
def test_stats_batch_sweep_end_to_end_names_jobs_and_shows_k_in_hparams(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    result = cli("train", "-m", "experiment=stats_batch_sweep", "debug=tiny", "seed=0",
                 "norm.stats_batch=4,8", "hydra.sweep.dir=sweep")
    assert result.returncode == 0, result.stderr[-2000:]
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert folders == ["0_norm.stats_batch=4,norm=batch,seed=0",
                       "1_norm.stats_batch=8,norm=batch,seed=0"]
    for k, folder in zip((4, 8), folders, strict=True):
        run = tmp_path / "sweep" / folder
        summary = json.loads((run / "summary.json").read_text())
        assert summary["run_name"] == f"shapes-resnet-batch-bs32_{folder[2:]}"
        assert summary["stats_batch"] == k
        acc = EventAccumulator(str(run))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        shown = [info.name for info in experiment.hparam_infos if info.differs]
        assert shown == ["norm", "stats_batch", "seed"]
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["stats_batch"].number_value == k


def test_text_conditions_sweep_in_the_shakespeare_gap_setups_with_short_folder_names():
    jobs = expand_sweep(["experiment=stat_gap", "gap_setup=transformer_shakespeare,lstm_shakespeare",
                         "dataset.unit=char,word", "dataset.sample=window,line", "seed=0"])
    configs, folders = zip(*(compose_job(job) for job in jobs), strict=True)
    assert len(set(folders)) == 8
    assert "dataset.sample=line,dataset.unit=word,gap_setup=lstm_shakespeare,seed=0" in folders
    assert {(c["model"]["name"], c["dataset"]["unit"], c["dataset"]["sample"]) for c in configs} \
        == {(m, u, s) for m in ("transformer", "lstm") for u in ("char", "word")
            for s in ("window", "line")}
    for c in configs:
        assert (c["dataset"]["name"], c["dataset"]["seq_len"], c["optim"]["name"], c["lr"],
                c["norm"]["name"], c["steps"]) == ("tinyshakespeare", 64, "adamw", 1e-3,
                                                   "batch", 600)


@pytest.mark.slow  # five pre-flights of whole sweeps
def test_an_image_folder_under_a_presets_small_setup_is_warned_about(tmp_path, monkeypatch, capsys):
    write_imagefolder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    root = f"dataset.root={tmp_path / 'images'}"
    preflight(["experiment=stats_batch_sweep", "dataset=imagefolder", root], True)
    line = capsys.readouterr().err.strip()
    assert line.startswith("normbench: warning: dataset=imagefolder trains at the scale of "
                           "setup=shapes_small") and "\n" not in line, line
    assert "dataset.image_size=16 (setup=imagefolder: 32)" in line and "add setup=imagefolder" in line
    # The setup named, the folder alone (no setup), or setups that agree: not a word.
    for overrides in (["experiment=stats_batch_sweep", "setup=imagefolder", root],
                      ["experiment=stats_batch_sweep", "setup=shapes_small", "dataset=imagefolder",
                       root],
                      ["dataset=imagefolder", root],
                      ["experiment=stats_batch_sweep", "dataset=shapes"]):
        preflight(overrides, True)
        assert capsys.readouterr().err == "", overrides
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing written


# on a setup other than its own (the default shapes_small: each job checked in test_sweep.py)
@pytest.mark.parametrize("setup", ["cifar10"])
def test_landscape_preset_sweeps_norms_and_two_depths_at_one_lr_with_the_probes_on(setup):
    jobs = expand_sweep(["experiment=landscape", f"setup={setup}"])
    configs = [compose_job(job)[0] for job in jobs]
    for config in configs:
        check_config(config)
    grid = {(c["norm"]["name"], c["model"]["depth"], c["seed"]) for c in configs}
    assert grid == set(itertools.product(["batch", "group", "layer", "none"], [8, 32], [0, 1]))
    assert len({c["lr"] for c in configs}) == 1  # one learning rate for every norm and depth
    assert all(c["why"][p]["every"] > 0 for c in configs
               for p in ("landscape", "ics", "hessian", "similarity"))
    skipinit = [compose_job(job)[0] for job in expand_sweep(
        ["experiment=landscape", f"setup={setup}", "norm=none", "model.residual_init=zero"])]
    assert {(c["norm"]["name"], c["model"]["residual_init"]) for c in skipinit} == {("none", "zero")}
    assert {c["lr"] for c in skipinit} == {configs[0]["lr"]}
