"""truthmap — where does a language model know that its own answer is wrong?

A causal LM answers questions; the answers are graded; hidden states are read at a fixed set of token
positions at every layer; a linear probe per (layer, position) predicts "this answer is wrong"; the
probe AUCs are drawn as a heatmap. See README.md and docs/run-folder.md.
"""

from __future__ import annotations

from .constants import __version__

from .analyses.detector import Detector, ModelScorer
from .errors import TruthmapError


def __getattr__(name):
    # load_features needs torch; importing it lazily keeps `import truthmap.runfolder` and the CLI's
    # error messages fast
    if name == "load_features":
        from .stages.extract import load_features

        return load_features
    raise AttributeError(f"module 'truthmap' has no attribute '{name}'")


def run(
    model: str | None = None,
    dataset: str | None = None,
    limit: int | None = None,
    out: str | None = None,
    seeds: list[int] | None = None,
    sites: str | list[str] | None = None,
    config: str | None = None,
    force: bool = False,
    **settings,
):
    """Run the whole study and return the AUC table (``probe_results.csv``, then the baselines' rows of
    ``baseline_results.csv``) as a DataFrame; for a study without gold answers, the semantic-entropy
    probes' table (``entropy_probe_results.csv``).

    Arguments mirror ``truthmap run``; any other field of :class:`truthmap.config.Config` can be
    passed by name (``positions=[...]``, ``max_new_tokens=32``, ``device="cuda"``, …). ``sites`` may be
    one site's name; ``site=`` (an earlier spelling) still works.
    """
    from .config import settings_from
    from .pipeline import run_stages

    if "site" in settings:  # the earlier keyword
        if sites is not None:
            raise TruthmapError("truthmap.run(): give sites=, not both sites= and site=")
        sites = settings.pop("site")
    sites = [sites] if isinstance(sites, str) else sites
    cfg = settings_from(config, dict(model=model, dataset=dataset, limit=limit, out=out, seeds=seeds, sites=sites,
                                     **settings), "truthmap.run()")
    run_dir = run_stages(cfg, force=force)
    from .metrics import read_results, read_run_results
    from .runfolder import ENTROPY_RESULTS, PROBE_RESULTS

    if (run_dir / PROBE_RESULTS).exists() or not (run_dir / ENTROPY_RESULTS).exists():
        return read_run_results(run_dir)  # the probes' rows, then the baselines' (site = baseline)
    return read_results(run_dir / ENTROPY_RESULTS)


__all__ = ["run", "load_features", "Detector", "ModelScorer", "TruthmapError", "__version__"]
