"""The normalized LSTM: each norm against a direct computation, per-time-step BatchNorm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.data import DataInfo
from normbench.engine.train import run_experiment
from normbench.errors import UserError
from normbench.models import build_model
from normbench.models.lstm import LSTM
from normbench.norms import StepBatchNorm, TimeBatchNorm, norm_names
from normbench.probes.monitor import Probes
from tests.helpers.common import compose_config, read_scalars
from tests.helpers.config_defaults import model_options, norm_spec

TEXT = DataInfo(kind="text", num_classes=7, seq_len=6)
H = 8


def lstm(norm: str, info: DataInfo = TEXT, **kw) -> LSTM:
    torch.manual_seed(0)
    options = model_options("lstm", hidden=H, embed=5, depth=1, **kw)
    return build_model(options, norm_spec(norm, num_groups=2), info)


def randomize_norm_params(model: nn.Module) -> None:
    """Norm gains and shifts away from their init, so the references must apply them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "weight" in name else 0))


def layer_norm(v, w, b, eps=1e-5):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * w + b


def group_norm(v, groups, w, b, eps=1e-5):
    n, d = v.shape
    g = v.reshape(n, groups, d // groups)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(n, d) * w + b


def reference_lstm(layer, x, norm_fn):
    """Step by step, from the equations of Ba et al. 2016 with the norm `norm_fn(v, module)`;
    at t = 0 the identically zero W_h h_{-1} is not normalized (no norm_h term)."""
    n, steps, _ = x.shape
    h = torch.zeros(n, H)
    c = torch.zeros(n, H)
    out = []
    for t in range(steps):
        z = norm_fn(x[:, t] @ layer.w_x.weight.T, layer.norm_x) + layer.bias
        if t > 0:
            z = z + norm_fn(h @ layer.w_h.weight.T, layer.norm_h)
        i, f, o = torch.sigmoid(z[:, :3 * H]).split(H, dim=1)
        g = torch.tanh(z[:, 3 * H:])
        c = f * c + i * g
        h = o * torch.tanh(norm_fn(c, layer.norm_c))
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_layer_and_group_lstm_match_a_step_by_step_computation(norm):
    model = lstm(norm)
    randomize_norm_params(model)
    layer = model.layers[0]
    x = torch.randn(3, 6, 5)
    if norm == "layer":
        fn = lambda v, m: layer_norm(v, m.weight, m.bias)  # noqa: E731
    else:
        fn = lambda v, m: group_norm(v, 2, m.weight, m.bias)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_lstm(layer, x, fn), atol=1e-5, rtol=1e-5)
    # The normalized quantities: W_x x and W_h h over all 4H gate units, c_t over H units.
    assert layer.norm_x.weight.shape == (4 * H,) and layer.norm_c.weight.shape == (H,)


def test_plain_lstm_matches_torch_lstm():
    model = lstm("none")
    layer = model.layers[0]
    ref = nn.LSTM(5, H, batch_first=True)
    order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H),
                       torch.arange(2 * H, 3 * H)])  # ours [i,f,o,g] -> torch's [i,f,g,o]
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.w_x.weight[order])
        ref.weight_hh_l0.copy_(layer.w_h.weight[order])
        ref.bias_ih_l0.copy_(layer.bias[order])
        ref.bias_hh_l0.zero_()
        x = torch.randn(4, 6, 5)
        torch.testing.assert_close(layer(x), ref(x)[0], atol=1e-5, rtol=1e-5)


def test_lstm_linears_have_no_bias_and_the_forget_gate_starts_open():
    layer = lstm("layer").layers[0]
    assert layer.w_x.bias is None and layer.w_h.bias is None
    assert torch.equal(layer.bias[H:2 * H], torch.ones(H))
    assert torch.equal(layer.bias[:H], torch.zeros(H))


# ----------------------------------------------------------------------------- batch (Cooijmans)


def test_batch_lstm_has_per_step_statistics_with_scale_point_one():
    model = lstm("batch")
    layer = model.layers[0]
    assert isinstance(layer.norm_h, TimeBatchNorm)
    assert layer.norm_h.keys == [f"t{t}" for t in range(6)]  # T_max = dataset.seq_len
    assert torch.equal(layer.norm_h.weight, torch.full((4 * H,), 0.1))
    names = sorted(Probes(model).bn_layers)
    assert len(names) == 3 * 6
    assert "layers.0.norm_h.t3" in names and "layers.0.norm_c.t5" in names


