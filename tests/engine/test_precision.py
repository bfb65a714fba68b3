"""precision=, channels_last= and compile=: what runs in which precision and layout, and the
combinations the pre-flight refuses."""

import shutil

import pytest
import torch
from rich.console import Console

from normbench.config.checks import check_config
from normbench.engine.experiment import build
from normbench.engine.precision import autocast, prepare_input, to_memory_format
from normbench.engine.train import run_experiment, train_step
from normbench.errors import UserError
from normbench.norms.registry import norm_names
from tests.helpers.common import TINY, compose_config, read_scalars
from tests.helpers.config_defaults import model_options, norm_spec


def test_bf16_runs_convolutions_in_bf16_and_keeps_statistics_in_fp32(tmp_path):
    config = compose_config([*TINY, "precision=bf16", "steps=1"])
    exp = build(config, tmp_path, Console(), live=False)
    seen = {}
    conv, bn = exp.model.stem[0], exp.model.stem[1]
    conv.register_forward_hook(lambda m, a, out: seen.update(conv=out.dtype))
    train_step(exp, 1, log_now=True)
    assert seen["conv"] == torch.bfloat16
    # weights, running statistics and gradients stay fp32
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in exp.model.parameters() if p.grad is not None)
    values = exp.probes.flush()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in values.items()
               if k.startswith("bn_gap/dmu/"))
    exp.tracker.close()


def test_bf16_probe_statistics_are_fp32_reductions():
    from normbench.norms.stats import batch_moments

    bn = torch.nn.BatchNorm2d(3)
    x = (torch.randn(4, 3, 5, 5) * 0.01 + 100).to(torch.bfloat16)
    mean, var, _ = batch_moments(bn, x)
    assert mean.dtype == var.dtype == torch.float32
    ref_var, ref_mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(var, ref_var)
    torch.testing.assert_close(mean, ref_mean)


def test_fp16_scales_the_loss_and_checkpoints_the_scale(tmp_path):
    config = compose_config([*TINY, "precision=fp16", "steps=2"])
    exp = build(config, tmp_path, Console(), live=False)
    assert exp.scaler.is_enabled() and "scaler" in exp.parts()
    train_step(exp, 1, log_now=False)
    assert exp.parts()["scaler"].state_dict()["scale"] > 1
    assert exp.watch.first_bad_step() == 0  # 0: no bad step
    exp.tracker.close()
    fp32 = build(compose_config([*TINY, "steps=2"]), tmp_path / "b", Console(), live=False)
    assert "scaler" not in fp32.parts()  # fp32 and bf16 checkpoints are unchanged
    fp32.tracker.close()


@pytest.mark.slow
def test_precision_is_recorded(tmp_path):
    summary = run_experiment(compose_config([*TINY, "precision=bf16", "steps=2"]), tmp_path,
                             live=False)
    assert summary["precision"] == "bf16" and summary["channels_last"] is True  # the default
    assert summary["status"] == "completed"
    assert "train/loss" in read_scalars(tmp_path)


def test_channels_last_changes_the_layout_not_the_numbers():
    from normbench.data import DataInfo
    from normbench.models import build_model

    torch.manual_seed(0)
    model = build_model(model_options("resnet", depth=8), norm_spec("batch"),
                        DataInfo(kind="image", num_classes=10)).eval()
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    model = to_memory_format(model, True)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x_cl = prepare_input(x, True)
    assert x_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_cl), expected, rtol=1e-4, atol=1e-5)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    assert prepare_input(tokens, True) is tokens


IMAGE_NORMS = [(name, {}) for name in norm_names("images")] + [("batch", {"stats_batch": 2})]


@pytest.mark.parametrize("name, options", IMAGE_NORMS,
                         ids=[n + ("-ghost" if o else "") for n, o in IMAGE_NORMS])
def test_every_image_norm_trains_alike_in_channels_last(name, options):
    # The default layout is NHWC: each norm must give the same outputs, gradients and
    # buffers as in NCHW (own norms that reshape must not mix up the channel axis).
    from normbench.data import DataInfo
    from normbench.models import build_model

    def one_step(channels_last: bool):
        torch.manual_seed(0)
        model = build_model(model_options("resnet", depth=8), norm_spec(name, **options),
                            DataInfo(kind="image", num_classes=10))
        model = to_memory_format(model, channels_last).train()
        x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        out = model(prepare_input(x, channels_last))
        out.square().mean().backward()
        return out, model

    out, model = one_step(False)
    out_cl, model_cl = one_step(True)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(model.state_dict().items(), model_cl.state_dict().values(),
                           strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=key)
    for (key, p), p_cl in zip(model.named_parameters(), model_cl.parameters(), strict=True):
        torch.testing.assert_close(p_cl.grad, p.grad, rtol=1e-3, atol=1e-5, msg=key)


def test_autocast_is_off_in_fp32():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("overrides, message", [
    (["precision=fp8"], "precision=fp8 is not known"),
    (["compile=true", "model=lstm"], "compile=true with model=lstm"),
])
def test_refused_combinations(overrides, message):
    with pytest.raises(UserError, match=message):
        check_config(compose_config([*TINY, *overrides]))
    check_config(compose_config([*TINY, "compile=true", "model=transformer"]))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_runs_probed_steps_eagerly_without_recompiling(tmp_path):
    """compile=true with the probes: logging steps run the same module eagerly with the
    hooks, the other steps run the one compiled graph, and both follow the eager run."""
    import torch._dynamo

    torch._dynamo.reset()
    overrides = [*TINY, "norm.stats_batch=2", "steps=6"]  # ghost BN: the groups are traced too
    runs = {}
    for compiled in (False, True):
        exp = build(compose_config([*overrides, f"compile={compiled}"]), tmp_path / str(compiled),
                    Console(), live=False)
        assert (exp.train_module(True) is exp.model
                and (exp.train_module(False) is not exp.model) == compiled)
        losses, logged = [], []
        for step in range(1, 7):
            log_now = step % 3 == 1
            # after the first compiled step, no more graphs: step 4 (probed) runs eagerly
            with torch._dynamo.config.patch(error_on_recompile=compiled and step >= 3):
                train_step(exp, step, log_now)
            losses.append(exp.running.means()[0].item())
            if log_now:  # a compiled model would run without the hooks: no bn_gap values
                logged.append(exp.probes.flush())
        exp.tracker.close()
        runs[compiled] = losses, logged
    (eager_losses, eager_logged), (losses, logged) = runs[False], runs[True]
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6)
    for mine, theirs in zip(logged, eager_logged, strict=True):
        gaps = sorted(k for k in mine if k.startswith("bn_gap/"))
        assert gaps and gaps == sorted(k for k in theirs if k.startswith("bn_gap/"))
        torch.testing.assert_close([mine[k] for k in gaps], [theirs[k] for k in gaps],
                                   rtol=1e-3, atol=1e-5)


def test_cudnn_autotuning_is_on_unless_deterministic():
    from normbench.engine.experiment import seed_everything

    seed_everything(0, deterministic=False)
    assert torch.backends.cudnn.benchmark
