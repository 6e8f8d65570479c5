"""The ``truthmap`` command: ``run`` does the whole study; ``generate | label | extract | probe | plot``
run one stage each on a run folder; ``report`` writes the HTML page of one or several run folders,
``figure`` the figure of one run for a paper.
Every command prints one clear line on bad input (exit status 2).

One way to name things: a run a command reads is an argument (``truthmap report RUN …``, ``figure RUN``, ``export RUN``,
``resample RUN``, ``choose RUN``; ``transfer`` reads its runs as ``--train`` / ``--test``), and where a
command writes is ``--out`` (the run folder of ``run`` and the stage commands, the page of ``report``, the file of ``figure``,
the detector folder of ``export``, the folder of ``transfer``, the scored CSV of ``score``). ``resample``
and ``choose`` add their files to the run they read. truthmap 0.1's spellings (``export --out RUN --to
DIR``, ``resample --out RUN``, ``choose --out RUN``, ``transfer --to DIR``) still work for one release,
with a warning."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .errors import TruthmapError

ONE_CELL = ("export", "resample", "choose", "transfer")  # their --site names one cell: one value


def _option(name: str, **changes):
    """The click option of setting ``name``, generated from its declaration in config.py (flag, aliases,
    type, choices, help); ``changes`` overrides a part for one command. Its default is None: a setting
    not given is left to ``--config FILE``, the run's config.json or the schema's default."""
    from .config import declaration

    info = {**declaration(name), **changes}
    flag, kind = info["flag"], info["kind"]
    if kind == "bool":
        decls = [f"{flag}/--no-{flag[2:]}", *info["aliases"], name]  # an alias " /--quiet" is an off switch
        return click.option(*decls, default=None, help=info["help"])
    types = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}
    kwargs = dict(type=click.Choice(info["choices"]) if kind == "choice" else types[kind], default=None,
                  help=info["help"], multiple=info["multiple"], metavar=info["metavar"])
    if info["flag_value"] is not None:  # a flag that may come without its value (--ray: a local cluster)
        kwargs.update(is_flag=False, flag_value=info["flag_value"])
    return click.option(flag, *info["aliases"], name, **kwargs)


def _settings(stage: str | None):
    """The options of a command: ``--config``, ``--force`` and the settings of ``stage`` (None: all of
    them, for ``run``), each generated from its declaration."""
    from .config import SETTINGS, declaration

    names = [n for n in SETTINGS if stage is None or declaration(n)["stages"] == "all"
             or stage in declaration(n)["stages"]]

    def decorate(f):
        options = [click.option("--config", "config_file", type=click.Path(dir_okay=False),
                                help="YAML file of settings (keys: the setting names, e.g. sites, progress)."),
                   *[_option(name) for name in names],
                   click.option("--force", is_flag=True, help="Rerun the stage(s) even if their inputs are unchanged.")]
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


class StageCommand(click.Command):
    """A stage command: a setting of another stage is refused with what uses it, not only 'no such option'."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.NoSuchOption as err:
            from .config import SETTINGS, declaration

            users = {flag: declaration(n)["stages"] for n in SETTINGS
                     for flag in (declaration(n)["flag"], *declaration(n)["aliases"])}
            if err.option_name not in users:
                raise
            stages = users[err.option_name]
            used = f"a setting of {', '.join(stages)}" if stages else "a setting of 'truthmap run' only"
            raise click.UsageError(f"{info_name} does not use {err.option_name} ({used}); 'truthmap {info_name} "
                                   f"--help' lists its settings", ctx=err.ctx) from None


def _multi_value() -> tuple[str, ...]:
    """The flags that take several values after one flag: those of the list settings, and transfer's."""
    from .config import SETTINGS, declaration

    flags = [f for n in SETTINGS if declaration(n)["multiple"] for f in (declaration(n)["flag"], *declaration(n)["aliases"])]
    return (*flags, "--train", "--test")


def _config(config_file, **values):
    """(Config, the settings given) from the command line and ``--config FILE``. Nothing is read from the
    run folder here: a stage command continues the folder's other settings only once it holds the folder
    (pipeline.continue_config); None in place of the settings when --config FILE says everything."""
    from .config import settings_from

    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    values = {k: v for k, v in values.items() if v not in (None, [])}
    given = frozenset(values) if config_file is None else None
    return settings_from(config_file, values, "the command line"), given


