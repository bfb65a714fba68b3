"""`normbench inspect [overrides]`: every norm of the model a `normbench train` with the same
overrides would build, where it is, what it sees, and what stood there before.

The config is composed and checked as `train` composes and checks it (a mistake is the same
one line and exit status 2); the model is then built on the CPU, and its norms are found:

- model=torchvision, timm, custom: the placements `build_external` records (the sample
  pass it makes reads each norm's input shape); where the norm went in through the
  builder's `norm_layer`, the class the builder would have put there is read from a build
  with its own norms (norm=native) on the meta device.
- normbench's own models (resnet, transformer, lstm): the outermost `Norm` modules, their
  layout the one the model's norm factory builds for, their input shapes from one forward
  pass of zeros in eval mode.

Nothing is written to disk and no dataset is loaded: the model is sized from the dataset's
config (`placeholder_info`, as the pre-flight sizes it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models.convert import (
    AsImages,
    AsTokens,
    NormSlot,
    Placement,
    ThenActivation,
    ZeroGate,
    norm_width,
)
from normbench.norms import Norm, NormSpec, apply_weight_norm, make_spec
from normbench.norms.counts import module_counts

# The layout each of normbench's own models builds its norms for.
BUILTIN_LAYOUTS = {"resnet": "images", "transformer": "tokens", "lstm": "steps"}
# Modules normbench puts around a norm in a model built elsewhere (normbench.models.convert).
WRAPPERS = (AsTokens, AsImages, ZeroGate, ThenActivation)
USAGE = ("Usage: normbench inspect [OVERRIDES]\n\n"
         "The norm layers of the model 'normbench train OVERRIDES' would build: path, width,\n"
         "layout, the input shape seen in one forward pass of zeros, the class before and now;\n"
         "then the parameter counts and how the norm went in. Nothing is trained or written.\n\n"
         "Examples:\n"
         "  normbench inspect model=torchvision model.arch=convnext_tiny norm=group\n"
         "  normbench inspect model=timm model.arch=resnet18 norm=native\n"
         "  normbench inspect model=transformer norm=layer")


@dataclass(frozen=True)
class Row:
    """One norm layer as the table shows it."""

    path: str
    width: int | None
    layout: str | None  # None: the sample pass never reached it
    input_shape: tuple[int, ...] | None
    before: str | None  # the class the builder made (None: normbench's own model)
    now: str


@dataclass
class Inspection:
    """What `normbench inspect` prints: the rows and the footer's facts."""

    model: str  # e.g. "model=torchvision model.arch=resnet18"
    norm: str
    rows: list[Row]
    total_params: int
    norm_params: int
    how: str
    checked_on: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- command


def inspect_command(args: list[str]) -> int:
    """Compose and check the config as `train` does, build the model, print its norms."""
    from rich.console import Console

    from normbench.config.checks import check_config
    from normbench.config.compose import compose_sweep

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    for a in args:
        if a in ("-m", "--multirun"):
            raise UserError(f"{a} with 'normbench inspect': it shows the model of one job",
                            "leave out -m and give each key one value (e.g. norm=group)")
        if a.startswith("-"):
            raise UserError(f"unknown option {a} for 'normbench inspect'",
                            "give key=value overrides only, as to 'normbench train'")
    (job,) = compose_sweep(list(args), multirun=False).jobs
    check_config(job.config)
    inspection = inspect_config(job.config)
    show(inspection, Console(width=None if sys.stdout.isatty() else 200))
    return 0


# ----------------------------------------------------------------------------- building


def inspect_config(config: dict) -> Inspection:
    """The norms of the model a resolved config (already checked) builds, on the CPU."""
    from normbench.config.checks import placeholder_info
    from normbench.models.external import EXTERNAL

    options, spec = dict(config["model"]), make_spec(**config["norm"])
    info = placeholder_info(config["dataset"])
    if options["name"] in EXTERNAL:
        inspection = _external(options, spec, info)
    else:
        inspection = _builtin(options, spec, info)
    what = (f"a vocabulary of {info.num_classes}" if info.kind == "text"
            else f"{info.num_classes} classes")
    inspection.notes.append(f"the dataset is not read: the head is sized for {what}, as the "
                            "pre-flight sizes it (a run sizes it from the data)")
    if spec.weight_norm:
        inspection.notes.append("norm.weight_norm=true: the weights of the convolutions and "
                                "linear layers are weight-normalized besides")
    return inspection


def _external(options: dict, spec: NormSpec, info: DataInfo) -> Inspection:
    from normbench.models.external import NATIVE, build_external

    placements: list[Placement] = []
    model = build_external(options, spec, info, placements=placements)
    if spec.weight_norm:
        apply_weight_norm(model)
    native = spec.name == NATIVE
    builder_classes = _builder_classes(options, info) if any(
        p.native == NormSlot.__name__ for p in placements) else {}
    rows = []
    for p in placements:
        before = p.native
        if p.native == NormSlot.__name__:
            before = builder_classes.get(p.path, "norm_layer")
        rows.append(Row(p.path, p.width, p.layout, p.input_shape, before,
                        before if native else describe_module(model.get_submodule(p.path))))
    slotted = sum(p.native == NormSlot.__name__ for p in placements)
    replaced = len(placements) - slotted
    if native:
        how = "norm=native: the model's own norms, as its builder made them"
    else:
        parts = []
        if slotted:
            parts.append(f"through the builder's norm_layer ({slotted} layers)")
        if replaced:
            parts.append(f"by replacing the norm modules the builder made ({replaced} layers)")
        how = "; ".join(parts) or "no norm layers found"
        if options["name"] == "timm" and replaced:
            how += ("; timm models always by replacement (they wrap norm_layer into fused "
                    "norm+activation layers by its class name)")
    norm_params = sum(module_counts(model.get_submodule(p.path))[0] for p in placements)
    return Inspection(_model_words(options), _norm_words(spec), rows, _count(model),
                      norm_params, how, _images_words(info))