def test_step_names_are_zero_padded_to_sort_in_time_order():
    bn = TimeBatchNorm(4, 12, norm_spec("batch"))
    assert bn.keys[:3] == ["t00", "t01", "t02"] and bn.keys[-1] == "t11"


def test_per_step_running_statistics_are_separate_and_t_max_is_reused():
    spec = norm_spec("batch", momentum=0.5)
    bn = TimeBatchNorm(3, t_max=3, spec=spec).train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 3, generator=g) * (t + 1) + 10 * t for t in range(6)]
    for t, x in enumerate(batches):
        bn.at(t)(x)
    for t in range(2):  # one update each, from the zero/one init
        torch.testing.assert_close(bn.at(t).running_mean, 0.5 * batches[t].mean(0))
        torch.testing.assert_close(bn.at(t).running_var, 0.5 + 0.5 * batches[t].var(0))
    # Steps 2..5 all update the statistics of step T_max - 1 = 2, in order.
    mean, var = torch.zeros(3), torch.ones(3)
    for x in batches[2:]:
        mean, var = 0.5 * mean + 0.5 * x.mean(0), 0.5 * var + 0.5 * x.var(0)
    last = bn.at(2)
    torch.testing.assert_close(last.running_mean, mean)
    torch.testing.assert_close(last.running_var, var)
    assert bn.at(7) is last and int(last.num_batches_tracked) == 4
    # In eval mode a step beyond T_max normalizes with T_max's running statistics.
    bn.eval()
    x = torch.randn(4, 3)
    expected = (x - mean) / torch.sqrt(var + spec.eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn.at(9)(x), expected)


def test_step_statistics_come_from_the_real_rows_only():
    bn = StepBatchNorm(4, affine=False).train()
    ref = nn.BatchNorm1d(4, affine=False).train()
    x = torch.randn(6, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    x[~mask] = 1e3
    y = bn(x, mask=mask)
    torch.testing.assert_close(y[mask], ref(x[mask]))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    mean, var, count = bn.moments(x, mask)
    assert count == 4 and torch.allclose(mean, x[mask].mean(0))


def test_padding_changes_no_real_output_of_the_batch_lstm_in_training():
    model = lstm("batch").train()
    x = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 3])[:, None]
    other = x.clone()
    other[~mask] = (other[~mask] + 3) % 7
    torch.testing.assert_close(model(x, mask=mask)[mask], model(other, mask=mask)[mask])
    assert not torch.allclose(model(x)[mask], model(other)[mask])


# ----------------------------------------------------------------------------- images, errors


def test_lstm_reads_images_row_by_row():
    info = DataInfo(kind="image", num_classes=4, in_channels=3, image_size=8)
    model = lstm("batch", info).eval()
    assert model.t_max == 8 and model.layers[0].w_x.in_features == 3 * 8
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 4)
    changed = x.clone()
    changed[:, :, 0] += 1  # the first row: reaches the last step through the recurrence
    assert not torch.allclose(model(changed), model(x))


def test_group_count_that_does_not_divide_the_hidden_units_names_the_layer():
    with pytest.raises(UserError, match=r"divide the 6 channels of 'layers.0.norm_c' \(1 layer;"):
        build_model(model_options("lstm", hidden=6), norm_spec("group", num_groups=4), TEXT)
    with pytest.raises(UserError, match="model.t_max=3 is shorter than dataset.seq_len=6"):
        lstm("batch", t_max=3)


# ----------------------------------------------------------------------------- training


TINY_TEXT = ["dataset=synthetic_text", "dataset.n_train=256", "dataset.n_val=64",
             "batch_size=16", "steps=30", "log_every=5", "eval_every=0", "eval_batch_size=64",
             "optim=adamw", "lr=1e-2", "model.hidden=32"]