def _number(value, spec: str = ".3f") -> str:
    """A number from summary.json for the terminal; "n/a" where it is missing, null or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return format(value, spec)


def _shown(text, limit: int = 300) -> str:
    """Model or file text for the terminal: control characters (escape sequences) shown escaped."""
    from .runfolder import sanitise

    return sanitise(text, limit)


def _report(run_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from . import runfolder as rf

    with rf.Run.reading(run_dir) as held:
        summary = held.read_json_object(rf.SUMMARY)
    def text(value) -> str:  # file text, shown as text (no terminal escapes, no rich markup)
        return escape(rf.sanitise(value, 80))

    console = Console()
    console.print(f"model accuracy {_number(summary.get('accuracy'), '.1%')} on {text(summary.get('n'))} questions; "
                  f"valid exact answers {_number(summary.get('valid_exact_answer_rate'), '.1%')}")
    population = summary.get("population")
    if isinstance(population, dict):
        reasons = population.get("left_out_reasons")
        reasons = ", ".join(f"{text(k)}: {text(v)}" for k, v in reasons.items()) if isinstance(reasons, dict) else ""
        console.print(f"population ({text(population.get('rule'))}): {text(population.get('n'))} answers in every "
                      f"cell; {text(population.get('left_out'))} left out ({reasons or 'none'})")
    table = Table(title="top cells, chosen on validation (mean over seeds; test AUC with its 95% interval)")
    for column in ("site", "layer", "position", "val AUC", "test AUC", "95% CI", "n_test"):
        table.add_column(column)
    top = summary.get("top_cells")
    for cell in [c for c in top if isinstance(c, dict)] if isinstance(top, list) else []:
        table.add_row(text(cell.get("site")), text(cell.get("layer")), text(cell.get("position")),
                      _number(cell.get("val_auc")), f"{_number(cell.get('auc'))} ± {_number(cell.get('auc_std'))}",
                      f"{_number(cell.get('auc_lo'))}–{_number(cell.get('auc_hi'))}", _number(cell.get("n_test"), ".0f"))
    console.print(table)
    on_test = summary.get("best_on_test")
    if isinstance(on_test, dict):
        console.print(f"the best cell on test would be {text(on_test.get('site'))} L{text(on_test.get('layer'))} "
                      f"{text(on_test.get('position'))} with test AUC {_number(on_test.get('auc'))}: optimistic, the "
                      f"best of many on the answers that score it")
    within = summary.get("best_within_cell")
    if isinstance(within, dict):
        console.print(f"best cell within strata (family and subgroup), chosen on validation: {text(within.get('site'))} "
                      f"L{text(within.get('layer'))} {text(within.get('position'))}, test AUC within strata "
                      f"{_number(within.get('within_auc'))}")
    baselines = summary.get("baselines") if isinstance(summary.get("baselines"), dict) else {}
    baselines = {k: v for k, v in baselines.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if baselines:
        from .stages.baselines import kind_of

        best = sorted(baselines.items(), key=lambda kv: -kv[1])[:3]
        controls = [(k, v) for k, v in baselines.items() if kind_of(k) == "control"]  # the registry's controls
        within = summary.get("probe_within_family_auc")
        console.print("best baselines (mean AUC): " + ", ".join(f"{text(k)} {_number(v)}" for k, v in best)
                      + ("; controls " + ", ".join(f"{text(k)} {_number(v)}" for k, v in controls) if controls else "")
                      + (f"; best probe within families {_number(within)}" if within is not None else ""))
    whole = summary.get("whole_map")
    paired = whole.get("paired") if isinstance(whole, dict) else None
    if isinstance(paired, dict) and paired.get("diff") is not None:
        console.print(f"whole map as one probe: test AUC {_number(paired.get('auc_a'))} against the best cell's "
                      f"{_number(paired.get('auc_b'))}, difference {_number(paired.get('diff'), '+.3f')} "
                      f"({_number(paired.get('low'), '+.3f')} … {_number(paired.get('high'), '+.3f')}, paired): "
                      f"{'shown' if paired.get('shown') is True else 'not shown'}")
    null = summary.get("cell_null")
    if isinstance(null, dict):
        console.print(f"cells above the label-permutation null (max over cells, {text(null.get('permutations'))} "
                      f"permutations, p ≤ {text(null.get('level'))}): {text(null.get('cells_beating_null'))} of "
                      f"{text(null.get('cells'))}")
    graders = summary.get("graders")
    if isinstance(graders, dict) and isinstance(graders.get("accuracy"), dict):
        name = lambda column: text(str(column).replace("correct_", ""))  # noqa: E731
        pairs = [p for p in graders.get("agreement") or [] if isinstance(p, dict)]
        cells = [g for g in graders.get("probes") or [] if isinstance(g, dict) and "layer" in g]
        console.print("graders (share right): " + ", ".join(f"{name(k)} {_number(v, '.1%')}"
                                                             for k, v in graders["accuracy"].items())
                      + ("; labels that flip: " + ", ".join(f"{name(p.get('a'))}·{name(p.get('b'))} "
                                                            f"{text(p.get('flips'))} (κ {_number(p.get('kappa'))})"
                                                            for p in pairs) if pairs else "")
                      + ("; the cell each chooses: " + ", ".join(f"{name(g.get('grader'))} L{text(g.get('layer'))} "
                                                                 f"{text(g.get('position'))} {_number(g.get('auc'))}"
                                                                 for g in cells) if cells else ""))
    located = summary.get("exact_answer")
    if isinstance(located, dict) and located.get("right_answers"):
        console.print(f"exact answers located {'without' if located.get('mode') == 'blind' else 'with'} the gold: "
                      f"{text(located.get('span_differs_from_gold'))} of {text(located.get('right_answers'))} right "
                      f"answers have another span than their gold alias")
    if summary.get("labels") == "none":
        console.print(f"no gold answers: {text(summary.get('no_correctness_auc'))}")
    entropy = summary.get("entropy_probe") or {}
    for key, how in (("best_cell", "chosen on validation AUC for errors"),
                     ("best_cell_label_free", "chosen without labels, on validation agreement with semantic entropy")):
        cell = entropy.get(key)
        if cell:
            console.print(f"semantic-entropy probe, {how}: {text(cell['site'])} L{_number(cell['layer'], 'd')} {text(cell['position'])}; "
                          f"test AUC for errors {_number(cell.get('auc') if key == 'best_cell' else cell.get('error_auc'))}, "
                          f"for high semantic entropy "
                          f"{_number(cell.get('high_entropy_auc') if key == 'best_cell' else cell.get('auc'))}")
    skipped = summary.get("skipped")
    for name, reason in (skipped.items() if isinstance(skipped, dict) else ()):
        console.print(f"{text(name)} skipped: {escape(rf.sanitise(reason, 1000))}")
    for stem in (*rf.HEATMAPS, rf.ENTROPY_FIGURE, Path(rf.BASELINES_FIGURE).stem, rf.ATTENTION_FIGURE):
        if (run_dir / f"{stem}.png").exists():
            console.print(f"{stem}: {text(run_dir / f'{stem}.png')}")
    verdict = summary.get("verdict")
    if isinstance(verdict, dict):  # last: what the study shows, paired against the other columns and controls
        from .stages.verdict import verdict_lines

        for line in verdict_lines(verdict):
            console.print(escape(line), highlight=False, soft_wrap=True)


class StageGroup(click.Group):
    """The `truthmap` group. The stage commands, and the help of `run` that lists the stages, come from the
    stage registry (truthmap/stages/base.py), which imports every stage module (and torch with them); they
    are added the first time a command list or one of them is asked for, so that `truthmap tasks`,
    `report`, `score` … start without that."""

    _loaded = False

    @property
    def commands(self) -> dict:
        self._load()
        return self._commands

    @commands.setter
    def commands(self, value: dict) -> None:
        self._commands = value

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            _stage_commands()

    def get_command(self, ctx, cmd_name):
        if cmd_name in self._commands and cmd_name != "run":  # a command of its own: no registry needed
            return self._commands[cmd_name]
        return super().get_command(ctx, cmd_name)

    def add_command(self, cmd, name=None) -> None:
        self._commands[name or cmd.name] = cmd  # (click's own add_command reads self.commands)


@click.group(cls=StageGroup)
@click.version_option(package_name="truthmap")
def cli():
    """truthmap — where does a language model know that its own answer is wrong?"""


def _run_help() -> str:
    """`truthmap run`'s help: the stages it runs, read from the stage registry."""
    from .pipeline import STAGE_TABLE

    always = [name for name, stage in STAGE_TABLE.items() if stage.when is None]
    asked = [name for name, stage in STAGE_TABLE.items() if stage.when is not None]
    passes = " or ".join(f"--also {name}" for name, stage in STAGE_TABLE.items() if stage.also)
    return (f"Run the whole study: {', '.join(always)}; with {passes} (a study without gold answers always "
            f"samples) also {', '.join(asked)}. Every setting can be given here (or in --config).")


