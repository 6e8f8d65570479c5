"""The token positions a study reads, in one place: their names, how a name is checked, and where each
one falls in a sequence (prompt tokens, then answer tokens).

Named positions (``NAMED_POSITIONS``) are found from the prompt's length, the answer's length and the
exact answer's first and last token; ``-k`` is the k-th token from the end of the whole sequence, prompt
included (as the reference study counts). A probe cell is (site, layer, position): :func:`check_cell`.

Reads and writes nothing. The label stage (stages/label.py) writes each answer's position indices as the
``pos_<name>`` columns of answers.parquet; the settings (config.py), the probes' views, the baselines and
a detector scoring new answers read these names from here.
"""

from __future__ import annotations

import re

from .constants import SITES
from .errors import TruthmapError
from .runfolder import sanitise

# token positions by name, then -k: the k-th token from the end
NAMED_POSITIONS = (
    "last_q",
    "first_answer",
    "second_answer",
    "exact_answer_before_first",
    "exact_answer_first",
    "exact_answer_last",
    "exact_answer_after_last",
)
DEFAULT_POSITIONS = list(NAMED_POSITIONS) + [str(-k) for k in range(8, 0, -1)]
EXACT_POSITIONS = {p for p in NAMED_POSITIONS if p.startswith("exact_answer")}  # exist only with an exact answer
_FROM_THE_END = re.compile(r"-[1-9][0-9]{0,5}")  # ASCII digits only: no "-²"


def is_position(name) -> bool:
    """Whether ``name`` is a position: one of NAMED_POSITIONS or -1, -2, … (up to six digits)."""
    return isinstance(name, str) and (name in NAMED_POSITIONS or _FROM_THE_END.fullmatch(name) is not None)


def check_positions(positions: list[str]) -> list[str]:
    """``positions`` if every one is a position and none repeats; else a one-line error."""
    for p in positions:
        if not is_position(p):
            raise TruthmapError(f"position '{p}': use one of {', '.join(NAMED_POSITIONS)} or -1, -2, … (from the end)")
    if len(set(positions)) != len(positions):
        raise TruthmapError(f"positions {positions}: each position may appear once")
    return list(positions)


def check_cell(site, layer, position, source="the cell") -> dict:
    """A probe cell {site, layer, position} whose values can name files: a known site, a whole layer
    number, a position name; a one-line error (naming ``source``) otherwise."""
    if site not in SITES:
        raise TruthmapError(f"{source}: site {sanitise(repr(site), 60)} is not one of {', '.join(SITES)}")
    if (isinstance(layer, bool) or not isinstance(layer, (int, float)) or not 0 <= layer < 100_000
            or layer != int(layer)):  # the range first: int() of an infinity (JSON 1e400) raises
        raise TruthmapError(f"{source}: layer {sanitise(repr(layer), 60)} is not a layer number")
    if not is_position(position):
        raise TruthmapError(f"{source}: position {sanitise(repr(position), 60)} is not a position name")
    return {"site": site, "layer": int(layer), "position": position}


def site_rows(lm, site: str) -> list[int]:
    """The layer numbers a site is read at in a model of ``lm.n_layers`` blocks: 0 … n for the residual
    stream (0: the embeddings), 1 … n for the mlp and attention outputs."""
    return list(range(0, lm.n_layers + 1)) if site == "residual" else list(range(1, lm.n_layers + 1))


def token_char_spans(tokenizer, answer_ids: list[int], answer: str) -> list[tuple[int, int]]:
    """Character span of each answer token in ``answer`` (the decoded text); special tokens get (n, n).

    Uses the tokenizer's offset mapping on the decoded text when re-tokenising it gives back the
    generated ids (the usual case); otherwise the spans come from decoding growing prefixes.
    """
    special = set(tokenizer.all_special_ids)
    content = [t for t in answer_ids if t not in special]
    n_special_tail = len(answer_ids) - len(content)
    if content == answer_ids[: len(content)]:
        enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == content:
            return [tuple(o) for o in enc["offset_mapping"]] + [(len(answer), len(answer))] * n_special_tail
    spans, previous = [], 0
    for k in range(1, len(answer_ids) + 1):
        end = min(len(tokenizer.decode(answer_ids[:k], skip_special_tokens=True)), len(answer))
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    return spans


def char_span_to_tokens(spans: list[tuple[int, int]], start: int, end: int, text: str) -> tuple[int, int] | None:
    """First and last token index whose characters overlap [start, end) at a non-space character."""
    hits = [
        k
        for k, (s, e) in enumerate(spans)
        if s < end and e > start and text[max(s, start) : min(e, end)].strip()
    ]
    return (hits[0], hits[-1]) if hits else None


def position_indices(
    n_prompt: int, n_answer: int, exact_tokens: tuple[int, int] | None, positions: list[str]
) -> dict[str, int]:
    """Index of each position in prompt_ids + answer_ids; -1 where the position does not exist (e.g.
    ``second_answer`` of a one-token answer, or an exact-answer position without an exact answer)."""
    total = n_prompt + n_answer
    out = {}
    for p in positions:
        if p == "last_q":
            index = n_prompt - 1
        elif p == "first_answer":
            index = n_prompt if n_answer >= 1 else -1
        elif p == "second_answer":
            index = n_prompt + 1 if n_answer >= 2 else -1
        elif p in EXACT_POSITIONS:
            if exact_tokens is None:
                index = -1
            else:
                first, last = exact_tokens
                index = n_prompt + {
                    "exact_answer_before_first": first - 1,
                    "exact_answer_first": first,
                    "exact_answer_last": last,
                    "exact_answer_after_last": last + 1,
                }[p]
                if index >= total:
                    index = -1
        else:  # "-k": k-th token from the end of the whole sequence, prompt included (as the reference
            index = total + int(p)  # study counts), so it exists for every answer of a usual length
            if index < 0:
                index = -1
        out[p] = index
    return out
