"""The norm registry: every (name, layout) against its formula and PyTorch's reference layers,
the calling convention `norm(x, mask=None)` for every registered pair, and its errors."""

import pytest
import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms import (
    LAYOUTS,
    Norm,
    NormSpec,
    TokenBatchNorm,
    check_norms,
    create_norm,
    make_norm_factory,
    norm_class,
    norm_names,
    norm_options,
    register,
    registered,
)
from normbench.norms.registry import _REGISTRY
from normbench.norms.stats import batch_moments
from tests.helpers.common import compose_config
from tests.helpers.config_defaults import norm_spec

torch.manual_seed(0)
T_MAX = 5


def standardize(x, dims):
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + 1e-5)


def make(name, layout, width, **kw):
    return create_norm(norm_spec(name, **kw), layout, width, t_max=T_MAX)


@pytest.mark.parametrize("n", [2, 5])
def test_image_norms_match_their_formulas(n):
    x = torch.randn(n, 8, 4, 3) * 3 + 1
    torch.testing.assert_close(make("batch", "images", 8)(x), standardize(x, (0, 2, 3)))
    torch.testing.assert_close(make("layer", "images", 8)(x), standardize(x, (1, 2, 3)))
    grouped = standardize(x.reshape(n, 4, 2, 4, 3), (2, 3, 4)).reshape_as(x)
    torch.testing.assert_close(make("group", "images", 8, num_groups=4)(x), grouped)
    assert torch.equal(make("none", "images", 8)(x), x)


def test_token_norms_match_their_formulas():
    x = torch.randn(3, 5, 8) * 2 - 1
    torch.testing.assert_close(make("layer", "tokens", 8)(x), standardize(x, (2,)))
    grouped = standardize(x.reshape(3, 5, 2, 4), (3,)).reshape_as(x)
    torch.testing.assert_close(make("group", "tokens", 8, num_groups=2)(x), grouped)
    torch.testing.assert_close(make("batch", "tokens", 8)(x), standardize(x, (0, 1)))
    assert torch.equal(make("none", "tokens", 8)(x, mask=None), x)


def test_step_norms_match_their_formulas_per_row_and_per_step():
    x = torch.randn(4, 6)
    torch.testing.assert_close(make("layer", "steps", 6).at(3)(x), standardize(x, (1,)))
    grouped = standardize(x.reshape(4, 3, 2), (2,)).reshape_as(x)
    torch.testing.assert_close(make("group", "steps", 6, num_groups=3).at(0)(x), grouped)
    # Per-step BatchNorm over the rows, with the shared gamma at its init of 0.1.
    torch.testing.assert_close(make("batch", "steps", 6).at(2)(x), 0.1 * standardize(x, (0,)))
    # A whole sequence: each step with its own statistics, as `at(t)` on its rows.
    seq = torch.randn(4, 7, 6) * torch.arange(1.0, 8.0)[None, :, None]
    bn = make("batch", "steps", 6)
    torch.testing.assert_close(bn(seq), 0.1 * standardize(seq, (0,)))
    assert bn.at(T_MAX + 3) is bn.at(T_MAX - 1)  # steps beyond T_max share the last one


@pytest.mark.parametrize("name,layout", registered())
def test_every_registered_norm_takes_x_and_an_optional_mask(name, layout):
    torch.manual_seed(1)
    norm = make(name, layout, 8, num_groups=2).train()
    if layout == "images":
        x = torch.randn(4, 8, 3, 3)
        mask = torch.ones(4, 3, 3, dtype=torch.bool)
        mask[3] = False  # a padded sample: (N, H, W), x's shape without the channel axis
        real = (slice(0, 3),)
    else:
        x = torch.randn(4, T_MAX, 8)
        mask = torch.arange(T_MAX) < torch.tensor([5, 3, 2, 4])[:, None]  # (N, T)
        real = (mask,)
    for y in (norm(x), norm(x, mask=None), norm(x, mask=mask)):
        assert y.shape == x.shape and torch.isfinite(y).all()
    masked = norm(x, mask=mask)
    garbage = x.clone()
    garbage[~mask if layout != "images" else slice(3, 4)] = 1e3
    # Padding never reaches a real output.
    torch.testing.assert_close(norm(garbage, mask=mask)[real], masked[real])
    if layout == "steps":
        for t in range(T_MAX + 2):  # the rows of one time step, as inside the recurrence
            mask_t = mask[:, min(t, T_MAX - 1)]
            y = norm.at(t)(x[:, min(t, T_MAX - 1)], mask=mask_t)
            assert y.shape == (4, 8) and torch.isfinite(y).all()
    norm.eval()
    assert torch.isfinite(norm(x, mask=mask)).all()


