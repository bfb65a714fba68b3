"""TensorBoard dashboards written into every run folder: the ``normbench`` custom-scalars
layout (one chart per probe family, all layers in it, by regex) and the HParams entry
(dataset and its training-set size, model, norm, batch size, lr, seed, optimizer, and every
setting the sweep gave the job -> final metrics)."""

from __future__ import annotations

LAYOUT_NAME = "normbench"

# (chart title, tag regexes, shown when): "bn" charts only for models with BatchNorm,
# "norm" for models with any norm layer, "saturation" where tanh/sigmoid units exist, a
# why-probe's name where that probe is on.
CHARTS = [
    ("loss", [r"^train/loss$", r"^val\w*/loss$"], "always"),
    ("accuracy", [r"^train/acc$", r"^val\w*/acc$"], "always"),
    ("train/eval gap (running - batch stats)", [r"^val_gap/"], "bn"),
    ("BN dmu per layer", [r"^bn_gap/dmu/"], "bn"),
    ("BN dvar per layer", [r"^bn_gap/dvar/"], "bn"),
    ("BN tid_mu per layer", [r"^bn_gap/tid_mu/"], "bn"),
    ("BN tid_sigma per layer", [r"^bn_gap/tid_sigma/"], "bn"),
    ("BN channels with no batch variance", [r"^bn_gap/degenerate/"], "bn"),
    ("BN running vs PreciseBN mean", [r"^bn_gap/precise_dmu/"], "bn"),
    ("BN running vs PreciseBN var", [r"^bn_gap/precise_dvar/"], "bn"),
    ("BN statistics: mean over layers", [r"^bn_gap/mean/"], "bn"),
    ("BN statistics: max over layers", [r"^bn_gap/max/"], "bn"),
    ("norm input mean", [r"^act/in_mean/"], "norm"),
    ("norm input std", [r"^act/in_std/"], "norm"),
    ("norm output mean", [r"^act/out_mean/"], "norm"),
    ("norm output std", [r"^act/out_std/"], "norm"),
    ("norm output 15th percentile", [r"^act/out_p15/"], "norm"),
    ("norm output median", [r"^act/out_p50/"], "norm"),
    ("norm output 85th percentile", [r"^act/out_p85/"], "norm"),
    ("tanh/sigmoid saturation", [r"^act/saturation/"], "saturation"),
    ("gradient norm, global", [r"^grad/global_norm$"], "always"),
    ("gradient norm per parameter", [r"^grad/norm/"], "always"),
    ("gradient excess kurtosis per layer", [r"^grad/kurtosis/"], "always"),
    ("update:data ratio, log10", [r"^update/"], "always"),
    ("throughput", [r"^perf/"], "always"),
    # the why-probes, each where it is on (why.<probe>.every > 0)
    ("landscape: loss range and gradient change along the gradient",
     [r"^landscape/loss_range$", r"^landscape/grad_change$"], "landscape"),
    ("landscape: effective beta-smoothness", [r"^landscape/beta_smoothness$"], "landscape"),
    ("Hessian lambda_max beside 2/lr (edge of stability)",
     [r"^hessian/lambda_max$", r"^hessian/two_over_lr$"], "hessian"),
    ("Hessian trace (Hutchinson)", [r"^hessian/trace$"], "hessian"),
    ("internal covariate shift ||G - G'|| per weight", [r"^ics/l2/"], "ics"),
    ("internal covariate shift cos(G, G') per weight", [r"^ics/cos/"], "ics"),
    ("internal covariate shift, mean over weights", [r"^ics/mean/"], "ics"),
    ("cross-sample similarity per norm layer", [r"^act/similarity/"], "similarity"),
    ("cross-sample similarity, mean and max over layers", [r"^act/similarity_(mean|max)$"],
     "similarity"),
]

HPARAMS = ("dataset", "n_train", "model", "arch", "norm", "batch_size", "stats_batch", "num_groups",
           "group_size", "lr", "seed", "optim", "precision", "channels_last", "compile",
           "world_size", "global_batch", "residual_init")
# The same metric list for every run: TensorBoard takes the list from one run of the
# folder it is opened on, so it must not depend on the run (absent tags stay blank).
METRICS = ("val/acc", "val/loss", "val/bpc", "val/bpt", "val/ppl", "train/loss", "train/acc",
           "train/bpc", "train/bpt", "val_batchstats/acc", "val_precise/acc", "val_gap/acc",
           "landscape/loss_range", "landscape/beta_smoothness", "hessian/lambda_max",
           "hessian/trace", "ics/mean/l2", "act/similarity_mean")


