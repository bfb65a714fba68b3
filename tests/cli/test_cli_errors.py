"""Bad input through the CLI: one line naming the problem and the fix, exit status 2, no
traceback, and the files of another run in the same place left byte-identical."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from normbench.config.checks import check_text_file
from normbench.config.explain import GROUPS, options_with_key, schema_of_option
from normbench.config.schema import SCHEMAS, TrainConfig
from normbench.config.tree import conf_dir, config_options
from normbench.data import dataset_builder
from normbench.engine.optim import optimizer_function, schedule_function
from normbench.errors import UserError
from normbench.paths import check_output_dir
from tests.helpers.common import TINY, run_cli
from tests.helpers.images import write_imagefolder

# Where the download of a dataset would go: a closed local port, i.e. no network.
OFFLINE = {key: "http://127.0.0.1:9" for key in
           ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def text_dataset(path: Path, context: int = 64) -> list[str]:
    """Overrides selecting a text dataset read from `path` with a given context length."""
    return ["dataset=text", f"dataset.path={path}", f"dataset.seq_len={context}"]


def make_files(root: Path) -> dict[str, Path]:
    files = {"empty": root / "empty.txt", "binary": root / "blob.bin",
             "short": root / "short.txt", "a_file": root / "a_file"}
    files["empty"].write_bytes(b"")
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["short"].write_text("To be, or not to be.\n")
    files["a_file"].write_text("a plain file, where a folder would have to be")
    (root / "no_cifar_here").mkdir()
    files["images"] = root / "images"
    write_imagefolder(files["images"])  # 3 classes x 4 images in train/ and in val/
    return files


# id, overrides (with {placeholders} filled from the files above), words the line must hold
CASES = [
    ("unknown-dataset", ["dataset=cifar11"], ["unknown dataset 'cifar11'", "cifar10, cifar100"]),
    ("unknown-model", ["model=resnett"], ["unknown model 'resnett'", "resnet"]),
    ("unknown-option-asked-for-by-a-preset", ["experiment=stat_gap", "gap_setup=lstm"],
     ["unknown gap_setup 'lstm'", "lstm_text"]),
    ("unknown-norm", ["norm=btach"], ["unknown norm 'btach'", "did you mean norm=batch",
                                     "use one of: batch, batch_renorm, dyt, frn, group"]),
    ("misspelled-key", ["batch_szie=4"], ["unknown config key 'batch_szie'", "batch_size"]),
    ("batch-size-zero", ["batch_size=0"], ["batch_size=0 must be a positive integer"]),
    ("lr-negative", ["lr=-0.1"], ["lr=-0.1 must be a positive number"]),
    ("sweep-without-multirun", ["norm=batch,group"], ["needs multirun mode", "add -m"]),
    ("multirun-with-cfg", ["-m", "norm=batch,group", "--cfg", "job"],
     ["-m with --cfg", "leave out -m"]),
    ("swept-key-overruled", ["-m", "experiment=lr_sweep", "lr=0.1"],
     ["lr_factor=0.125 and lr_factor=0.25 give the same job", "lr_factor=..."]),
    ("interval-sweep", ["-m", "lr=interval(0.1,0.2)"],
     ["an interval sweep needs a sweeper that samples", "lr=0.1,0.2,0.4"]),
    ("resnet-depth-not-6n-plus-2", ["model.depth=21"], ["6n+2"]),
    ("batchnorm-batch-1", ["norm=batch", "batch_size=1"],
     ["norm=batch with batch_size=1", "norm=group"]),
    ("groups-do-not-divide", ["norm=group", "norm.num_groups=3"],
     ["num_groups=3 does not divide", "16 channels of 'stem.1', 'blocks.0.norm1'",
      "64 channels of 'blocks.2.norm1', 'blocks.2.norm2' (7 layers", "[1, 2, 4, 8, 16]"]),
    # 32 divides the 32 and 64 channels of the later stages: only the first stage is named.
    ("group-size-does-not-divide", ["norm=group", "norm.group_size=32"],
     ["norm.group_size=32 does not divide the 16 channels of 'stem.1', 'blocks.0.norm1', "
      "'blocks.0.norm2' (3 layers", "choose norm.group_size from [1, 2, 4, 8, 16]"]),
    ("group-size-and-num-groups", ["norm=group", "norm.num_groups=4", "norm.group_size=4"],
     ["norm.num_groups=4 and norm.group_size=4 are both set", "norm.num_groups=null"]),
    ("group-norm-without-a-count", ["norm=group", "norm.num_groups=null"],
     ["neither norm.num_groups nor norm.group_size"]),
    ("cifar-offline", ["dataset=cifar10", "dataset.root={no_cifar_here}"],
     ["cifar10 is not in", "could not be downloaded", "cifar-10-python.tar.gz"]),
    ("text-empty", ["TEXT:{empty}"], ["is empty", "dataset.path"]),
    ("text-binary", ["TEXT:{binary}"], ["is a binary file"]),
    ("text-shorter-than-context", ["TEXT:{short}"],
     ["holds 21 characters, fewer than the context of 64"]),
    ("unwritable-output", ["hydra.run.dir={a_file}/run"],
     ["cannot create the output folder", "is a file", "hydra.run.dir"]),
    ("resume-without-checkpoint", ["hydra.run.dir=runs/fresh", "resume=true"],
     ["resume=true but", "holds no checkpoint"]),
    ("another-runs-folder", ["hydra.run.dir=runs/sibling"],
     ["already holds the checkpoints of a run", "resume=true"]),
    ("sweep-folder-with-checkpoints", ["-m", "norm=batch,group", "hydra.sweep.dir=old_sweep"],
     ["the sweep folder old_sweep already holds runs with checkpoints", "resume=auto"]),
    ("impossible-pair", ["dataset.kind=text"], ["model=resnet cannot read text data"]),
    # Keys outside the chosen option's schema: refused, naming where they came from and
    # which options have them.
    ("foreign-key", ["dataset=cifar10", "dataset.noise=0.1"],
     ["dataset.noise (from the command line) is not an option of dataset=cifar10",
      "it is an option of dataset=shapes"]),
    ("misspelled-group-key", ["dataset.noize=0.1"],
     ["dataset.noize (from the command line) is not an option of dataset=shapes",
      "did you mean dataset.noise"]),
    ("unread-key-command-line", ["optim=adamw", "+optim.nesterov=true"],
     ["optim.nesterov=true (from the command line) is not an option of optim=adamw",
      "it is an option of optim=sgd"]),
    ("unread-key-image-folder", ["experiment=batch_size_sweep", "dataset=imagefolder",
                                 "dataset.root={images}", "++dataset.noise=0.1"],
     ["dataset.noise=0.1 (from the command line) is not an option of dataset=imagefolder",
      "dataset=shapes"]),
    ("unread-key-from-a-preset", ["experiment=batch_size_sweep", "dataset=synthetic_text",
                                  "model=transformer"],
     ["dataset.image_size (from the preset setup=shapes_small) is not an option of "
      "dataset=synthetic_text", "leave dataset.image_size out of the preset"]),
    ("unread-key-schedule", ["sched=constant", "+sched.final_lr_frac=0.1"],
     ["sched.final_lr_frac=0.1 (from the command line) is not an option of sched=constant"]),
    ("unread-key-norm", ["norm=layer", "+norm.momentum=0.5"],
     ["norm.momentum=0.5 (from the command line) is not an option of norm=layer",
      "norm=batch"]),
    ("unread-top-level-key", ["+lr_warmup=5"],
     ["lr_warmup=5 (from the command line) is not a normbench setting"]),
    ("unread-key-in-a-sweep", ["-m", "norm=batch,layer", "+norm.num_groups=4"],
     ["norm.num_groups=4 (from the command line) is not an option of norm=batch",
      "norm=group"]),
    # Values of the wrong type, refused by the schema while composing.
    ("top-level-not-a-number", ["epochs=many"],
     ["epochs=many (from the command line) must be a number (or null)"]),
    # Numbers out of range.
    ("eps-negative", ["norm.eps=-1"], ["norm.eps=-1.0 must be a number, above 0"]),
    ("momentum-above-1", ["norm.momentum=1.5"],
     ["norm.momentum=1.5 must be a number, between 0 and 1 (or null)"]),
    ("num-groups-zero", ["norm=group", "norm.num_groups=0"],
     ["norm.num_groups=0 must be an integer, 1 or more"]),
    ("weight-decay-negative", ["optim.weight_decay=-0.1"],
     ["optim.weight_decay=-0.1 must be a number, 0 or more"]),
    ("sgd-momentum-1", ["optim=sgd", "optim.momentum=1.0"],
     ["optim.momentum=1.0 must be a number, at least 0 and below 1"]),
    ("optimizer-implementation-unknown", ["optim.implementation=fast"],
     ["optim.implementation=fast is not known", "auto, fused, foreach, for_loop"]),
    ("adamw-beta-1", ["optim=adamw", "optim.betas=[0.9,1.0]"],
     ["optim.betas[1]=1.0 must be a number, at least 0 and below 1", "optim.betas=[0.9,0.999]"]),
    ("warmup-above-1", ["sched.warmup_frac=1.5"],
     ["sched.warmup_frac=1.5 must be a number, between 0 and 1"]),
    ("final-lr-negative", ["sched.final_lr_frac=-0.1"], ["sched.final_lr_frac=-0.1 must be"]),
    ("milestones-decreasing", ["sched=step", "sched.milestones=[0.6,0.3]"],
     ["sched.milestones=[0.6,0.3] must increase: 0.3 follows 0.6", "sched.milestones=[0.333,"]),
    ("milestone-above-1", ["sched=step", "sched.milestones=[0.5,1.2]"],
     ["sched.milestones[1]=1.2 must be a number, above 0 and at most 1"]),
    ("n-train-zero", ["dataset.n_train=0"], ["dataset.n_train=0 must be an integer, 1 or more"]),
    ("n-val-not-a-number", ["dataset=cifar10", "dataset.n_val=lots"],
     ["dataset.n_val=lots (from the command line) must be an integer (or null)"]),
    ("noise-negative", ["dataset.noise=-0.1"], ["dataset.noise=-0.1 must be a number, 0 or more"]),
    ("seq-len-1", ["dataset=synthetic_text", "model=transformer", "dataset.seq_len=1"],
     ["dataset.seq_len=1 must be an integer, 2 or more"]),
    ("val-fraction-1", ["TEXT:{short}", "dataset.val_fraction=1.0"],
     ["dataset.val_fraction=1.0 must be a number, above 0 and below 1"]),
    ("eval-every-negative", ["eval_every=-5"], ["eval_every=-5 must be a whole number >= 0"]),
    ("batch-larger-than-n-train", ["dataset.n_train=16"],
     ["batch_size=32 is larger than dataset.n_train=16"]),
    # Writable by its permissions, but the filesystem makes no folder there (Linux's /proc).
    ("output-folder-the-system-refuses", ["hydra.run.dir=/proc/normbench_run"],
     ["cannot use the output folder /proc/normbench_run", "hydra.run.dir"]),
    ("override-without-a-key", ["=0.1"], ["'=0.1' has no key before its '='"]),
    ("seed-negative", ["seed=-1"], ["seed=-1 must be an integer, between 0 and 4294967295"]),
    ("threads-beyond-the-pool", ["threads=100000"],
     ["threads=100000 must be an integer, between 1 and 1024"]),
    ("run-folder-empty", ["hydra.run.dir="], ["hydra.run.dir is empty", "hydra.run.dir=runs/"]),
    ("sweep-without-a-job", ["-m", "norm=glob(zzz*)"], ["has no job: a swept key has no value"]),
    ("sweep-into-a-run-folder", ["-m", "seed=0,1", "hydra.sweep.dir=runs/sibling"],
     ["hydra.sweep.dir=runs/sibling is the folder of a run"]),
    ("model-beyond-memory", ["dataset=synthetic_text", "model=transformer", "model.depth=2",
                             "model.width=1000000"],
     ["model=transformer does not fit in the memory of", "model.width=1000000"]),
    ("device-unknown", ["device=tpu"], ["device=tpu is not a device", "cpu, cuda or cuda:N"]),
    ("flag-unknown", ["--frobnicate"], ["unknown option --frobnicate", "key=value"]),
    ("flag-misspelled", ["--cgf", "job"], ["unknown option --cgf", "did you mean --cfg?"]),
    ("cfg-kind-unknown", ["--cfg", "jobs"], ["--cfg takes one of job, hydra, all, not 'jobs'"]),
    # An in-memory dataset larger than any memory: the allocator refuses at once.
    ("dataset-beyond-memory", ["dataset.n_train=100000000"],
     ["dataset=shapes does not fit in the memory of", "dataset.n_train=100000000",
      "lower dataset.n_train"]),
    # Sizes checked once the data is there (inside the job, still one line and exit 2).
    ("n-train-above-available", ["dataset=imagefolder", "dataset.root={images}",
                                 "dataset.n_train=13", "batch_size=4"],
     ["dataset.n_train=13 is more than the 12 images in", "dataset.n_train=12 or fewer"]),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding a finished run (the sibling every case must leave alone)."""
    root = tmp_path_factory.mktemp("errors")
    result = run_cli("train", *TINY, "steps=2", "hydra.run.dir=runs/sibling", cwd=root)
    assert result.returncode == 0, result.stderr
    shutil.copytree(root / "runs" / "sibling", root / "old_sweep" / "0_job")
    return root, make_files(root)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def expand(overrides: list[str], files: dict[str, Path]) -> list[str]:
    """TINY settings plus the case's overrides; TINY's dataset.* keys belong to the default
    dataset, so they are left out where a case picks another."""
    picks_dataset = any(o.startswith(("dataset=", "TEXT:")) for o in overrides)
    out = [o for o in TINY if not (picks_dataset and o.startswith("dataset."))]
    for item in overrides:
        filled = item.format(**files, no_cifar_here=files["a_file"].parent / "no_cifar_here")
        out.extend(text_dataset(Path(filled[5:])) if filled.startswith("TEXT:") else [filled])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_line_and_exit_2(workspace, overrides, expected):
    root, files = workspace
    sibling = root / "runs" / "sibling"
    before = snapshot(sibling)
    assert "checkpoints/step_00000002.pt" in before and "summary.json" in before

    result = run_cli("train", *expand(overrides, files), cwd=root, env=OFFLINE)

    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("normbench: error: ") and "Fix: " in lines[0]
    for words in expected:
        assert words in lines[0], lines[0]
    assert snapshot(sibling) == before
    assert not (root / "runs" / "fresh").exists()  # refused before any folder was made