def test_every_name_has_options_a_config_can_set():
    for name in norm_names():
        fields = set(compose_config([f"norm={name}"])["norm"]) - {"name"}  # norm=<name>'s keys
        assert norm_options(name) <= fields, name
    assert norm_options("batch") >= {"momentum", "stats_batch"}
    assert "num_groups" in norm_options("group") and not norm_options("none")


def test_the_config_gives_every_option_a_norm_reads():
    for name in norm_names():
        spec = norm_spec(name)
        given = {k for k in norm_options(name) if getattr(spec, k) is not None}
        nullable = set().union(*(norm_class(n, layout).nullable
                                 for n, layout in registered() if n == name))
        assert given | nullable == norm_options(name), name


def test_a_spec_without_a_required_option_is_refused():
    with pytest.raises(ValueError, match="norm=group needs eps;"):
        create_norm(NormSpec("group", affine=True), "images", 8)
    # GroupNorm's two counts may each be null, but not both (nor both set).
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        create_norm(NormSpec("group", eps=1e-5), "images", 8)
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        create_norm(NormSpec("group", eps=1e-5, num_groups=2, group_size=4), "images", 8)


def test_factory_says_whether_the_norm_recentres():
    assert make_norm_factory(norm_spec("batch"), "images").recentres
    assert make_norm_factory(norm_spec("layer"), "tokens").recentres
    assert not make_norm_factory(norm_spec("none"), "images").recentres


@pytest.mark.parametrize("lengths", [[5, 2], [1, 4, 3], [6, 6]])
def test_token_batchnorm_uses_only_real_tokens(lengths):
    """Same outputs on real tokens and same running buffers as BatchNorm1d fed only those."""
    n, t, d = len(lengths), 6, 4
    x = torch.randn(n, t, d) * 2 + 3
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 1e3)  # padding garbage must not leak into statistics
    ours, ref = TokenBatchNorm(d), nn.BatchNorm1d(d)
    for _ in range(3):
        out = ours(x, mask)
        expected = ref(x[mask])
        torch.testing.assert_close(out[mask], expected)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    mean, var, count = batch_moments(ours, x, mask)
    assert count.item() == sum(lengths)
    torch.testing.assert_close(mean, x[mask].mean(0))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, mask)[mask], ref(x[mask]))