@pytest.mark.slow
@pytest.mark.parametrize("norm", norm_names("steps"))
def test_every_norm_trains_on_synthetic_text(tmp_path, norm):
    config = compose_config(["model=lstm", f"norm={norm}", *TINY_TEXT])
    summary = run_experiment(config, tmp_path, live=False)
    scalars = read_scalars(tmp_path)
    losses = [v for _, v in scalars["train/loss"]]
    assert summary["status"] == "completed"
    assert losses[-1] < losses[0] - 0.3, losses
    assert 0 < summary["final"]["val_bpc"] < 5
    if norm == "batch":  # one TensorBoard tag per time step and normalized quantity
        assert "bn_gap/dmu/layers.0.norm_x.t00" in scalars
        assert "bn_gap/dmu/layers.0.norm_h.t01" in scalars
        assert not any(".norm_h.t00" in tag for tag in scalars)  # W_h h_{-1} = 0: skipped
        assert "bn_gap/dvar/layers.0.norm_c.t10" in scalars
        # A step no logged batch had 2 real rows for (t47 here) has no gap to report.
        assert all(math.isfinite(v) for tag, points in scalars.items()
                   if tag.startswith("bn_gap/") for _, v in points)


@pytest.mark.slow
def test_cli_trains_a_batch_lstm_end_to_end(cli, tmp_path):
    result = cli("train", "model=lstm", "norm=batch", *TINY_TEXT, "steps=4", "log_every=2",
                 "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    assert "val/bpc" in read_scalars(tmp_path / "run")


def test_padding_gradient_is_zero_and_losses_stay_finite():
    """A sequence shorter than its batch must not leak NaN or gradient from its padding."""
    model = lstm("batch").train()
    x = torch.randint(0, 7, (3, 6))
    mask = torch.arange(6) < torch.tensor([6, 1, 3])[:, None]
    logits = model(x, mask=mask)
    y = torch.randint(0, 7, (3, 6))
    loss = (F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1), reduction="none")
            * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_lstm_trains_on_shapes_images_row_by_row(tmp_path):
    config = compose_config(["model=lstm", "norm=batch", "dataset=shapes", "dataset.n_train=64",
                             "dataset.n_val=32", "dataset.image_size=16", "batch_size=16",
                             "steps=3", "log_every=1", "eval_every=0", "model.hidden=16"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed" and 0 <= summary["final"]["val_acc"] <= 1
    assert "bn_gap/dmu/layers.0.norm_x.t15" in read_scalars(tmp_path)  # T_max = 16 rows


def test_batch_lstm_activations_are_measured_after_the_shared_gamma():
    model = lstm("batch").train()
    x = torch.randint(0, 7, (8, 6), generator=torch.Generator().manual_seed(0))
    probes = Probes(model)
    with probes.watch_forward(True):
        model(x)
    v = probes.flush()
    # gamma starts at 0.1 and beta at 0: the output std is 0.1 of the normalized one (1).
    assert v["act/out_std/layers.0.norm_x.t3"] == pytest.approx(0.1, rel=1e-3)
    assert v["act/out_std/layers.0.norm_h.t3"] == pytest.approx(0.1, rel=0.03)  # eps: small channels
    assert "act/out_std/layers.0.norm_h.t0" not in v  # not called: W_h h_{-1} = 0


BN_LSTM_SHORT = ["model=lstm", "dataset=synthetic_text", "norm=batch", "optim=adamw", "lr=3e-3",
                 "dataset.n_train=512", "dataset.n_val=128", "batch_size=32", "model.hidden=32",
                 "model.embed=16", "log_every=50", "eval_every=0", "precise_bn_batches=5"]


@pytest.mark.slow
def test_batch_lstm_running_statistics_evaluate_like_precise_bn(tmp_path, capsys):
    """Every row starts with the same character: the t = 0 layers see no batch variance.
    Eval must not amplify their running mean's lag by 1/sqrt(eps)."""
    config = compose_config([*BN_LSTM_SHORT, "steps=150"])
    summary = run_experiment(config, tmp_path, live=False)
    final = summary["final"]
    assert summary["status"] == "completed"
    assert abs(final["val_bpc"] - final["val_precise_bpc"]) < 0.15, final
    scalars = read_scalars(tmp_path)
    assert scalars["bn_gap/degenerate/layers.0.norm_x.t00"][-1][1] == 4 * 32  # all channels
    assert "normbench: warning: BatchNorm channels with no batch variance" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_ghost_batch_lstm_with_padded_groups_does_not_diverge(tmp_path, k):
    config = compose_config(["model=lstm", "dataset=synthetic_text", "norm=batch",
                             "batch_size=16", f"norm.stats_batch={k}", "steps=10",
                             "dataset.n_train=256", "dataset.n_val=64", "log_every=5",
                             "precise_bn_batches=2"])
    summary = run_experiment(config, tmp_path, live=False)
    assert summary["status"] == "completed", summary
    assert all(math.isfinite(v) for v in summary["final"].values())