def _builder_classes(options: dict, info: DataInfo) -> dict[str, str]:
    """Path -> the class of the norm the builder puts there when left to itself (built on
    the meta device with norm=native); {} where it cannot build without norm_layer."""
    from normbench.models.external import NATIVE, build_external

    found: list[Placement] = []
    try:
        with torch.device("meta"):
            build_external(options, make_spec(name=NATIVE, weight_norm=False), info,
                           placements=found)
    except Exception:  # what stood there is only shown: a builder that needs its
        return {}  # norm_layer, or that the meta device cannot run, shows "norm_layer"
    return {p.path: p.native for p in found}


def _builtin(options: dict, spec: NormSpec, info: DataInfo) -> Inspection:
    from normbench.models import build_model

    model = build_model(options, spec, info)
    layout = BUILTIN_LAYOUTS[options["name"]]
    norms = {path: m for path, m in model.named_modules() if isinstance(m, Norm)
             and not isinstance(model.get_submodule(path.rpartition(".")[0]), Norm)}
    shapes, notes = _seen_shapes(model, norms, info)
    rows = []
    for path, module in norms.items():
        shape = shapes.get(path)
        width = norm_width(module)
        if width is None and shape is not None:
            width = shape[1] if layout == "images" else shape[-1]
        rows.append(Row(path, width, layout if shape else None, shape, None,
                        describe_module(module)))
    how = (f"normbench's own model: every norm built by its norm factory for the {layout} "
           "layout")
    norm_params = sum(module_counts(m)[0] for m in norms.values())
    checked = (f"2 sequences of {info.seq_len} zero tokens" if info.kind == "text"
               else _images_words(info))
    return Inspection(_model_words(options), _norm_words(spec), rows, _count(model),
                      norm_params, how, checked, notes)


def _seen_shapes(model: nn.Module, norms: dict[str, nn.Module],
                 info: DataInfo) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The first input shape each norm (or, for a per-step norm, one of its children) gets
    in one forward pass of zeros in eval mode; a note where the pass fails."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(path: str):
        def record(_module, args) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(path, tuple(args[0].shape))
        return record

    hooks = [m.register_forward_pre_hook(recorder(path))
             for path, norm in norms.items() for m in norm.modules()]
    if info.kind == "text":
        sample = torch.zeros(2, info.seq_len, dtype=torch.long)
    else:
        sample = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return shapes, [f"the sample pass failed ({first}): input shapes not known"]
    finally:
        model.train()
        for hook in hooks:
            hook.remove()
    return shapes, []


def describe_module(module: nn.Module) -> str:
    """A norm's class, with what normbench wrapped around it: AsTokens(TokenLayerNorm)."""
    name = type(module).__name__
    if isinstance(module, WRAPPERS):
        inner = describe_module(module.norm)
        if isinstance(module, ThenActivation):
            return f"{name}({inner}, {type(module.act).__name__})"
        return f"{name}({inner})"
    return name


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_words(options: dict) -> str:
    name = options["name"]
    if name == "custom":
        return f"model=custom model.target={options.get('target')}"
    if "arch" in options:
        return f"model={name} model.arch={options['arch']}"
    return f"model={name}"


def _norm_words(spec: NormSpec) -> str:
    return f"norm={spec.name}"


def _images_words(info: DataInfo) -> str:
    return (f"2 zero images of {info.in_channels}x{info.image_size}x{info.image_size} "
            "(one forward pass, eval mode)")


# ----------------------------------------------------------------------------- printing


def _shape_words(shape: tuple[int, ...] | None, layout: str | None) -> str:
    if shape is None:
        return "not reached"
    text = f"({', '.join(str(s) for s in shape)})"
    return f"{text} per step" if layout == "steps" and len(shape) == 2 else text


def show(inspection: Inspection, console) -> None:
    """The table of norm layers and the footer, on a rich console."""
    from rich.table import Table

    table = Table(title=f"{inspection.model} {inspection.norm}: "
                        f"{len(inspection.rows)} norm layers", title_justify="left")
    for header, justify in (("#", "right"), ("path", "left"), ("width", "right"),
                            ("layout", "left"), ("input shape seen", "left"),
                            ("class before → now", "left")):
        table.add_column(header, justify=justify, no_wrap=header != "class before → now")
    for i, row in enumerate(inspection.rows, 1):
        classes = row.now if row.before is None else (
            f"{row.before} (kept)" if row.before == row.now else f"{row.before} → {row.now}")
        table.add_row(str(i), row.path, "?" if row.width is None else str(row.width),
                      row.layout or "-", _shape_words(row.input_shape, row.layout), classes)
    console.print(table)
    lines = [f"norm layers: {len(inspection.rows)}",
             f"parameters: {inspection.total_params:,} in all, {inspection.norm_params:,} "
             "in the norm layers (trainable)",
             f"how the norm went in: {inspection.how}",
             f"checked on: {inspection.checked_on}",
             *inspection.notes]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
