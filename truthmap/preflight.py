"""What can be checked before the model answers, said or refused at the start of a study.

Reads the questions table (data.load_questions) and the settings; writes nothing. The pipeline calls
:func:`check_questions` before generation, and for a new run folder before the folder is made, so a refused
input leaves no folder behind. It announces each change of mode a user might not expect — a study without
gold answers (label-free), the reference protocol — on stderr, one line each (``truthmap: …``), and refuses
at once a file too small for the fractions and ``min_per_class``, with the smallest ``--limit`` and the
largest ``--min-per-class`` that would work.
"""

from __future__ import annotations

import math
import sys

import pandas as pd

from .config import Config
from .errors import TruthmapError


def notice(text: str) -> None:
    """One line on stderr: a change of mode or a choice the user should know before the work."""
    from .runfolder import sanitise

    print(f"truthmap: {sanitise(text, 1000)}", file=sys.stderr)


def check_questions(questions: pd.DataFrame, config: Config) -> None:
    """Announce the study's modes and refuse a questions table that cannot give the class counts asked.

    ``questions``: data.load_questions' table (its ``gold`` lists; ``attrs["source_rows"]["used"]``: the good
    rows of the whole source, of which ``--limit`` took a sample)."""
    source = config.dataset
    labelled = bool(len(questions)) and bool((questions["gold"].map(len) > 0).all())
    if not labelled:
        notice(f"{source}: no answer column (answers, answer or gold, matched ignoring case; or name it with "
               f"--answer-column): a label-free study — the answers are not graded, {config.samples} sampled "
               f"answers per question train semantic-entropy probes, and no correctness AUC exists")
    if config.protocol == "reference":
        notice("protocol reference: the reference study's prompts (the question alone, no 'Answer briefly') and "
               "answer lengths (100 new tokens, math 200); --protocol brief is the default")
    if labelled:
        available = (questions.attrs.get("source_rows") or {}).get("used", len(questions))
        check_class_counts(len(questions), available, config, source)


def check_class_counts(n: int, available: int, config: Config, source: str) -> None:
    """Refuse ``n`` questions whose smallest part of a split (train, validation, test, by the fractions) would
    hold fewer than ``2 × min_per_class`` answers: even at 50% accuracy it could not hold ``min_per_class``
    right and as many wrong answers. ``available``: the questions the source holds (for the smallest
    ``--limit`` that would work). A necessary condition only: the labels, the population rule and the
    grouping decide the rest after generation."""
    parts = {"train": 1.0 - config.test_fraction - config.validation_fraction,
             "validation": config.validation_fraction, "test": config.test_fraction}
    part, fraction = min(parts.items(), key=lambda kv: kv[1])
    per_class = config.min_per_class
    if n * fraction >= 2 * per_class - 1e-9:
        return
    fixes = []
    least_n = math.ceil(2 * per_class / fraction - 1e-9)
    if least_n <= available:
        fixes.append(f"study at least {least_n} questions (--limit {least_n})")
    most_per_class = math.floor(n * fraction / 2 + 1e-9)
    if most_per_class >= 2:
        fixes.append(f"lower --min-per-class to {most_per_class}")
    fix = " or ".join(fixes) if fixes else f"a study needs at least {least_n} questions at these fractions"
    raise TruthmapError(f"{source}: {n} questions cannot give {per_class} right and {per_class} wrong answers to "
                        f"every part of a split: the {part} part ({fraction:g} of them) would hold about "
                        f"{n * fraction:.0f} answers, fewer than the {2 * per_class} that needs even at 50% "
                        f"accuracy; {fix}")


def check_population(splits: dict, n_answers: int) -> None:
    """Announce a population rule that leaves more than a tenth of the answers out of every cell."""
    left_out = list(splits.get("left_out", {}).values())
    if not n_answers or len(left_out) <= n_answers / 10:
        return
    reasons = pd.Series(left_out, dtype=object).value_counts()
    notice(f"population ({splits.get('population')}): {len(left_out)} of {n_answers} answers "
           f"({len(left_out) / n_answers:.0%}) are left out of every cell ("
           + ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
           + "); --population each gives every column the answers where its position exists")
