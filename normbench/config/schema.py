"""The types of every config key: one dataclass per config group option kind.

The YAML files under conf/ hold the values (and say what they mean); these dataclasses hold
the types and the set of keys. Each YAML file names its schema first in its defaults list,
so Hydra checks every value and refuses every unknown key while composing, before any job
starts. A field is MISSING here on purpose: its one default lives in the YAML file. The
norms are the exception: a norm's schema is its options dataclass, which holds each
option's one default beside its type, range and help (normbench/norms/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from normbench.norms import norm_names, norm_options_class
from normbench.norms.options import NormOptions

# OmegaConf reads the annotations at runtime and does not accept `X | None`: Optional stays.
# ruff: noqa: UP007, UP045


@dataclass
class TrainConfig:
    """Top-level settings (conf/train.yaml). The groups are typed by their own schemas."""

    dataset: Any = MISSING
    model: Any = MISSING
    norm: Any = MISSING
    optim: Any = MISSING
    sched: Any = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    steps: Optional[int] = MISSING  # null where epochs decide (a setup's)
    epochs: Optional[float] = MISSING
    seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING  # fp32 | bf16 | fp16
    channels_last: bool = MISSING
    compile: bool = MISSING
    threads: Optional[int] = MISSING
    deterministic: bool = MISSING
    eval_every: int = MISSING
    eval_batch_size: int = MISSING
    log_every: int = MISSING
    probes: bool = MISSING
    hist_every: Optional[int] = MISSING
    precise_bn_batches: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    resume: Any = MISSING  # false | true | auto (OmegaConf has no bool-or-string type)
    overfit_batches: int = MISSING  # 0: the whole training set; k: its first k batches, repeated
    run_name: str = MISSING
    # Linear learning-rate scaling (Goyal et al. 2017): a setup (conf/setup/) writes
    # lr: ${nb_mul:${base_lr},${nb_div:${batch_size},${base_batch_size}}}; null elsewhere.
    base_lr: Optional[float] = MISSING
    base_batch_size: Optional[int] = MISSING
    # experiment=lr_sweep's grid: multiples of the setup's lr, so one grid suits SGD and AdamW.
    lr_factor: Optional[float] = MISSING
    # Filled in by the CLI in -m mode: the values the sweep gave this job (HParams, run name).
    swept: dict[str, str] = MISSING
    why: WhyConfig = MISSING  # the landscape, ICS, curvature and similarity probes


# ----------------------------------------------------------------------------- why probes
# normbench/probes/why.py. `every`: the probe runs on every N-th logging step (and on the
# last step); 0 turns it off.


@dataclass
class LandscapeProbeConfig:
    every: int = MISSING
    lr_factors: list[float] = field(default_factory=lambda: MISSING)  # step sizes: lr * factor


@dataclass
class IcsProbeConfig:
    every: int = MISSING
    layers: Optional[int] = MISSING  # weights measured, spread over the depth; null: all


@dataclass
class HessianProbeConfig:
    every: int = MISSING
    bn_mode: str = MISSING  # eval (running statistics) | train (the batch's own statistics)
    batch_size: Optional[int] = MISSING  # the fixed batch's size; null: the run's batch_size
    max_hvps: int = MISSING  # Hessian-vector products for lambda_max at most (Lanczos)
    tol: float = MISSING  # relative tolerance of lambda_max
    trace_samples: int = MISSING  # Hutchinson's Rademacher vectors for the trace


@dataclass
class SimilarityProbeConfig:
    every: int = MISSING


@dataclass
class WhyConfig:
    landscape: LandscapeProbeConfig = field(default_factory=LandscapeProbeConfig)
    ics: IcsProbeConfig = field(default_factory=IcsProbeConfig)
    hessian: HessianProbeConfig = field(default_factory=HessianProbeConfig)
    similarity: SimilarityProbeConfig = field(default_factory=SimilarityProbeConfig)


# ----------------------------------------------------------------------------- dataset


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: str = MISSING  # image | text: what the models read, for the pair checks


@dataclass
class ShapesConfig(DatasetConfig):
    n_train: int = MISSING
    n_val: int = MISSING
    image_size: int = MISSING
    noise: float = MISSING
    seed: int = MISSING
    augment: bool = MISSING


@dataclass
class CifarConfig(DatasetConfig):
    root: str = MISSING
    download: bool = MISSING
    augment: bool = MISSING
    n_train: Optional[int] = MISSING
    n_val: Optional[int] = MISSING
    image_size: int = MISSING
    seed: int = MISSING


@dataclass
class ImageFolderConfig(DatasetConfig):
    root: Optional[str] = MISSING
    image_size: int = MISSING
    augment: bool = MISSING
    n_train: Optional[int] = MISSING
    n_val: Optional[int] = MISSING
    seed: int = MISSING
    stream: Optional[bool] = MISSING
    memory_budget_gb: float = MISSING
    workers: Optional[int] = MISSING
    prefetch: int = MISSING


@dataclass
class SyntheticTextConfig(DatasetConfig):
    n_train: int = MISSING
    n_val: int = MISSING
    seq_len: int = MISSING
    max_depth: int = MISSING
    seed: int = MISSING


@dataclass
class TextConditionConfig(DatasetConfig):
    """What a text file's tokens and rows are (normbench/data/corpus.py)."""

    seq_len: int = MISSING
    val_fraction: float = MISSING
    unit: str = MISSING  # char | word
    sample: str = MISSING  # window | line
    vocab_size: int = MISSING  # word units: most frequent training tokens kept, plus <unk>