def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: nothing to refuse
            pytest.skip("a read-only mode does not stop this user from writing")
        with pytest.raises(UserError, match="is not writable"):
            check_output_dir(folder / "run")
    finally:
        folder.chmod(0o755)


def test_text_file_checks(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("ab\u00e9cd")  # 5 characters in 6 bytes
    check_text_file(good, context=4)  # 4 inputs + 1 target: exactly enough
    with pytest.raises(UserError, match="holds 5 characters, fewer than the context of 5"):
        check_text_file(good, context=5)
    with pytest.raises(UserError, match="does not exist"):
        check_text_file(tmp_path / "missing.txt", context=4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match="is not UTF-8 text"):
        check_text_file(latin1, context=4)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text with a \x00 inside")
    with pytest.raises(UserError, match="binary"):
        check_text_file(nul, context=4)


def test_text_length_is_counted_in_characters_not_bytes(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("x" + "\u00e9" * (1 << 20))  # 1M + 1 characters in 2M + 1 bytes
    check_text_file(path, context=1 << 20)  # 1M inputs + 1 target: exactly enough
    with pytest.raises(UserError, match=f"holds {(1 << 20) + 1} characters"):
        check_text_file(path, context=(1 << 20) + 1)


def test_every_shipped_config_file_sets_exactly_the_keys_of_its_schema():
    # The schema declares the keys and their types, the YAML file their values: a key in one
    # and not the other would be a value without a type, or a type without its one default.
    for group, schema, cls in SCHEMAS:
        files = [o for o in config_options(group) if schema_of_option(group, o) == schema]
        assert files, (group, schema)
        for option in files:
            keys = set(OmegaConf.load(conf_dir() / group / f"{option}.yaml")) - {"defaults"}
            if group == "norm":  # the schema is the norm's options dataclass: it holds the
                # defaults beside the types, and the YAML file only names the norm
                assert keys == {"name"}, option
                assert all(f.default not in (dataclasses.MISSING, MISSING)
                           for f in dataclasses.fields(cls) if f.name != "name"), option
                continue
            assert keys == {f.name for f in dataclasses.fields(cls)}, (group, option)
    for group in GROUPS:
        assert all(schema_of_option(group, o) for o in config_options(group)), group
    train = set(OmegaConf.load(conf_dir() / "train.yaml")) - {"defaults", "hydra"}
    assert train | set(GROUPS) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("group, lookup, fixed", [
    ("dataset", dataset_builder, {"name", "kind"}),
    # build_optimizer takes these four itself
    ("optim", optimizer_function, {"name", "weight_decay", "implementation", "default_lr"}),
    ("sched", schedule_function, {"name"}),
])
def test_every_schema_key_is_a_parameter_of_its_builder(group, lookup, fixed):
    # A key the schema accepts but the builder does not take would fail at run time.
    for option in config_options(group):
        cls = next(c for g, s, c in SCHEMAS if g == group and s == schema_of_option(group, option))
        params = set(inspect.signature(lookup(option)).parameters)
        assert {f.name for f in dataclasses.fields(cls)} - fixed <= params, (group, option)


def test_options_with_a_key_come_from_the_schemas():
    assert options_with_key("optim", "nesterov") == ["sgd"]
    assert options_with_key("optim", "betas") == ["adamw"]
    assert options_with_key("sched", "final_lr_frac") == ["cosine"]
    assert options_with_key("sched", "milestones") == ["step"]
    assert options_with_key("dataset", "noise") == ["shapes"]
    assert options_with_key("norm", "stats_batch") == ["batch", "batch_renorm"]
    assert options_with_key("dataset", "image_size") == ["cifar10", "cifar100", "imagefolder",
                                                         "shapes"]