@cli.command(help="Run the whole study.")  # the stages it runs: _run_help(), added with the stage commands
@_settings(None)
def run(config_file, force, **values):
    from .pipeline import run_stages

    config, given = _config(config_file, **values)
    run_dir = run_stages(config, force=force, given=given)
    _report(run_dir)
    from .runfolder import REPORT

    if (run_dir / REPORT).exists():  # a label-free study has no report page
        click.echo(f"report: {run_dir / REPORT}")


def _stage_command(stage):
    """The command of one registered stage (truthmap/stages/base.py): its settings, its help."""
    name = stage.name

    @_settings(name)
    def command(config_file, force, **values):
        from .pipeline import run_stages

        if stage.also:  # asking for the stage by name asks for the pass
            values["also"] = [name]
        config, given = _config(config_file, **values)
        run_dir = run_stages(config, stages=(name,), force=force, given=given)
        click.echo(f"{name}: done ({run_dir})")
        if stage.summary:
            _report(run_dir)

    command.__doc__ = (f"Stage {stage.step}: {stage.help}\n\nThe settings shown are those of this stage; the run's "
                       f"others are continued from its config.json (`truthmap run --help` lists every setting).")
    cli.command(name=name, cls=StageCommand)(command)


def _stage_commands() -> None:
    """One command per registered stage, and `run`'s help (StageGroup adds them when first needed)."""
    from .pipeline import STAGE_TABLE

    run.help = _run_help()
    for stage in STAGE_TABLE.values():
        if stage.name != "report":  # `truthmap report RUN …` writes the page of one or several runs
            _stage_command(stage)


_overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace an existing output that truthmap did not write (a symbolic link is never written through).")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", help="HTML file to write (default: report.html, or report-2.html, … if a file truthmap did "
                             "not write has that name).")