def test_image_batchnorm_with_a_mask_uses_only_real_pixels():
    x = torch.randn(3, 2, 4, 4) * 2 + 1
    mask = torch.ones(3, 4, 4, dtype=torch.bool)
    mask[2, :, 2:] = False  # the right half of the last image is padding
    ours, ref = make("batch", "images", 2), nn.BatchNorm1d(2)
    out = ours(x, mask=mask)
    real = x.permute(0, 2, 3, 1)[mask]  # (real pixels, C)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[mask], ref(real))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_batchnorm_train_and_eval_differ_and_running_var_is_unbiased():
    bn = make("batch", "images", 3, momentum=0.1)
    x = torch.randn(2, 3, 2, 2) * 4 + 2  # batch of 2: n = 8 values per channel
    y_train = bn(x)
    batch_var = x.var(dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(bn.running_var, 0.9 * torch.ones(3) + 0.1 * batch_var)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    bn.eval()
    y_eval = bn(x)
    expected_eval = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    torch.testing.assert_close(y_eval, expected_eval)
    assert not torch.allclose(y_train, y_eval, atol=1e-2)


def test_per_sample_norms_ignore_the_rest_of_the_batch():
    x = torch.randn(4, 8, 3, 3)
    for name in ("layer", "group"):
        norm = make(name, "images", 8, num_groups=4)
        torch.testing.assert_close(norm(x)[:1], norm(x[:1]))


def test_unknown_norm_is_one_line_naming_the_choices():
    with pytest.raises(UserError) as err:
        create_norm(NormSpec(name="bogus"), "images", 8)
    line = err.value.line()
    assert "\n" not in line and "unknown norm 'bogus'" in line
    for name in norm_names():
        assert name in line


def test_a_name_without_a_version_for_the_layout_names_the_usable_ones():
    @register("images_only", "images")
    class ImagesOnly(Norm, nn.Identity):
        pass

    try:
        with pytest.raises(UserError) as err:
            create_norm(NormSpec(name="images_only"), "steps", 4)
        line = err.value.line()
        assert "norm=images_only has no version for steps (model=lstm)" in line
        assert "images_only" not in line.split("use one of:")[1] and "batch" in line
    finally:
        for layout in LAYOUTS:
            _REGISTRY.pop(("images_only", layout), None)


def test_registering_a_pair_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register("batch", "tokens")(type("Again", (Norm, nn.Identity), {}))


def test_group_count_that_does_not_divide_names_the_layer():
    factory = make_norm_factory(norm_spec("group", num_groups=3), "images")
    model = nn.Sequential(nn.Conv2d(3, 6, 1), factory(6),
                          nn.Sequential(nn.Conv2d(6, 8, 1), factory(8)))
    with pytest.raises(UserError) as err:
        check_norms(model)
    line = err.value.line()
    assert "'2.1'" in line and "8 channels" in line and "num_groups=3" in line
    assert "\n" not in line


def test_a_new_norm_needs_only_its_class_and_registry_entry_to_work_in_every_model():
    """What docs/contributing.md promises: no model changes for a new norm."""
    from normbench.data import DataInfo
    from normbench.models import build_model
    from tests.helpers.config_defaults import model_options

    @register("test_rms", *LAYOUTS)
    class TestRMS(Norm, nn.Module):
        options = frozenset({"eps"})
        recentres = False

        def __init__(self, num_features, eps):
            super().__init__()
            self.eps = eps

        @classmethod
        def build(cls, spec, num_features, *, t_max=None):
            return cls(num_features, spec.eps)

        def forward(self, x, mask=None):
            dim = 1 if x.dim() == 4 else -1  # images are channels-first
            return x * torch.rsqrt(x.square().mean(dim, keepdim=True) + self.eps)

    spec = NormSpec("test_rms", eps=1e-5)
    text = DataInfo(kind="text", num_classes=7, seq_len=6)
    image = DataInfo(kind="image", num_classes=3, in_channels=3, image_size=8)
    small = {"resnet": dict(depth=8), "transformer": dict(depth=1, width=8, heads=2),
             "lstm": dict(hidden=8, embed=4)}
    try:
        for name, info, x in (("resnet", image, torch.randn(2, 3, 8, 8)),
                              ("transformer", text, torch.randint(0, 7, (2, 6))),
                              ("lstm", text, torch.randint(0, 7, (2, 6)))):
            model = build_model(model_options(name, **small[name]), spec, info)
            assert sum(isinstance(m, TestRMS) for m in model.modules()) >= 3, name
            assert torch.isfinite(model(x)).all(), name
        # recentres = False: the convolutions in front keep their bias.
        resnet = build_model(model_options("resnet", depth=8), spec, image)
        assert all(c.bias is not None for c in resnet.modules() if isinstance(c, nn.Conv2d))
    finally:
        for layout in LAYOUTS:
            _REGISTRY.pop(("test_rms", layout), None)
