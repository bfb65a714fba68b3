"""What `normbench list` shows about the norms below their names: every option with its
default and meaning, and the parameter counts per layer in each layout.

Both come from each norm's default config, whose keys and defaults are its options
dataclass (normbench/norms/options.py); the help and the ranges are that dataclass's too.
"""

from __future__ import annotations

from dataclasses import dataclass

from normbench.config.compose import compose_config
from normbench.config.ranges import show_value
from normbench.errors import UserError
from normbench.norms import LAYOUTS, make_spec, norm_options_class
from normbench.norms.counts import layer_formulas
from normbench.norms.options import option_fields, option_help, option_ranges
from normbench.norms.registry import unsupported_reason


@dataclass
class OptionRow:
    """One declaration of an option, with the norms that have it."""

    key: str
    default: str  # as an override writes it
    norms: list[str]
    help: str
    bounds: str  # the range in words, "" for an option without one

    def where(self, every: list[str]) -> str:
        if self.norms == every:
            return "every norm"
        others = [n for n in every if n not in self.norms]
        if len(others) <= 3:
            return f"every norm but {', '.join(others)}"
        return ", ".join(self.norms)


def default_configs(names: list[str]) -> dict[str, dict]:
    """The `norm:` section of the config of `norm=<name>`, for each name."""
    return {name: compose_config([f"norm={name}"])["norm"] for name in names}


def option_rows(configs: dict[str, dict]) -> list[OptionRow]:
    """Every option of the norms in `configs`, one row per declaration (the affine trio
    that eight norms inherit is one row), sorted by key."""
    rows: dict[tuple[int, str], OptionRow] = {}
    for name, config in configs.items():
        options = norm_options_class(name)
        ranges = option_ranges(options)
        for field in option_fields(options):
            default = show_value(config[field.name])
            row = rows.get((id(field), default))
            if row is None:
                bounds = ranges[field.name].words() if field.name in ranges else ""
                row = rows[id(field), default] = OptionRow(field.name, default, [],
                                                           option_help(field), bounds)
            row.norms.append(name)
    return sorted(rows.values(), key=lambda r: r.key)


def options_table(configs: dict[str, dict]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="  norm options, as norm.KEY=DEFAULT (which norms have it): what it "
                        "means", title_justify="left", show_header=False, box=None,
                  padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column()
    every = list(configs)
    for row in option_rows(configs):
        bounds = f"; [dim]{escape(row.bounds)}[/dim]" if row.bounds else ""
        table.add_row(escape(f"{row.key}={row.default}"),
                      f"[dim]{escape(row.where(every))}:[/dim] {escape(row.help)}{bounds}")
    return table


def counts_table(configs: dict[str, dict]):
    """Each norm's parameter counts per layer of width C in each layout (T: time steps),
    from its default config; a dash where the norm has no version, with the reason below."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="  parameters per norm layer of C channels, learned + kept for inference\n"
                        "  (images: resnet; tokens: transformer; steps: lstm over T steps)",
                  title_justify="left", box=None, padding=(0, 2))
    table.add_column("", no_wrap=True, min_width=max(map(len, configs)))
    for layout in LAYOUTS:
        table.add_column(layout, no_wrap=True)
    notes = []
    for name, config in configs.items():
        spec = make_spec(**config)
        cells = []
        for layout in LAYOUTS:
            try:
                learned, kept = layer_formulas(spec, layout)
            except UserError:
                cells.append("-")
                notes.append(f"{name} on {layout}: {unsupported_reason(name, layout)}")
                continue
            cell = learned if kept == "0" else f"{learned} + {kept}"
            if spec.weight_norm:  # its own parameters (g) live in the conv/linear layers
                cell += " (+g)"
            cells.append(cell)
        table.add_row(f"[bold]{name}[/bold]", *cells)
    footer = ["  (+g): one g per output unit of every conv/linear (weight normalization)"]
    footer += [f"  - {note}" for note in notes]
    return Group(table, *(Text(line, style="dim") for line in footer))


def norm_tables(names: list[str]) -> list:
    """What `normbench list` prints after the norms' names and descriptions."""
    configs = default_configs(names)
    return [options_table(configs), counts_table(configs)]
