"""Instance norm, RMSNorm, FRN and DyT against their formulas written out here and against
torch's reference layers (InstanceNorm2d, RMSNorm), in every layout they serve; the layouts
they refuse, with the reason in the one-line error."""

import pytest
import torch
from torch import nn

from normbench.config.checks import check_model_builds
from normbench.errors import UserError
from normbench.norms import create_norm, make_norm_factory
from normbench.norms.counts import module_counts
from tests.helpers.common import compose_config
from tests.helpers.config_defaults import norm_spec

C = 6
SWITCHES = [(True, True), (False, True), (True, False), (False, False)]


def images(n=2, c=C, h=3, w=4, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, c, h, w) * 2 + 0.5


def randomize_affine(norm):
    """gamma, beta (and FRN's tau) away from their initial values, so a test sees them."""
    with torch.no_grad():
        for name in ("weight", "bias", "tau"):
            p = getattr(norm, name, None)
            if p is not None:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
    return norm


def per_channel(p, layout):
    return p.reshape(1, -1, 1, 1) if layout == "images" else p


def padded_tokens(lengths=(5, 2, 3), t=5, d=C):
    torch.manual_seed(3)
    x = torch.randn(len(lengths), t, d) * 1.5 + 0.3
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def same_on_real_tokens(norm, x, mask):
    """Outputs at real positions do not change when the padding holds other values."""
    garbage = x.masked_fill(~mask[..., None], 1e4)
    torch.testing.assert_close(norm(garbage, mask=mask)[mask], norm(x, mask=mask)[mask])


