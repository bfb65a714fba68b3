"""`normbench inspect`: one table row per norm layer of the model `train` would build, the
footer's counts, and `train`'s one-line refusals (exit 2, nothing written)."""

from __future__ import annotations

import pytest

from normbench.cli import SUBCOMMANDS, main

# At 32 px (the plain run's shapes are 16 px): the shapes in the tables below are at 32.
TORCHVISION_RESNET18 = ["model=torchvision", "model.arch=resnet18", "dataset.image_size=32"]


@pytest.fixture
def inspect(tmp_path, monkeypatch, capsys):
    """Run `normbench inspect ARGS` in an empty folder: (exit status, stdout, stderr); the
    folder must still be empty afterwards."""
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> tuple[int, str, str]:
        status = main(["inspect", *args])
        out, err = capsys.readouterr()
        assert not list(tmp_path.iterdir()), "normbench inspect wrote to disk"
        return status, out, err

    return call


def table_rows(out: str) -> list[list[str]]:
    """The cells of the table's body rows (rich draws them between │ characters)."""
    return [[cell.strip() for cell in line.strip("│ ").split("│")]
            for line in out.splitlines() if line.startswith("│")]


def test_inspect_is_a_subcommand_in_the_help(capsys):
    assert "inspect" in SUBCOMMANDS
    assert main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out


def test_a_torchvision_resnet18_shows_its_20_norms_going_in_through_norm_layer(inspect):
    status, out, err = inspect(*TORCHVISION_RESNET18, "norm=group")
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 20
    assert [row[0] for row in rows] == [str(i) for i in range(1, 21)]
    assert rows[0][1:] == ["bn1", "64", "images", "(2, 64, 16, 16)",
                           "BatchNorm2d → ImageGroupNorm"]
    assert all(row[-1] == "BatchNorm2d → ImageGroupNorm" for row in rows)
    assert "norm layers: 20" in out
    assert "through the builder's norm_layer (20 layers)" in out
    # 20 GroupNorms with gamma and beta over 64, 128, 256, 512 channels (5 layers each)
    assert "9,600 in the norm layers (trainable)" in out
    assert "11,181,642 in all" in out
    assert "2 zero images of 3x32x32" in out


def test_native_keeps_the_models_batchnorm(inspect):
    status, out, err = inspect(*TORCHVISION_RESNET18, "norm=native")
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 20
    assert all(row[-1] == "BatchNorm2d (kept)" for row in rows)
    assert "norm=native: the model's own norms" in out


def test_convnext_mixes_norm_layer_and_replacement_and_both_layouts(inspect):
    status, out, err = inspect("model=torchvision", "model.arch=convnext_tiny", "norm=layer",
                          "dataset.image_size=32")
    assert status == 0, err
    rows = {row[1]: row for row in table_rows(out)}
    assert len(rows) == 23
    # stem: LayerNorm2d over C at each position, now layer over C,H,W on images
    assert rows["features.0.1"][2:] == ["96", "images", "(2, 96, 8, 8)",
                                        "LayerNorm2d → ImageLayerNorm"]
    # block: LayerNorm on (N, H, W, C), now over C per position with H*W positions as tokens
    assert rows["features.1.0.block.2"][2:] == ["96", "tokens", "(2, 8, 8, 96)",
                                                "LayerNorm → AsTokens(FeatureLayerNorm)"]
    assert "through the builder's norm_layer (5 layers); by replacing the norm modules " \
        "the builder made (18 layers)" in out


def test_a_builtin_model_lists_its_normbench_norms(inspect):
    status, out, err = inspect("setup=shapes")  # ResNet-20 with BatchNorm at 32 px
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 19
    assert rows[0][1:] == ["stem.1", "16", "images", "(2, 16, 32, 32)", "GhostBatchNorm2d"]
    assert "normbench's own model" in out and "images layout" in out

    status, out, err = inspect("model=lstm", "dataset=synthetic_text", "norm=layer")
    assert status == 0, err
    rows = {row[1]: row for row in table_rows(out)}
    assert set(rows) == {"layers.0.norm_x", "layers.0.norm_h", "layers.0.norm_c"}
    assert rows["layers.0.norm_h"][2:] == ["256", "steps", "(2, 256) per step",
                                           "FeatureLayerNorm"]
    assert "2 sequences of 48 zero tokens" in out


def one_line(status: int, out: str, err: str) -> str:
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normbench: error: "), err
    return lines[0]


def test_a_bad_arch_is_train_s_one_line_refusal(inspect):
    line = one_line(*inspect("model=torchvision", "model.arch=resnet1"))
    assert "model.arch=resnet1 is not a torchvision classification model" in line
    assert "did you mean resnet18" in line


@pytest.mark.parametrize("args, words", [
    (["norm=group", "norm.group_size=32"], "does not divide the 16 channels"),
    (["model=torchvision", "model.arch=vit_b_16"], "cannot take 16x16 images"),
    (["model=torchvision", "model.arch=vit_b_16", "model.kwargs.image_size=32"],
     "write +model.kwargs.image_size=32"),
    (["-m", "norm=batch,group"], "it shows the model of one job"),
    (["nrom=group"], "nrom"),
], ids=["group-size", "vit-size", "kwargs-without-plus", "multirun", "typo"])
def test_pre_flight_errors_are_one_line(inspect, args, words):
    assert words in one_line(*inspect(*args))
