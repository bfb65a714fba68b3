"""TensorBoard dashboards written into every run folder: the ``normbench`` custom-scalars
layout (one chart per probe family, all layers in it, by regex) and the HParams entry
(dataset and its training-set size, model, norm, batch size, lr, seed, optimizer -> final
metrics)."""

from __future__ import annotations

LAYOUT_NAME = "normbench"

# (chart title, tag regexes, shown when): "bn" charts only for models with BatchNorm,
# "norm" for models with any norm layer, "saturation" where tanh/sigmoid units exist.
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
]

HPARAMS = ("dataset", "n_train", "model", "norm", "batch_size", "stats_batch", "lr", "seed",
           "optim")
# The same metric list for every run: TensorBoard takes the list from one run of the
# folder it is opened on, so it must not depend on the run (absent tags stay blank).
METRICS = ("val/acc", "val/loss", "val/bpc", "train/loss", "train/acc", "train/bpc",
           "val_batchstats/acc", "val_precise/acc", "val_gap/acc")


def layout(has_bn: bool, has_norm: bool, has_saturation: bool) -> dict:
    """The custom-scalars layout for a model with the given kinds of layers."""
    shown = {"always": True, "bn": has_bn, "norm": has_norm, "saturation": has_saturation}
    charts = {title: ["Multiline", regexes] for title, regexes, when in CHARTS if shown[when]}
    return {LAYOUT_NAME: charts}


def hparams_of(summary: dict, config: dict) -> dict:
    """The HParams values of one run, from its summary and config."""
    values = {key: summary.get(key) for key in HPARAMS}
    values["optim"] = (config.get("optim") or {}).get("name")
    return {k: v for k, v in values.items() if v is not None}


def write_dashboards(writer, hparams: dict, *, has_bn: bool, has_norm: bool,
                     has_saturation: bool) -> None:
    """Write the layout and the HParams entry into the writer's own run folder.

    The HParams metrics are the run's own scalar tags, which the dashboard reads as they
    are logged; nothing is duplicated (SummaryWriter.add_hparams would write a second
    run in a sub-folder).
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    writer.add_custom_scalars(layout(has_bn, has_norm, has_saturation))
    for summary in hparams_summaries(hparams, dict.fromkeys(METRICS, 0.0)):
        writer.file_writer.add_summary(summary)
