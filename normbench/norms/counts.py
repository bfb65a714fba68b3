"""Parameter counts of norm layers: what `normbench list` shows per norm and layout, and what
a run records in summary.json (over normbench's norm layers and torch's own, which a model
built elsewhere keeps with norm=native).

`trainable` counts learned parameters (gamma, beta, FRN's tau, DyT's alpha, weight norm's
g); `state` counts the floating-point buffers a norm keeps for inference (running mean and
variance, PowerNorm's psi^2 ...), not counters nor flags. Per layer both are affine in the
width C (and, for per-time-step norms, in the number of steps T), so four builds give the
formula, e.g. BatchNorm: 2C trainable + 2C state; per-step BatchNorm in an LSTM: 2C + 2CT.
"""

from __future__ import annotations

from fractions import Fraction

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from normbench.norms.registry import Norm, NormSpec, create_norm, norm_class

TORCH_NORMS: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
                                            nn.LocalResponseNorm)


def module_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable parameters, floating-point buffers) of a module and its children."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    state = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return trainable, state


def is_norm_layer(module: nn.Module) -> bool:
    """A normbench norm, or one of torch's own (what a model built elsewhere keeps with
    norm=native: BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm and their
    subclasses, such as timm's BatchNormAct2d)."""
    return isinstance(module, (Norm, *TORCH_NORMS))


def outermost_norm_layers(module: nn.Module) -> list[nn.Module]:
    """The norm layers of `module` that no other norm layer contains."""
    if is_norm_layer(module):
        return [module]
    return [norm for child in module.children() for norm in outermost_norm_layers(child)]


def model_norm_counts(model: nn.Module) -> dict[str, int]:
    """Totals over the outermost norm layers of `model` (a per-step container counts once,
    with its children)."""
    trainable = state = 0
    for module in outermost_norm_layers(model):
        t, s = module_counts(module)
        trainable, state = trainable + t, state + s
    return {"norm_params": trainable, "norm_state": state}


def _affine_formula(values: dict[tuple[int, int], int]) -> str:
    """`a CT + b C + c T + d` from its values at C in {64, 128} and T in {1, 2}."""
    v = {k: Fraction(x) for k, x in values.items()}
    ct = (v[128, 2] - v[64, 2] - v[128, 1] + v[64, 1]) / 64
    c = (v[128, 1] - v[64, 1]) / 64 - ct
    t = v[64, 2] - v[64, 1] - 64 * ct
    d = v[64, 1] - 64 * (ct + c) - t
    terms = [(ct, "CT"), (c, "C"), (t, "T"), (d, "")]
    parts = []
    for coef, symbol in terms:
        if coef == 0:
            continue
        number = str(coef) if coef != 1 or not symbol else ""
        parts.append(f"{number}{symbol}")
    return " + ".join(parts) or "0"


def layer_formulas(spec: NormSpec, layout: str) -> tuple[str, str]:
    """(trainable, state) per norm layer of width C (T time steps in the steps layout), as
    formulas; e.g. ("2C", "2C") for BatchNorm on images."""
    norm_class(spec.name, layout)  # a UserError, with its reason, for an unsupported pair
    counts = {}
    for width in (64, 128):
        for steps in (1, 2):
            counts[width, steps] = module_counts(
                create_norm(spec, layout, width, t_max=steps if layout == "steps" else None))
    return (_affine_formula({k: t for k, (t, _) in counts.items()}),
            _affine_formula({k: s for k, (_, s) in counts.items()}))
