"""The ``truthmap`` command: ``run`` does the whole study; ``generate | label | extract | probe | plot``
run one stage each on a run folder; ``report`` writes the HTML page of one or several run folders.
Every command prints one clear line on bad input (exit status 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import TruthmapError

MULTI_VALUE = ("--seeds", "--site", "--positions")


def _common(f):
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings."),
        click.option("--model", help="Hub id, local folder, .gguf file, or the embedded default."),
        click.option("--dataset", help="A task (see `truthmap tasks`), TASK:SPLIT, TASK:PATH, a CSV/JSONL/Parquet path, "
                                       "or a hub dataset id. Default: facts (built in)."),
        click.option("--data-dir", help="Folder holding task files by their reference names (default $TRUTHMAP_DATA_DIR or ./data)."),
        click.option("--on-bad-row", type=click.Choice(["error", "skip"]),
                     help="A source row that cannot become a question: stop with its file and row (default) or skip it."),
        click.option("--limit", type=int, help="Study a deterministic sample of N questions."),
        click.option("--out", help="Run folder (default runs/<model>-<dataset>)."),
        click.option("--seeds", type=int, multiple=True, help="Split/probe seeds, e.g. --seeds 0 1 2."),
        click.option("--site", "sites", multiple=True, help="residual (default), mlp, attention."),
        click.option("--positions", multiple=True, help="Token positions (columns), in order."),
        click.option("--max-new-tokens", type=int),
        click.option("--long-prompts", type=click.Choice(["truncate", "skip"]),
                     help="A prompt longer than the model's context: cut its middle (default) or skip the question."),
        click.option("--batch-size", type=int),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
        click.option("--device", help="auto, cpu, cuda, cuda:N."),
        click.option("--device-map", help="e.g. auto: spread a large model over several GPUs."),
        click.option("--trust-remote-code", is_flag=True, default=None, help="Run the model repo's own code."),
        click.option("--extractor-model", help="Model asked for exact answers the rules miss ('none' to skip)."),
        click.option("--question-column"),
        click.option("--answer-column"),
        click.option("--bootstrap", type=int, help="Bootstrap resamples for AUC intervals."),
        click.option("--force", is_flag=True, help="Rerun the stage(s) even if their inputs are unchanged."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(config_file, quiet, **values):
    from .config import load_config
    from .pipeline import saved_config

    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    values = {k: v for k, v in values.items() if v not in (None, [])}
    values["progress"] = not quiet
    if config_file is None and values.get("out") and (Path(values["out"]) / "config.json").exists():
        # a stage command on an existing run folder continues with that run's settings
        base = saved_config(Path(values["out"]))
        base.update(values)
        values = base
    return load_config(config_file, **values)


def _report(run_dir: Path) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    summary = json.loads((run_dir / "summary.json").read_text())
    console = Console()
    console.print(f"model accuracy {summary.get('accuracy', float('nan')):.1%} on {summary.get('n')} questions; "
                  f"valid exact answers {summary.get('valid_exact_answer_rate', float('nan')):.1%}")
    table = Table(title="top cells (mean AUC over seeds)")
    for column in ("site", "layer", "position", "AUC", "95% CI", "n_test"):
        table.add_column(column)
    for cell in summary.get("top_cells", []):
        table.add_row(cell["site"], str(cell["layer"]), cell["position"], f"{cell['auc']:.3f} ± {cell['auc_std']:.3f}",
                      f"{cell['auc_lo']:.3f}–{cell['auc_hi']:.3f}", str(int(cell["n_test"])))
    console.print(table)
    if (run_dir / "heatmap.png").exists():
        console.print(f"heatmap: {run_dir / 'heatmap.png'}")


@click.group()
@click.version_option(package_name="truthmap")
def cli():
    """truthmap — where does a language model know that its own answer is wrong?"""


@cli.command()
@_common
def run(config_file, force, quiet, **values):
    """Run the whole study: generate, label, extract, probe, plot."""
    from .pipeline import run_stages

    run_dir = run_stages(_config(config_file, quiet, **values), force=force)
    _report(run_dir)


def _stage_command(name: str, doc: str):
    @_common
    def command(config_file, force, quiet, **values):
        from .pipeline import run_stages

        run_dir = run_stages(_config(config_file, quiet, **values), stages=(name,), force=force)
        click.echo(f"{name}: done ({run_dir})")
        if name in ("probe", "plot"):
            _report(run_dir)

    command.__doc__ = doc
    cli.command(name=name)(command)


for _name, _doc in [
    ("generate", "Stage 1: the model answers every question (generations.parquet)."),
    ("label", "Stage 2: grade answers, locate exact answers and positions (answers.parquet, splits.json)."),
    ("extract", "Stage 3: hidden states at the positions, every layer (activations/)."),
    ("probe", "Stage 4: a probe per (site, layer, position, seed) (probe_results.csv)."),
    ("plot", "Stage 5: the heatmap (heatmap.png, heatmap.svg)."),
]:
    _stage_command(_name, _doc)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="report.html", show_default=True, help="HTML file to write.")
@click.option("--open", "open_", is_flag=True, help="Open the page in the default web browser.")
def report(runs, out, open_):
    """The interactive HTML report of one or several run folders (several: side by side and a difference map)."""
    from .report import write_report

    for run in runs:
        if not Path(run).is_dir():
            raise TruthmapError(f"{run}: no such run folder")
    # not into a run folder by default: there report.html belongs to `truthmap run` (and its manifest)
    path = write_report([Path(r) for r in runs], Path(out))
    click.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@cli.command()
def tasks():
    """List the tasks --dataset accepts (--dataset TASK, TASK:SPLIT or TASK:PATH), one line each."""
    from .tasks import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for task in REGISTRY.values():
        click.echo(f"{task.name:<{width}}  {task.description}")


def expand_multi_value(argv: list[str]) -> list[str]:
    """Let list options take several values after one flag: '--seeds 0 1 2' -> '--seeds 0 --seeds 1 --seeds 2'."""
    out, current = [], None
    for arg in argv:
        if arg in MULTI_VALUE:
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
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    app()