def sample_by_sample(norm, x):
    """Per-sample norms: each sample's output is the one it gets alone (uneven batches)."""
    alone = torch.cat([norm(x[i:i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(norm(x), alone)
    torch.testing.assert_close(norm(x[:1]), alone[:1])  # a batch of 1 too


# ----------------------------------------------------------------------------- instance


def test_instance_norm_is_torchs_instance_norm_and_its_formula():
    norm = randomize_affine(create_norm(norm_spec("instance"), "images", C))
    ref = nn.InstanceNorm2d(C, eps=1e-5, affine=True, track_running_stats=False)
    ref.load_state_dict(norm.state_dict())
    x = images()
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    expected = ((x - mean) / torch.sqrt(var + 1e-5) * per_channel(norm.weight, "images")
                + per_channel(norm.bias, "images"))
    for mode in (norm.train, norm.eval):  # no running statistics: eval is the same
        mode()
        torch.testing.assert_close(norm(x), expected)
        torch.testing.assert_close(norm(x), ref(x))
    sample_by_sample(norm, images(n=3, seed=1))
    assert not list(norm.buffers())


def test_instance_norm_of_a_constant_channel_is_its_beta():
    norm = randomize_affine(create_norm(norm_spec("instance"), "images", C))
    x = images()
    x[:, 1] = 0.0
    x[:, 2] = 7.0
    with torch.no_grad():
        y = norm(x)
    assert torch.isfinite(y).all()
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    torch.testing.assert_close(y[:, 1], beta[1].expand(2, 3, 4), rtol=0, atol=0)
    # torch's mean of twelve 7s may be off by one rounding step of 7 (it multiplies the sum
    # by 1/12), which the normalization divides by sqrt(eps); that is as close as it gets.
    one_ulp = float(torch.finfo(torch.float32).eps) * 4  # the spacing of floats in [4, 8)
    bound = abs(float(gamma[2])) * one_ulp / 1e-5 ** 0.5
    assert (y[:, 2] - beta[2]).abs().max() <= bound


@pytest.mark.parametrize("center,scale", SWITCHES)
def test_instance_norm_center_and_scale(center, scale):
    norm = randomize_affine(create_norm(norm_spec("instance", center=center, scale=scale),
                                        "images", C))
    assert (norm.weight is not None) == scale and (norm.bias is not None) == center
    x = images()
    expected = nn.functional.instance_norm(x, eps=1e-5)
    if scale:
        expected = expected * per_channel(norm.weight, "images")
    if center:
        expected = expected + per_channel(norm.bias, "images")
    torch.testing.assert_close(norm(x), expected)
    assert module_counts(norm) == (C * (int(center) + int(scale)), 0)


# ----------------------------------------------------------------------------- rms


def rms_formula(x, dims, gamma=None, eps=1e-5):
    y = x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y if gamma is None else y * gamma


def test_rms_on_tokens_is_torchs_rmsnorm_and_ignores_padding():
    norm = randomize_affine(create_norm(norm_spec("rms"), "tokens", C))
    ref = nn.RMSNorm(C, eps=1e-5)
    ref.load_state_dict(norm.state_dict())
    x, mask = padded_tokens()
    torch.testing.assert_close(norm(x, mask=mask), rms_formula(x, (-1,), norm.weight))
    torch.testing.assert_close(norm(x, mask=mask), ref(x))
    same_on_real_tokens(norm, x, mask)


def test_rms_on_lstm_rows_normalizes_each_row():
    norm = randomize_affine(create_norm(norm_spec("rms"), "steps", C, t_max=3))
    x, mask = padded_tokens()
    for t in range(5):  # also past t_max: no per-step state
        row = x[:, t]
        torch.testing.assert_close(norm.at(t)(row, mask=mask[:, t]),
                                   rms_formula(row, (-1,), norm.weight))
    same_on_real_tokens(norm, x, mask)


def test_rms_on_images_reduces_over_chw_with_gamma_per_channel():
    norm = randomize_affine(create_norm(norm_spec("rms"), "images", C))
    x = images()
    gamma = per_channel(norm.weight, "images")
    torch.testing.assert_close(norm(x), rms_formula(x, (1, 2, 3), gamma))
    plain = nn.RMSNorm(x.shape[1:], eps=1e-5, elementwise_affine=False)
    torch.testing.assert_close(norm(x), plain(x) * gamma)
    sample_by_sample(norm, images(n=3, seed=1))


@pytest.mark.parametrize("layout", ["images", "tokens", "steps"])
@pytest.mark.parametrize("options,has_gamma", [({}, True), ({"scale": False}, False),
                                               ({"affine": False}, False)])
def test_rms_has_gamma_only(layout, options, has_gamma):
    norm = create_norm(norm_spec("rms", **options), layout, C, t_max=2)
    assert (norm.weight is not None) == has_gamma
    assert getattr(norm, "bias", None) is None  # RMSNorm has no beta
    assert module_counts(norm) == (C * int(has_gamma), 0)
    assert not make_norm_factory(norm_spec("rms"), layout, t_max=2).recentres


# ----------------------------------------------------------------------------- frn


def frn_formula(x, norm, eps=1e-6):
    nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
    y = x / torch.sqrt(nu2 + eps)
    if norm.weight is not None:
        y = y * per_channel(norm.weight, "images")
    if norm.bias is not None:
        y = y + per_channel(norm.bias, "images")
    if norm.tau is not None:
        y = torch.maximum(y, per_channel(norm.tau, "images"))
    return y


@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("center,scale", SWITCHES)
def test_frn_formula_and_counts(center, scale, tlu):
    norm = randomize_affine(create_norm(norm_spec("frn", center=center, scale=scale, tlu=tlu),
                                        "images", C))
    assert norm.eps == 1e-6  # the paper's default
    assert (norm.weight is not None) == scale and (norm.bias is not None) == center
    assert (norm.tau is not None) == tlu
    x = images()
    torch.testing.assert_close(norm(x), frn_formula(x, norm))
    sample_by_sample(norm, images(n=3, seed=1))
    assert module_counts(norm) == (C * (int(center) + int(scale) + int(tlu)), 0)


def test_frn_of_a_constant_channel_is_finite():
    norm = randomize_affine(create_norm(norm_spec("frn", tlu=False), "images", C))
    x = images()
    x[:, 1] = 0.0  # nu^2 = 0: only eps stands between it and 0/0
    x[:, 2] = -3.0  # FRN does not subtract the mean: x / sqrt(x^2 + eps), about sign(x)
    y = norm(x)
    assert torch.isfinite(y).all()
    gamma, beta = norm.weight.detach(), norm.bias.detach()
    torch.testing.assert_close(y[:, 1], beta[1].expand(2, 3, 4))
    torch.testing.assert_close(y[:, 2], (gamma[2] * -3.0 / (9.0 + 1e-6) ** 0.5
                                         + beta[2]).expand(2, 3, 4))


def test_frn_tlu_floors_the_output_at_tau_and_learns_tau():
    norm = create_norm(norm_spec("frn"), "images", C)
    torch.testing.assert_close(norm.tau.detach(), torch.zeros(C))  # starts as max(y, 0)
    with torch.no_grad():
        norm.tau.copy_(torch.linspace(-1.0, 1.0, C))
    x = images()
    y = norm(x)
    tau = per_channel(norm.tau, "images")
    assert (y >= tau).all() and (y == tau.expand_as(y)).any()
    y.square().sum().backward()
    assert norm.tau.grad is not None and (norm.tau.grad != 0).all()
    assert norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0


def test_frn_with_tlu_replaces_the_relu_after_the_norm():
    from normbench.data import DataInfo
    from normbench.models import build_model
    from tests.helpers.config_defaults import model_options

    info = DataInfo(kind="image", num_classes=10)
    assert make_norm_factory(norm_spec("frn"), "images").activates
    assert not make_norm_factory(norm_spec("frn", tlu=False), "images").activates
    assert not make_norm_factory(norm_spec("rms"), "images").activates
    for tlu in (True, False):
        model = build_model(model_options("resnet", depth=8), norm_spec("frn", tlu=tlu), info)
        if tlu:
            with torch.no_grad():
                model.stem[1].tau.fill_(-1.0)
        with torch.no_grad():
            stem = model.stem(torch.randn(2, 3, 8, 8))
        # With the TLU at -1 the stem's output reaches -1; with a ReLU it is never negative.
        assert (float(stem.min()) == -1.0) if tlu else (float(stem.min()) >= 0.0)
        assert isinstance(model.blocks[0].act1, nn.Identity if tlu else nn.ReLU)


# ----------------------------------------------------------------------------- dyt


@pytest.mark.parametrize("layout", ["images", "tokens", "steps"])
def test_dyt_formula_in_every_layout(layout):
    norm = randomize_affine(create_norm(norm_spec("dyt", alpha_init=0.8), layout, C, t_max=2))
    torch.testing.assert_close(norm.alpha.detach(), torch.tensor([0.8]))
    if layout == "images":
        x, mask = images(), None
    else:
        x, mask = padded_tokens()
        same_on_real_tokens(norm, x, mask)
    gamma, beta = per_channel(norm.weight, layout), per_channel(norm.bias, layout)
    expected = gamma * torch.tanh(0.8 * x) + beta
    torch.testing.assert_close(norm(x, mask=mask), expected)
    if layout == "steps":
        for t in range(x.shape[1]):  # past t_max too: DyT has no per-step state
            row = x[:, t]
            torch.testing.assert_close(norm.at(t)(row, mask=mask[:, t]),
                                       norm.weight * torch.tanh(0.8 * row) + norm.bias)


def test_dyt_starts_at_alpha_init_with_gamma_one_beta_zero_and_learns_alpha():
    norm = create_norm(norm_spec("dyt"), "images", C)
    assert norm.alpha.shape == (1,) and float(norm.alpha.detach()) == 0.5  # DyTOptions' default
    torch.testing.assert_close(norm.weight.detach(), torch.ones(C))
    torch.testing.assert_close(norm.bias.detach(), torch.zeros(C))
    x = images()
    torch.testing.assert_close(norm(x), torch.tanh(0.5 * x))
    norm(x).square().sum().backward()
    assert norm.alpha.grad is not None and float(norm.alpha.grad) != 0


@pytest.mark.parametrize("layout", ["images", "tokens"])
@pytest.mark.parametrize("center,scale", SWITCHES)
def test_dyt_center_scale_and_counts(layout, center, scale):
    norm = randomize_affine(create_norm(norm_spec("dyt", center=center, scale=scale),
                                        layout, C))
    assert (norm.weight is not None) == scale and (norm.bias is not None) == center
    assert module_counts(norm) == (C * (int(center) + int(scale)) + 1, 0)  # + alpha
    x = images() if layout == "images" else padded_tokens()[0]
    expected = torch.tanh(0.5 * x)
    if scale:
        expected = expected * per_channel(norm.weight, layout)
    if center:
        expected = expected + per_channel(norm.bias, layout)
    torch.testing.assert_close(norm(x), expected)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", ["rms", "frn", "dyt"])
def test_bfloat16_in_bfloat16_out(name):
    norm = randomize_affine(create_norm(norm_spec(name), "images", C))
    x = images()
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("norm,model,reason", [
    ("instance", "transformer", "a causal model would see later tokens and the padding"),
    ("instance", "lstm", "an LSTM row has a single position per feature"),
    ("frn", "transformer", "where x/sqrt(x^2+eps) is sign(x) (the paper's N=1 case)"),
    ("frn", "lstm", "where x/sqrt(x^2+eps) is sign(x) (the paper's N=1 case)"),
])
def test_refused_layouts_say_why_in_one_line(norm, model, reason):
    config = compose_config([f"norm={norm}", f"model={model}", "dataset=synthetic_text"])
    with pytest.raises(UserError) as err:
        check_model_builds(config)
    line = err.value.line()
    layout = "tokens" if model == "transformer" else "steps"
    assert line.startswith(f"norm={norm} has no version for {layout} (model={model}")
    assert reason in line and "\n" not in line
    assert "Fix: use one of:" in line and "rms" in line and "dyt" in line


def test_float64_stays_float64():
    norm = create_norm(norm_spec("rms"), "images", C).double()
    x = images().double()
    y = norm(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, rms_formula(x, (1, 2, 3), per_channel(norm.weight, "images")),
                               rtol=1e-12, atol=1e-12)