@click.option("--open", "open_", is_flag=True, help="Open the page in the default web browser.")
@_overwrite_option
def report(runs, out, open_, overwrite):
    """The interactive HTML report of one or several run folders (several: side by side and a difference map)."""
    from contextlib import ExitStack

    from . import runfolder as rf
    from .stages.report import write_report

    for run in runs:
        if not Path(run).is_dir():
            raise TruthmapError(f"{run}: no such run folder")
    # not into a run folder by default: there report.html belongs to `truthmap run` (and its manifest)
    with ExitStack() as held:  # every run read under its shared lock, every file checked against its manifest
        held.enter_context(rf.overwriting(overwrite))
        out = rf.guard(Path(out)) if out else rf.free_name(Path("report.html"))
        for run in runs:
            held.enter_context(rf.reading(Path(run)))
        path = write_report([Path(r) for r in runs], out)
    click.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["pdf", "svg", "png"]),
              help="pdf, svg or png (default: from --out's suffix, else pdf).")
@click.option("--width", type=click.FloatRange(1, 40), default=7.0, show_default=True, help="Width in inches.")
@click.option("--height", type=click.FloatRange(1, 40), default=4.2, show_default=True, help="Height in inches.")
@click.option("--font-size", type=click.FloatRange(4, 30), default=8.0, show_default=True, help="Font size in points.")
@click.option("--out", help="The file to write (default: <run folder's name>-figure.<format>, here; -2, -3, … "
                             "added if a file truthmap did not write has that name).")
@_overwrite_option
def figure(run, fmt, width, height, font_size, out, overwrite):
    """A figure for a paper: the heatmap (readable position names, the chosen region, the cells that do not
    beat the controls hatched) beside the baselines and controls with their intervals."""
    from . import runfolder as rf
    from .stages.plot import FIGURE_FORMATS, paper_figure

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise TruthmapError(f"{run}: no such run folder")
    suffix = Path(out).suffix.lower().lstrip(".") if out else ""
    if out and suffix not in FIGURE_FORMATS:
        raise TruthmapError(f"{out}: the figure's file must end in .pdf, .svg or .png")
    if fmt and suffix and fmt != suffix:
        raise TruthmapError(f"{out}: its suffix says {suffix}, --format says {fmt}; give one of them")
    fmt = fmt or suffix or "pdf"
    with rf.overwriting(overwrite):  # never through a link; never over a file truthmap did not write unasked
        path = rf.guard(Path(out)) if out else rf.free_name(Path(f"{run_dir.resolve().name}-figure.{fmt}"))
    with rf.reading(run_dir), rf.overwriting(overwrite):  # the run's files checked, under its shared lock
        written = paper_figure(run_dir, path, width=width, height=height, font_size=font_size)
    click.echo(f"figure: {written}")


@cli.command()
def tasks():
    """List the tasks --dataset accepts (--dataset TASK, TASK:SPLIT or TASK:PATH), one line each."""
    from .tasks import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for task in REGISTRY.values():
        click.echo(f"{task.name:<{width}}  {task.description}")


# ---------------------------------------------------------------- analyses beyond the heatmap (issue 5)