@dataclass
class TextFileConfig(TextConditionConfig):
    path: Optional[str] = MISSING


@dataclass
class TinyShakespeareConfig(TextConditionConfig):
    root: str = MISSING
    download: bool = MISSING


# ----------------------------------------------------------------------------- model
# Only what a user chooses: build_model fills in what the data and the norm decide
# (number of classes, input channels, image size, conv bias).


@dataclass
class ResNetConfig:
    name: str = MISSING
    depth: int = MISSING
    width: int = MISSING
    shortcut: str = MISSING
    residual_init: str = MISSING  # default | zero | skipinit (normbench/models/resnet.py)


@dataclass
class TransformerConfig:
    name: str = MISSING
    depth: int = MISSING
    width: int = MISSING
    heads: int = MISSING
    mlp_ratio: int = MISSING
    norm_position: str = MISSING
    context: Optional[int] = MISSING
    patch_size: int = MISSING
    residual_init: str = MISSING  # default | zero | skipinit (zero = skipinit: gates at 0)


@dataclass
class LSTMConfig:
    name: str = MISSING
    depth: int = MISSING
    hidden: int = MISSING
    embed: int = MISSING
    t_max: Optional[int] = MISSING


@dataclass
class TorchvisionModelConfig:
    name: str = MISSING
    arch: str = MISSING  # a name of torchvision.models.list_models(module=torchvision.models)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the builder
    cifar_stem: bool = MISSING  # ResNets: 3x3 stride-1 first conv, no max-pool (32 px images)


@dataclass
class TimmModelConfig:
    name: str = MISSING
    arch: str = MISSING  # a name of timm.list_models()
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


@dataclass
class CustomModelConfig:
    name: str = MISSING
    target: Optional[str] = MISSING  # package.module:function or path/to/file.py:function
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the builder


# ----------------------------------------------------------------------------- optim, sched


@dataclass
class OptimConfig:
    name: str = MISSING
    default_lr: float = MISSING  # the top-level lr of a run that sets none
    weight_decay: float = MISSING
    implementation: str = MISSING


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class AdamWConfig(OptimConfig):
    betas: list[float] = field(default_factory=lambda: MISSING)


@dataclass
class ConstantScheduleConfig:
    name: str = MISSING
    warmup_frac: float = MISSING


@dataclass
class CosineScheduleConfig(ConstantScheduleConfig):
    final_lr_frac: float = MISSING


@dataclass
class StepScheduleConfig(ConstantScheduleConfig):
    milestones: list[float] = field(default_factory=lambda: MISSING)  # fractions of the steps
    gamma: float = MISSING


# ----------------------------------------------------------------------------- registration

# (group, schema name, dataclass). A conf/<group>/<option>.yaml file starts with
# `defaults: [/<group>_<name>_schema@_here_, _self_]`: stored outside any config group, the
# schemas are not offered as options in `--help` nor selectable as `<group>=...`.
SCHEMAS: list[tuple[str, str, type]] = [
    ("dataset", "shapes", ShapesConfig),
    ("dataset", "cifar", CifarConfig),
    ("dataset", "imagefolder", ImageFolderConfig),
    ("dataset", "synthetic_text", SyntheticTextConfig),
    ("dataset", "text", TextFileConfig),
    ("dataset", "tinyshakespeare", TinyShakespeareConfig),
    ("model", "resnet", ResNetConfig),
    ("model", "transformer", TransformerConfig),
    ("model", "lstm", LSTMConfig),
    ("model", "torchvision", TorchvisionModelConfig),
    ("model", "timm", TimmModelConfig),
    ("model", "custom", CustomModelConfig),
    # A norm's schema is its options dataclass, which holds each option's one default:
    # conf/norm/<name>.yaml sets only the name.
    *(("norm", name, norm_options_class(name)) for name in norm_names()),
    ("norm", "native", NormOptions),  # a torchvision/timm/custom model's own norms
    ("optim", "sgd", SGDConfig),
    ("optim", "adamw", AdamWConfig),
    ("sched", "constant", ConstantScheduleConfig),
    ("sched", "cosine", CosineScheduleConfig),
    ("sched", "step", StepScheduleConfig),
]


def register_schemas() -> None:
    """Put every schema in Hydra's ConfigStore (idempotent: storing again replaces)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in SCHEMAS:
        cs.store(name=schema_name(group, name), node=node)


def schema_name(group: str, name: str) -> str:
    return f"{group}_{name}_schema"
