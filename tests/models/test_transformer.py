"""The Transformer: causality, BatchNorm over real tokens only, images as patches, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normbench.data import Batch, DataInfo, build_dataset
from normbench.engine.train import run_experiment
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import TokenBatchNorm, norm_names
from tests.helpers.common import FIXTURES, compose_config, read_scalars
from tests.helpers.config_defaults import model_options, norm_spec

TEXT = DataInfo(kind="text", num_classes=11, seq_len=12)
IMAGE = DataInfo(kind="image", num_classes=5, in_channels=3, image_size=16)
SONNETS = FIXTURES / "sonnets.txt"  # a few KB of real English
SMALL = model_options("transformer", depth=2, width=16, heads=2, patch_size=4)


def transformer(norm: str, info: DataInfo = TEXT, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model({**SMALL, **kw}, norm_spec(norm, num_groups=4), info)


def tokens(n=4, t=12, seed=0):
    return torch.randint(0, TEXT.num_classes, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("norm", norm_names("tokens"))
def test_causal_in_eval_mode(norm, position):
    model = transformer(norm, norm_position=position)
    if norm == "batch":  # give the running statistics something other than their init
        model.train()
        model(tokens(seed=1))
    model.eval()
    x = tokens()
    k = 7
    changed = x.clone()
    changed[:, k] = (changed[:, k] + 1) % TEXT.num_classes
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :k], b[:, :k])  # nothing before position k sees the change
    assert not torch.allclose(a[:, k:], b[:, k:])  # ... while position k itself does


def test_batchnorm_in_training_mode_breaks_causality():
    """With norm=batch in training mode the statistics are means over *all* tokens of the
    batch, future ones included: changing token k shifts every feature's batch mean and
    variance, so outputs at positions before k change too. Position t's prediction can
    then peek at later tokens through the statistics (information leaks, slightly, from
    the future). In eval mode the running statistics are fixed and causality holds."""
    model = transformer("batch").train()
    x = tokens()
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TEXT.num_classes
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert (a[:, :9] - b[:, :9]).abs().max() > 1e-6


def padded_batch():
    x = tokens(n=4, t=12, seed=2)
    lengths = torch.tensor([12, 5, 9, 3])
    mask = torch.arange(12) < lengths[:, None]
    return x, mask


def test_token_batchnorm_statistics_come_from_real_tokens_only():
    x, mask = padded_batch()
    feats = torch.randn(4, 12, 6) * 3 + 1
    feats[~mask] = 1000.0  # padding with wild values must not matter
    bn = TokenBatchNorm(6).train()
    ref = nn.BatchNorm1d(6).train()
    y = bn(feats, mask)
    y_ref = ref(feats[mask])  # BN over only the real tokens, as a (n_real, D) batch
    torch.testing.assert_close(y[mask], y_ref)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_padding_changes_no_real_output_with_batchnorm_in_training(position):
    model = transformer("batch", norm_position=position).train()
    x, mask = padded_batch()
    other = x.clone()
    other[~mask] = (other[~mask] + 3) % TEXT.num_classes  # different padding tokens
    a = model(x, mask=mask)
    b = model(other, mask=mask)
    torch.testing.assert_close(a[mask], b[mask])
    # Without the mask the padding enters the statistics and real outputs move.
    assert not torch.allclose(model(x)[mask], model(other)[mask])


def test_pre_and_post_norm_layouts():
    pre, post = transformer("layer"), transformer("layer", norm_position="post")
    norms = lambda m: [n for n, mod in m.named_modules() if isinstance(mod, nn.LayerNorm)]  # noqa: E731
    assert norms(pre) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2",
                          "norm_f"]
    assert norms(post) == norms(pre)[:-1]  # the last block's norm feeds the head


def test_linear_layers_before_no_norm_keep_their_bias():
    model = transformer("none")
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))


def test_images_as_patches_give_class_logits_and_see_the_whole_image():
    model = transformer("layer", IMAGE).eval()
    x = torch.randn(3, 3, 16, 16)
    out = model(x)
    assert out.shape == (3, IMAGE.num_classes)
    assert model.context == 16  # (16 / 4) ** 2 patches
    changed = x.clone()
    changed[:, :, -4:, -4:] += 1  # the last patch: not causal, so every output moves
    assert not torch.allclose(model(changed), out)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="model.heads=3 does not divide model.width=16"):
        transformer("layer", heads=3)
    with pytest.raises(UserError, match="model.context=8 is shorter than dataset.seq_len=12"):
        transformer("layer", context=8)
    with pytest.raises(UserError, match=r"norm.num_groups=4 does not divide.*'blocks.0.norm1'"):
        build_model({**SMALL, "width": 18, "heads": 2}, norm_spec("group", num_groups=4), TEXT)


def test_resnet_on_text_names_the_pairs_that_work():
    with pytest.raises(UserError) as e:
        build_model(model_options("resnet"), norm_spec("batch"), TEXT)
    line = e.value.line()
    assert "model=resnet cannot read text data" in line
    assert "model=transformer with text/image datasets" in line and "model=lstm" in line


@pytest.mark.slow
def test_cli_rejects_an_impossible_pair_in_one_line(cli):
    result = cli("train", "model=resnet", "dataset=synthetic_text")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read text data" in lines[0]
    assert "Traceback" not in result.stderr


TINY_TEXT = ["dataset=synthetic_text", "dataset.n_train=256", "dataset.n_val=64",
             "dataset.seq_len=48", "batch_size=16", "steps=30", "log_every=5", "eval_every=0",
             "eval_batch_size=64", "optim=adamw", "lr=1e-2"]


@pytest.mark.slow
@pytest.mark.parametrize("norm", norm_names("tokens"))
def test_every_norm_trains_on_synthetic_text(tmp_path, norm):
    config = compose_config(["model=transformer", f"norm={norm}", *TINY_TEXT,
                             "model.width=32", "model.depth=1"])
    summary = run_experiment(config, tmp_path, live=False)
    losses = [v for _, v in read_scalars(tmp_path)["train/loss"]]
    assert summary["status"] == "completed"
    assert losses[-1] < losses[0] - 0.3, losses
    assert 0 < summary["final"]["val_bpc"] < 5


@pytest.mark.slow
def test_post_norm_trains_and_batchnorm_gaps_are_logged(tmp_path):
    config = compose_config(["model=transformer", "norm=batch", "model.norm_position=post",
                             *TINY_TEXT, "model.width=32", "model.depth=1"])
    run_experiment(config, tmp_path, live=False)
    scalars = read_scalars(tmp_path)
    losses = [v for _, v in scalars["train/loss"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert "bn_gap/dmu/blocks.0.norm1" in scalars and "bn_gap/dvar/blocks.0.norm2" in scalars


def test_real_batches_feed_the_model_with_masks():
    ds = build_dataset("synthetic_text", n_train=64, n_val=16, seq_len=48)
    model = build_model({**SMALL, "width": 16}, norm_spec("batch"), ds.info)
    batch: Batch = next(ds.train_loader(16, seed=0))
    assert batch.mask is not None
    logits = model(batch.x, mask=batch.mask)
    assert logits.shape == (*batch.x.shape, ds.info.num_classes)


@pytest.mark.slow
def test_trains_on_a_real_text_file(tmp_path):
    config = compose_config(["model=transformer", "norm=layer", "dataset=text",
                             f"dataset.path={SONNETS}", "dataset.seq_len=32",
                             "dataset.val_fraction=0.1", "batch_size=16", "steps=30",
                             "log_every=5", "eval_every=0", "eval_batch_size=256",
                             "optim=adamw", "lr=1e-2", "model.width=32", "model.depth=1"])
    summary = run_experiment(config, tmp_path, live=False)
    losses = [v for _, v in read_scalars(tmp_path)["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    vocab = len(set(SONNETS.read_text()))
    assert summary["final"]["val_bpc"] < 4.5 < math.log2(vocab)  # well below the uniform guess


@pytest.mark.slow
def test_vit_trains_on_shapes_images(tmp_path):
    config = compose_config(["model=transformer", "norm=batch", "dataset=shapes",
                             "dataset.n_train=64", "dataset.n_val=32", "dataset.image_size=16",
                             "batch_size=16", "steps=3", "log_every=1", "eval_every=0",
                             "model.width=16", "model.depth=1"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed" and 0 <= summary["final"]["val_acc"] <= 1
    assert "bn_gap/dmu/blocks.0.norm1" in read_scalars(tmp_path)


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["layer", "none", "weight"])
def test_zero_residual_init_gates_each_branch_at_zero(norm, position):
    """model.residual_init=zero: each block computes x (pre-norm) or norm2(norm1(x))
    (post-norm) at init, whatever its branches hold; default has no gates at all."""
    model = transformer(norm, norm_position=position, residual_init="zero").train()
    h = torch.randn(3, 12, 16)
    for block in model.blocks:
        assert block.attn_gate.item() == 0.0 and block.mlp_gate.item() == 0.0
        with torch.no_grad():
            expected = h if position == "pre" else block.norm2(block.norm1(h))
            assert torch.equal(block(h), expected)
    plain = dict(transformer(norm, norm_position=position).named_parameters())
    gated = dict(model.named_parameters())
    assert not any(name.endswith("_gate") for name in plain)
    # The same seed draws the same weights: the gates are the only difference.
    assert {n for n in gated if not n.endswith("_gate")} == set(plain)
    assert all(torch.equal(p, plain[n]) for n, p in gated.items() if not n.endswith("_gate"))


def test_skipinit_is_zero_for_the_transformer_and_unknown_values_are_user_errors():
    zero = transformer("layer", residual_init="zero")
    skip = transformer("layer", residual_init="skipinit")
    assert all(torch.equal(a, b) for a, b in zip(zero.parameters(), skip.parameters(), strict=True))
    with pytest.raises(UserError, match="model.residual_init=rezero is not known"):
        transformer("layer", residual_init="rezero")