def layout(has_bn: bool, has_norm: bool, has_saturation: bool, why: frozenset[str] = frozenset()
           ) -> dict:
    """The custom-scalars layout for a model with the given kinds of layers and why-probes."""
    shown = {"always": True, "bn": has_bn, "norm": has_norm, "saturation": has_saturation}
    shown.update({probe: probe in why for probe in ("landscape", "ics", "hessian", "similarity")})
    charts = {title: ["Multiline", regexes] for title, regexes, when in CHARTS if shown[when]}
    return {LAYOUT_NAME: charts}


# Swept keys shown under the name of the HPARAMS entry that reports their effect (the
# statistics batch BN actually used, the images actually kept), not as a second column.
SWEPT_ALIASES = {"norm.stats_batch": "stats_batch", "norm.num_groups": "num_groups",
                 "norm.group_size": "group_size", "dataset.n_train": "n_train",
                 "model.residual_init": "residual_init", "model.arch": "arch",
                 "model.target": "arch",
                 "dataset": "dataset", "model": "model", "norm": "norm", "optim": "optim"}
# TensorBoard's HParams table ticks only its first 5 hparams by default, after sorting the
# experiment's list with `differs` first: swept keys are marked so and listed first.
SHOWN_BY_DEFAULT = 5


def swept_settings(task_overrides: list[str], exclude_keys: list[str]) -> dict[str, str]:
    """The settings a sweep gave one job, key -> value as written: Hydra's task overrides
    of the job (sweep values and fixed command-line values) without the excluded keys, i.e.
    what `hydra.job.override_dirname` shows in the job's folder name."""
    swept = {}
    for override in task_overrides:
        key, _, value = override.partition("=")
        if key not in exclude_keys:
            swept[key.lstrip("+~")] = value
    return dict(sorted(swept.items()))


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def hparams_of(summary: dict, config: dict) -> dict:
    """The HParams values of one run, from its summary and config: swept keys first (as
    the config holds them, or as written for a group choice such as gap_setup=lstm_text),
    then the standard ones."""
    values = {}
    for key, written in (config.get("swept") or {}).items():
        name = SWEPT_ALIASES.get(key, key)
        value = summary.get(name) if name in HPARAMS and name != "optim" else _lookup(config, key)
        if isinstance(value, dict):  # a config group: its chosen option
            value = value.get("name", written)
        values[name] = written if value is None else value
    values.update((key, summary.get(key)) for key in HPARAMS if key not in values)
    if "optim" not in (config.get("swept") or {}):
        values["optim"] = (config.get("optim") or {}).get("name")
    # TensorBoard takes numbers, strings and booleans; lists (optim.betas) as text.
    values = {k: (str(v) if isinstance(v, list | tuple) else v) for k, v in values.items()}
    return {k: v for k, v in values.items() if v is not None}


def swept_names(config: dict) -> list[str]:
    """The HParams names of the keys the sweep gave this job, in the order hparams_of uses."""
    return [SWEPT_ALIASES.get(key, key) for key in (config.get("swept") or {})]


def write_dashboards(writer, hparams: dict, *, has_bn: bool, has_norm: bool,
                     has_saturation: bool, swept: list[str] = (),
                     why: frozenset[str] = frozenset()) -> None:
    """Write the layout and the HParams entry into the writer's own run folder.

    The HParams metrics are the run's own scalar tags, which the dashboard reads as they
    are logged; nothing is duplicated (SummaryWriter.add_hparams would write a second
    run in a sub-folder). The hparams named in `swept` are marked as differing between
    runs and listed first, so that the dashboard shows them without unticking anything.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    writer.add_custom_scalars(layout(has_bn, has_norm, has_saturation, why))
    experiment, start, end = hparams_summaries(hparams, dict.fromkeys(METRICS, 0.0))
    mark_swept(experiment, swept)
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary)


def mark_swept(experiment_summary, swept: list[str]) -> None:
    """Reorder the experiment's hparam list in place: swept names first, marked `differs`."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (value,) = experiment_summary.value
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    infos = list(data.experiment.hparam_infos)
    for info in infos:
        info.differs = info.name in swept
    infos.sort(key=lambda info: not info.differs)  # stable: HPARAMS order otherwise
    data.experiment.ClearField("hparam_infos")
    data.experiment.hparam_infos.extend(infos)
    value.metadata.plugin_data.content = data.SerializeToString()