def _cell_options(f):
    options = [
        click.option("--site", default="residual", show_default=True, help="residual, mlp or attention."),
        click.option("--layer", type=int, help="Layer of the probe cell (default: the run's best cell)."),
        click.option("--position", help="Token position of the probe cell (default: the run's best cell)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _cell(run_dir: Path, site: str, layer: int | None, position: str | None) -> dict:
    from .analyses.resample import default_cell

    if layer is None and position is None:
        return default_cell(run_dir)
    if layer is None or position is None:
        raise TruthmapError("give both --layer and --position (or neither, for the run's best cell)")
    from .positions import check_cell

    return check_cell(site, layer, position, "--site/--layer/--position")


def _run_folder(out: str) -> Path:
    from . import runfolder as rf

    run_dir = Path(out)
    rf.check_run_folder(run_dir)
    if not (run_dir / rf.MANIFEST).is_file():
        raise TruthmapError(f"{run_dir}: not a run folder (no manifest.json); give the --out of a finished 'truthmap run'")
    return run_dir


def _deprecated(old: str, new: str) -> None:
    """Say on stderr that a spelling of truthmap 0.1 still works but goes in the next release."""
    click.echo(f"truthmap: warning: '{old}' is deprecated and goes in the next release; use '{new}'", err=True)


def _the_run(command: str, run: str | None, old_out: str | None) -> str:
    """The run a command reads: its argument, or (deprecated, truthmap 0.1) its ``--out``."""
    if run is not None and old_out is not None and Path(run) != Path(old_out):
        raise TruthmapError(f"{command}: give the run once, as its argument ({run}); --out {old_out} names another")
    if run is None and old_out is None:
        raise TruthmapError(f"{command}: name the run folder to read: truthmap {command} RUN")
    if run is None:
        _deprecated(f"truthmap {command} --out RUN", f"truthmap {command} RUN")
    return run if run is not None else old_out


def _new_out(command: str, out: str | None, old_to: str | None) -> str | None:
    """Where a command writes: ``--out``, or (deprecated, truthmap 0.1) ``--to``."""
    if old_to is None:
        return out
    if out is not None:
        raise TruthmapError(f"{command}: give --out once (--to is its old name)")
    _deprecated(f"truthmap {command} --to DIR", f"truthmap {command} --out DIR")
    return old_to


def _model_options(f):
    """--model, --trust-remote-code/--no-trust-remote-code and --progress/--quiet of a command on a held run."""
    options = [_option("model", help="The run's model (default: the embedded default); never taken from the folder."),
               _option("trust_remote_code"), _option("progress")]
    for option in reversed(options):
        f = option(f)
    return f


def _held_config(run_dir: Path, progress, model, trust_remote_code):
    """The Config of a command on a held run folder: the model and trust from the command line only,
    the rest continued from the run (checked: a model other than the run's is refused)."""
    from .config import settings_from
    from .pipeline import continue_config

    given = {"model": model, "trust_remote_code": trust_remote_code, "progress": progress}
    values = {k: v for k, v in given.items() if v is not None}
    config = settings_from(None, {"out": str(run_dir), **values}, "the command line")
    # an analysis runs the run's model in this process, as the samples stage does (never on Ray workers)
    return continue_config(config, run_dir, frozenset(values) | {"out"}, ("samples",))


@cli.command()
@click.option("--train", "train", multiple=True, required=True, help="Run folder(s) or task(s) to train on.")
@click.option("--test", "test", multiple=True, help="Run folder(s) or task(s) to test on.")
@click.option("--site", default="residual", show_default=True)
@click.option("--layer", type=int, required=True)
@click.option("--position", required=True)
@click.option("--model", help="The model whose runs a task name refers to (default: the embedded default).")
@click.option("--out", help="Folder for the outputs (default: <first train run>/transfer).")
@click.option("--to", "to", hidden=True, help="Deprecated: --out.")
@click.option("--bootstrap", type=int, default=1000, show_default=True)
@click.option("--probe", type=click.Choice(["correctness", "entropy", "both"]), default="correctness",
              show_default=True, help="What the probe learns on the train task: wrong vs right answers, or high vs "
                                      "low semantic entropy (no gold label; needs the run's samples), or both.")
@_overwrite_option
def transfer(train, test, site, layer, position, model, out, to, bootstrap, probe, overwrite):
    """Train a probe on one task, test it on others: a task × task AUC matrix (CSV + heatmap)."""
    from . import runfolder as rf
    from .analyses.transfer import run_transfer

    out = _new_out("transfer", out, to)
    with rf.overwriting(overwrite):
        out, grid = run_transfer(list(train), list(test), site=site, layer=layer, position=position, out=out,
                                 model=model, n_boot=bootstrap, probe=probe)
    click.echo(grid.round(3).to_string())
    table = grid.attrs.get("table")
    for row in table.itertuples() if table is not None else []:
        interval = f"{row.auc_lo:.3f}–{row.auc_hi:.3f}" if row.auc_lo == row.auc_lo else "no interval"
        click.echo(f"{row.train} -> {row.test} (seed {row.seed}): AUC {_number(row.auc)} ({interval}) on "
                   f"{row.n_test} test answers in {row.n_test_groups} groups"
                   + (f"; {row.n_shared} sharing a question with the train run left out" if row.n_shared else ""))
    click.echo("transfer: " + ", ".join(str(out / name) for name in rf.TRANSFER_FILES))


@cli.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--out", "old_out", hidden=True, help="Deprecated: the run, as the argument.")
@click.option("--n", "n", type=int, default=10, show_default=True, help="Sampled answers per question.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@_cell_options
@click.option("--batch-size", type=int)
@click.option("--judge-equivalence", is_flag=True,
              help="Also cluster the samples by a model judging equivalence (sampling_scores.parquet).")
@_model_options
def resample(run, old_out, n, temperature, sample_seed, site, layer, position, batch_size, judge_equivalence, model,
             trust_remote_code, progress):
    """N sampled answers per question, error types, and probes predicting each type, added to RUN (a
    finished 'truthmap run')."""
    from . import runfolder as rf
    from .backends import Models
    from .analyses.resample import run_resample
    from .stages.label import judge_model

    run_dir = _run_folder(_the_run("resample", run, old_out))
    with rf.Run.open(run_dir) as held, held.stage("resample"):
        config = _held_config(run_dir, progress, model, trust_remote_code)
        cell = _cell(run_dir, site, layer, position)
        models = Models(config)  # in this process, also for a run made with --ray (docs/scaling.md)
        results = run_resample(models.lm, held, n=n, temperature=temperature, seed=sample_seed, cell=cell,
                               extractor=models.extractor, judge=judge_model(config, models), C=config.C,
                               n_boot=config.bootstrap, batch_size=batch_size, progress=config.progress)
        from .analyses.entropy import refresh_sampling_scores

        refresh_sampling_scores(models.lm, held, (models.extractor or models.lm) if judge_equivalence else None)
    table = results.groupby("error_type", sort=False)[["auc", "n_train_positive", "n_test_positive"]].mean()
    click.echo(table.round(3).to_string())
    click.echo("resample: " + ", ".join(str(run_dir / name) for name in (rf.ERROR_TYPES, rf.ERROR_TYPE_RESULTS,
                                                                           rf.ERROR_TYPES_FIGURE, rf.SAMPLING_SCORES)))
    from .pipeline import run_stages

    # the samples' semantic entropy as baselines, and the semantic-entropy probes
    try:
        run_stages(config, stages=("baselines", "entropy", "plot", "report"))
    except TruthmapError as err:  # the error types above stand; say why the entropy probes do not
        click.echo(f"semantic-entropy probes: not trained ({err})", err=True)
    _report(run_dir)


@cli.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@click.option("--out", "old_out", hidden=True, help="Deprecated: the run, as the argument.")
@_cell_options
@click.option("--detector", "detector_path", help="A folder from 'truthmap export' (default: fit at the cell).")
@click.option("--seed", type=int, help="Split whose test questions are chosen for (default: the first).")
@_model_options
def choose(run, old_out, site, layer, position, detector_path, seed, model, trust_remote_code, progress):
    """Answer choice among the resamples of RUN (where 'truthmap resample' has run): greedy, random, majority
    vote, probe (accuracy per error type), added to RUN."""
    from . import runfolder as rf
    from .analyses.choice import run_choice
    from .backends import Models
    from .analyses.detector import Detector

    run_dir = _run_folder(_the_run("choose", run, old_out))
    detector = Detector.load(detector_path) if detector_path else None
    with rf.Run.open(run_dir) as held, held.stage("choice"):
        config = _held_config(run_dir, progress, model, trust_remote_code)
        cell = None if detector else _cell(run_dir, site, layer, position)
        table = run_choice(Models(config).lm, held, detector=detector, cell=cell, seed=seed, C=config.C,
                           n_boot=config.bootstrap)
    click.echo(table.pivot(index="error_type", columns="strategy", values="accuracy").round(3).to_string())
    click.echo(f"choice: {run_dir / rf.CHOICE}, {run_dir / rf.CHOICE_FIGURE}")


@cli.command()
@click.argument("run", required=False, type=click.Path(file_okay=False))
@_cell_options
@click.option("--seed", type=int, default=0, show_default=True, help="Split to train on (and test on).")
@click.option("--out", help="Detector folder (default: <run>/detectors/<site>-L<layer>-<position>).")
@click.option("--to", "to", hidden=True, help="Deprecated: --out.")
@click.option("--target-false-flag", type=float, default=0.1, show_default=True,
              help="The share of right answers the threshold may flag: set by split-conformal calibration on the "
                   "validation part (README, 'A threshold with a meaning').")
@_overwrite_option
def export(run, site, layer, position, seed, out, to, target_false_flag, overwrite):
    """Save a reusable detector (safetensors weights + a JSON card) for one (layer, position) of RUN, a
    finished 'truthmap run'."""
    from .analyses.detector import Detector, export_detector

    from . import runfolder as rf

    if run is None:  # truthmap 0.1: --out named the run and --to the detector folder
        run, out = _the_run("export", None, out), None
    out = _new_out("export", out, to)
    run_dir = _run_folder(run)
    with rf.reading(run_dir), rf.overwriting(overwrite):  # under the shared lock, every file read checked
        cell = _cell(run_dir, site, layer, position)
        folder = export_detector(run_dir, site=cell["site"], layer=int(cell["layer"]), position=cell["position"],
                                 out=out, seed=seed, target_false_flag=target_false_flag)
    card = Detector.load(folder).card
    click.echo(f"detector: {folder} (test AUC {_number(card['test_auc'], '.4f')} on {card['test_size']} "
               f"answers, trained on {card['train_size']})")
    click.echo(_calibration_line(card))
    curve = card.get("risk_coverage")
    if curve:
        at = curve["at_threshold"]
        click.echo(f"risk-coverage on the test part (n {curve['n']}): area {curve['area']:.3f} (answering all "
                   f"{curve['base']:.3f}, perfect {curve['best']:.3f}); at the threshold it answers "
                   f"{at['coverage']:.0%} with accuracy {_number(at['accuracy'], '.1%')} "
                   f"({folder / 'risk_coverage.png'})")


def _calibration_line(card: dict) -> str:
    """The card's threshold and what it means, one line."""
    calibration = card.get("calibration") or {}
    if calibration.get("status") != "calibrated":
        return f"threshold {card.get('threshold'):.3g}: {calibration.get('status', 'not calibrated')}"
    lo, hi = calibration["interval_95"]
    return (f"threshold {card['threshold']:.4g}: flags at most {calibration['target_false_flag']:.0%} of right answers "
            f"(split-conformal, rank {calibration['rank']} of {calibration['n_right']} right validation answers; "
            f"this calibration's rate lies in {lo:.1%} … {hi:.1%} with 95% probability); on the test part it "
            f"flagged {_number(calibration['test_false_flag_rate'], '.1%')} of {calibration['test_right']} right and "
            f"{_number(calibration['test_flag_rate_wrong'], '.1%')} of {calibration['test_wrong']} wrong answers")


def _detector(path, model, force, dtype, device, target_false_flag=None):
    """The exported detector bound to its model (loaded now, so a wrong model fails before any work).
    ``model``, ``dtype``, ``device``: the settings of the same names, checked by their declarations."""
    from .analyses.detector import Detector, ModelScorer
    from .config import make_config

    given = {k: v for k, v in {"model": model, "dtype": dtype, "device": device}.items() if v is not None}
    checked = make_config(given, "the command line")  # a bad value: one line naming its flag
    scorer = ModelScorer(Detector.load(path), model and checked.model, force, checked.dtype, checked.device,
                         target_false_flag=target_false_flag)
    scorer.lm
    return scorer


@cli.command()
@click.option("--detector", "detector_path", required=True, help="A folder from 'truthmap export'.")
@click.option("--question", "questions", multiple=True, help="A question (repeat, paired with --answer).")
@click.option("--answer", "answers", multiple=True, help="The answer to score (one per --question).")
@click.option("--file", "pairs_file", type=click.Path(dir_okay=False, exists=True),
              help="CSV with columns question, answer; writes the pairs with p_error to --out.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="The scored CSV (default: <file>.scored.csv, or .scored-2.csv, … if a file truthmap did not "
                   "write has that name).")
@_option("model", help="Model to run (default: the detector's own).")
@click.option("--force", is_flag=True, help="Run even if the model differs from the detector's.")
@_option("dtype")
@_option("device")
@click.option("--target-false-flag", type=float,
              help="Flag at a threshold that flags at most this share of right answers (split-conformal, from the "
                   "card's validation scores; default: the card's threshold).")
@_overwrite_option
def score(detector_path, questions, answers, pairs_file, out, model, force, dtype, device, target_false_flag,
          overwrite):
    """P(error) of given question–answer pairs under an exported detector.

    Each answer is also compared with the model's own greedy answer (columns own_answer, model_answer,
    answer_logprob): the detector was trained on the model's own answers, so it warns about any other."""
    import pandas as pd

    from . import runfolder as rf

    if out and not pairs_file:
        raise TruthmapError("--out is where the scores of --file go; give --file pairs.csv")
    target = None
    if pairs_file:  # where the scores go, checked before the model is loaded
        with rf.overwriting(overwrite):
            target = rf.guard(Path(out)) if out else rf.free_name(Path(pairs_file).with_suffix(".scored.csv"))
        table = _read_pairs(Path(pairs_file))
        missing = {"question", "answer"} - set(table.columns)
        if missing:
            raise TruthmapError(f"{pairs_file}: missing column(s) {sorted(missing)} (need question, answer)")
        if table.empty:
            raise TruthmapError(f"{pairs_file}: no rows to score (a header only)")
    else:
        if not questions or len(questions) != len(answers):
            raise TruthmapError("give --question and --answer in pairs (or --file pairs.csv)")
        table = pd.DataFrame({"question": questions, "answer": answers})
    detector = _detector(detector_path, model, force, dtype, device, target_false_flag)
    optional = {name: _optional_column(table, name, pairs_file) for name in ("exact_answer", "gold", "answer_type")}
    if optional["gold"] is not None:
        optional["gold"] = [_gold_cell(g) for g in optional["gold"]]
    scored = detector.score_table(table["question"].tolist(), table["answer"].tolist(), **optional)
    table = pd.concat([table, scored.drop(columns=["question"] + [c for c in optional if c in table.columns
                                                                   and c in scored.columns]).set_index(table.index)],
                      axis=1)
    own = detector.own_answers(table["question"].tolist(), table["answer"].tolist())
    table = pd.concat([table, pd.DataFrame(own, index=table.index)], axis=1)
    if pairs_file:
        with rf.overwriting(overwrite):
            rf.write_csv(target, table)
        click.echo(f"scored: {target}")
    for row in table.to_dict("records"):
        click.echo(f"{_verdict(row, detector, short=True)}  {_shown(row['question'])} -> {_shown(row['answer'])}"
                   f"  [{'the model' if row['own_answer'] else 'NOT the model'}'s own answer; "
                   f"mean log-prob {_number(row['answer_logprob'], '.2f')}]")
    unscored = int(table["p_error"].isna().sum())
    if unscored:
        click.echo(f"warning: {unscored} of {len(table)} answers not scored (P(error) not computed; flagged left "
                   f"empty, status 'not scored', the reason in column 'reason')", err=True)
    for row in table[~table["own_answer"]].itertuples():
        click.echo(f"warning: {_shown(row.question)!r}: the answer is not the model's own (it answers "
                   f"{_shown(row.model_answer)!r}); the detector was trained on the model's own answers, so this "
                   f"P(error) is outside its domain", err=True)


def _read_pairs(path: Path):
    """The question–answer CSV of ``score --file``: UTF-8, at most data.MAX_FILE_BYTES; one-line errors."""
    import pandas as pd

    from .data import MAX_FILE_BYTES, _plain_errors

    if path.stat().st_size > MAX_FILE_BYTES:
        raise TruthmapError(f"{path}: more than the {MAX_FILE_BYTES // 2**20} MiB a question file may hold; split it")

    def whole_table(p):  # one table, its read errors made one line as for a question file
        yield pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8")

    return next(_plain_errors(path, whole_table))


@cli.command()
@click.argument("question")
@click.option("--detector", "detector_path", required=True, help="A folder from 'truthmap export'.")
@_option("model", help="Model to run (default: the detector's own).")
@click.option("--force", is_flag=True, help="Run even if the model differs from the detector's.")
@_option("dtype")
@_option("device")
@click.option("--target-false-flag", type=float,
              help="Flag at a threshold that flags at most this share of right answers (split-conformal, from the "
                   "card's validation scores; default: the card's threshold).")
def ask(question, detector_path, model, force, dtype, device, target_false_flag):
    """Answer a question with the detector's model and flag the answer if it is likely wrong."""
    detector = _detector(detector_path, model, force, dtype, device, target_false_flag)
    result = detector.ask(question)[0]
    click.echo(f"{_shown(result['answer'], 2000)}\n{_verdict(result, detector)}")


def _verdict(row: dict, scorer, short: bool = False) -> str:
    """What the detector says of one scored answer, in words: never "likely right" for an answer it
    could not score; then what the fallback cell says, where the card has one."""
    def said(p, flagged, threshold, card):
        if short:
            return f"P(error) {_number(p)}{'  FLAGGED' if flagged else ''}"
        return (f"P(error) {_number(p)}: {'likely WRONG' if flagged else 'likely right'} (threshold {threshold:.3g}"
                f"{_threshold_meaning(card, getattr(scorer, 'target_false_flag', None))})")

    if row.get("status") != "not scored":
        return said(row["p_error"], row["flagged"], scorer.threshold, scorer.card)
    card = scorer.card
    line = f"P(error) NOT COMPUTED at {card['position']}: {row['reason']}"
    fallback = scorer.fallback
    p = row.get("fallback_p_error")
    if fallback is not None and p is not None and p == p:
        auc = fallback.card.get("test_auc")
        line += (f"; at position {fallback.card['position']} instead (a separate detector, test AUC "
                 f"{_number(auc, '.3f')}): {said(p, row['fallback_flagged'], scorer.fallback_threshold, fallback.card)}")
    else:
        line += "; no verdict"
    return line


def _threshold_meaning(card: dict, target: float | None) -> str:
    """", flags at most 10% of right answers (split-conformal)" where the threshold has that meaning."""
    calibration = card.get("calibration") or {}
    if target is None and calibration.get("status") == "calibrated":
        target = calibration["target_false_flag"]
    if target is None:
        return ", not calibrated"
    return f", flags at most {target:.0%} of right answers: split-conformal on {len(calibration['right_scores'])} right validation answers"


def _optional_column(table, name: str, path):
    """The values of an optional column of ``score --file`` (None when absent); a blank cell is unknown."""
    if path is None or name not in table.columns:
        return None
    return [None if not str(v).strip() else str(v) for v in table[name]] if name != "gold" else list(table[name])


def _gold_cell(value) -> list[str]:
    """A ``gold`` cell of ``score --file``: aliases separated by '|' (blank: none)."""
    return [g.strip() for g in str(value or "").split("|") if g.strip()]


def expand_multi_value(argv: list[str]) -> list[str]:
    """Let list options take several values after one flag: '--seeds 0 1 2' -> '--seeds 0 --seeds 1 --seeds 2'.

    In a command on one probe cell, ``--site`` takes one value (``export --site mlp RUN``: RUN is the run)."""
    multi = [o for o in _multi_value() if not (o == "--site" and argv and argv[0] in ONE_CELL)]
    out, current = [], None
    for arg in argv:
        if arg in multi:
            current = arg
            continue
        if current and not arg.startswith("--") and not (current != "--positions" and arg.startswith("-")):
            out += [current, arg]
            continue
        if current and arg.startswith("-") and arg[1:].isdigit() and current == "--positions":
            out += [current, arg]
            continue
        current = None
        out.append(arg)
    return out


def app(argv: list[str] | None = None) -> None:
    """Entry point: expand multi-value options, run, and turn TruthmapError into one line + exit 2."""
    argv = expand_multi_value(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="truthmap", standalone_mode=False)
    except TruthmapError as err:
        from .runfolder import sanitise

        click.echo(f"error: {sanitise(err, 4000)}", err=True)  # one line, whatever text a file put in it
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except Exception:  # a bug: its traceback, then what to do with it
        import traceback

        traceback.print_exc()
        click.echo(f"error: {internal_error_line()}", err=True)
        sys.exit(1)


def internal_error_line() -> str:
    """The line under an unexpected exception's traceback: a bug, where to report it, with which versions."""
    import platform

    from .constants import __version__

    versions = [f"truthmap {__version__}", f"python {platform.python_version()}"]
    for name in ("torch", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
    return (f"an internal error of truthmap, not a problem with your input ({', '.join(versions)}); please report it "
            f"with the traceback above. What earlier stages finished stays in the run folder")


if __name__ == "__main__":
    app()
