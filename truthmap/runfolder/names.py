"""The names of a run folder's files: every file a stage or command writes is named here, once.

Nothing here reads or writes; docs/run-folder.md says what each file holds.
"""

from __future__ import annotations

import re

# Every file of a run folder is named here, and written by exactly one stage or command
# (docs/run-folder.md; each stage's declaration, stages/base.py, lists its inputs and outputs).
QUESTIONS = "questions.parquet"  # generate
VOCABULARIES = "vocabularies.json"  # generate
GENERATIONS = "generations.parquet"  # generate
GENERATION_CHUNKS = "generations"  # generate: chunk-00000.parquet, … : finished pieces of the stage
CHUNK_PLAN = "plan.json"  # generate: inside GENERATION_CHUNKS, what the chunks were computed from
ANSWERS = "answers.parquet"  # label
SPLITS = "splits.json"  # label
ACTIVATIONS = "activations"  # extract
ACTIVATIONS_INDEX = f"{ACTIVATIONS}/index.json"  # extract: read with read_activations_index
ACTIVATIONS_VALID = f"{ACTIVATIONS}/valid.npy"  # extract
ACTIVATIONS_FINGERPRINT = f"{ACTIVATIONS}/fingerprint"  # extract: the inputs its finished shards came from
RESAMPLES = "resamples.parquet"  # samples (run --also samples) or the resample command
SAMPLING_SCORES = "sampling_scores.parquet"  # samples or the resample command
PROBE_RESULTS = "probe_results.csv"  # probe: the probes' rows only
PROBE_SCORES = "probe_scores.parquet"  # probe
WHOLEMAP_RESULTS = "wholemap_results.csv"  # wholemap: the columns of PROBE_RESULTS, site = whole_map
WHOLEMAP_SCORES = "wholemap_scores.parquet"  # wholemap
CELL_NULL = "cell_null.csv"  # wholemap: each cell's p under the permutation null
COST = "cost.csv"  # cost: every method's test AUC and extra cost beyond answering
COST_FIGURE = "cost.png"  # cost
BASELINE_SCORES = "baseline_scores.parquet"  # baselines
BASELINE_RESULTS = "baseline_results.csv"  # baselines: the columns of PROBE_RESULTS, site = baseline
FAMILY_RESULTS = "family_results.csv"  # baselines
BASELINES_FIGURE = "baselines.png"  # baselines
ENTROPY_RESULTS = "entropy_probe_results.csv"  # entropy
ENTROPY_SCORES = "entropy_probe_scores.parquet"  # entropy
ENTROPY_FIGURE = "heatmap_entropy"  # entropy: .png and .svg
ATTENTION = "attention.csv"  # attention
ATTENTION_FIGURE = "attention"  # attention: .png and .svg
HEATMAP, HEATMAP_WITHIN = "heatmap", "heatmap_within"  # plot: .png and .svg of each
HEATMAPS = (HEATMAP, HEATMAP_WITHIN)
FIGURE_SUFFIXES = (".png", ".svg")
REPORT = "report.html"  # report
ERROR_TYPES = "error_types.parquet"  # the resample command
ERROR_TYPE_RESULTS = "error_type_results.csv"  # the resample command
ERROR_TYPES_FIGURE = "error_types.png"  # the resample command
CHOICE = "choice.csv"  # the choose command
CHOICE_ANSWERS = "choice_answers.parquet"  # the choose command
CHOICE_FIGURE = "choice.png"  # the choose command
DETECTORS = "detectors"  # the export command: detectors/<site>-L<layer>-<position>/
TRANSFER = "transfer"  # the transfer command's default folder, holding TRANSFER_FILES
TRANSFER_FILES = ("transfer.csv", "transfer_matrix.csv", "transfer.png")
SUMMARY = "summary.json"  # every stage
CONFIG = "config.json"  # every command
STAGES = "stages.json"  # every stage
MANIFEST = "manifest.json"  # every write
LOCK = "lock"  # every command
RUN_FILES = frozenset({SUMMARY, STAGES, CONFIG})  # written by every stage or by none
TMP_SUFFIX = ".truthmap.tmp"
# atomic_path's temporary files, .<name>.<random>.truthmap.tmp: only these are ever deleted as leftovers
# (a user's .draft.tmp or .idea.v2.tmp is not truthmap's)
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.truthmap\.tmp$")


def figures(stem: str) -> list[str]:
    """The file names of a figure saved as PNG and SVG."""
    return [stem + suffix for suffix in FIGURE_SUFFIXES]


# what truthmap writes at the top of a run folder (docs/run-folder.md): a folder holding anything else and
# no manifest is not a run folder, and is refused untouched
OWN_NAMES = frozenset({
    QUESTIONS, VOCABULARIES, GENERATIONS, GENERATION_CHUNKS, ANSWERS, SPLITS, ACTIVATIONS, PROBE_RESULTS,
    PROBE_SCORES, SUMMARY, CONFIG, STAGES, MANIFEST, LOCK, *(f for stem in HEATMAPS for f in figures(stem)),
    BASELINE_SCORES, BASELINE_RESULTS, FAMILY_RESULTS, BASELINES_FIGURE, ATTENTION, *figures(ATTENTION_FIGURE),
    RESAMPLES, SAMPLING_SCORES, ENTROPY_RESULTS, ENTROPY_SCORES, *figures(ENTROPY_FIGURE), ERROR_TYPES,
    ERROR_TYPE_RESULTS, ERROR_TYPES_FIGURE, CHOICE, CHOICE_ANSWERS, CHOICE_FIGURE, DETECTORS, TRANSFER, REPORT,
    WHOLEMAP_RESULTS, WHOLEMAP_SCORES, CELL_NULL, COST, COST_FIGURE,
})
OWN_FOLDERS = (GENERATION_CHUNKS, ACTIVATIONS, *(f"{ACTIVATIONS}/{site}" for site in ("residual", "mlp", "attention")))
# the folders below the run folder that hold only what truthmap writes there
OWN_PREFIXES = (f"{GENERATION_CHUNKS}/", f"{ACTIVATIONS}/", f"{DETECTORS}/", f"{TRANSFER}/")


def own_key(key: str) -> bool:
    """Whether ``key`` (a path relative to a run folder) is a name truthmap writes there: at the top, one
    of OWN_NAMES; below, anything inside its own folders."""
    return ("/" not in key and key in OWN_NAMES) or key.startswith(OWN_PREFIXES)
