"""Property-based tests (hypothesis): loaders fed random bytes and random unicode, alias normalisation and
matching, exact-answer spans on random tokenisations, and the position indices.

Each property is a statement a wrong implementation breaks: a loader that lets a library exception
through, a match whose span does not hold the phrase, a token range that misses a character of the
exact answer, a position index outside the sequence.
"""

import io
import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from truthmap import textmatch
from truthmap.data import load_questions
from truthmap.errors import TruthmapError
from truthmap.positions import DEFAULT_POSITIONS, char_span_to_tokens, position_indices, token_char_spans

FILES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FAST = settings(max_examples=250, deadline=None)

# text of every script, control characters and combining marks included (no lone surrogates: a file
# cannot hold them as UTF-8)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
WORDY = st.text(st.characters(categories=("L", "N", "Zs", "P", "Mn")), min_size=1, max_size=30)
# the same text around one visible character: never blank, so no example is thrown away for it
NONBLANK = st.builds(lambda head, mark, tail: head + mark + tail, TEXT,
                     st.characters(categories=("L", "N", "P", "S"), exclude_characters="["), TEXT)


# ---------------------------------------------------------------- loaders

def valid_rows():
    rows = [{"id": f"q{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    return rows


def seed_bytes(suffix: str) -> bytes:
    rows = valid_rows()
    if suffix == ".csv":
        return pd.DataFrame(rows).to_csv(index=False).encode()
    if suffix == ".jsonl":
        return "\n".join(json.dumps(r) for r in rows).encode()
    if suffix == ".json":
        return json.dumps(rows).encode()
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return buffer.getvalue()


def assert_well_formed(table: pd.DataFrame) -> None:
    """What every later stage relies on, whatever the file held."""
    assert len(table) > 0 and table["id"].is_unique
    assert all(isinstance(i, str) for i in table["id"])
    assert all(isinstance(q, str) and q.strip() for q in table["question"])
    assert all(isinstance(a, str) and a.strip() for g in table["gold"] for a in g)
    # every question answered, or none (a question-only file, say one whose answer column lost its name,
    # is a study without gold answers)
    assert all(len(g) > 0 for g in table["gold"]) or all(len(g) == 0 for g in table["gold"])


def load_or_clear_error(path):
    """load_questions either returns a well-formed table or raises TruthmapError naming the file."""
    try:
        table, _ = load_questions(str(path))
    except TruthmapError as err:
        assert str(path.name) in str(err) and "Traceback" not in str(err)
        return None
    assert_well_formed(table)
    return table


@FILES
@given(suffix=st.sampled_from([".csv", ".jsonl", ".json", ".parquet"]), data=st.binary(max_size=400))
def test_random_bytes_give_a_table_or_a_clear_error(tmp_path, suffix, data):
    path = tmp_path / f"questions{suffix}"
    path.write_bytes(data)
    load_or_clear_error(path)


@FILES
@given(suffix=st.sampled_from([".csv", ".jsonl", ".json", ".parquet"]),
       edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=0, max_size=8), st.integers(0, 8)),
                      min_size=1, max_size=4))
def test_damaged_valid_files_give_a_table_or_a_clear_error(tmp_path, suffix, edits):
    """A valid file with bytes replaced, inserted or cut (the common damage of a real file)."""
    data = bytearray(seed_bytes(suffix))
    for where, insert, cut in edits:
        at = int(where * len(data))
        data[at : at + cut] = insert
    path = tmp_path / f"questions{suffix}"
    path.write_bytes(bytes(data))
    load_or_clear_error(path)


@FILES
@given(rows=st.lists(st.tuples(NONBLANK, NONBLANK), min_size=1, max_size=6),
       suffix=st.sampled_from([".csv", ".jsonl", ".parquet"]))
def test_any_unicode_survives_the_round_trip_through_a_file(tmp_path, rows, suffix):
    questions = [q for q, _ in rows]
    answers = [a for _, a in rows]
    # a gold cell that starts with "[" is read as a JSON list, by design
    assume(all(not a.strip().startswith("[") for a in answers))
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(len(rows))], "question": questions, "answer": answers})
    path = tmp_path / f"questions{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False, encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")), encoding="utf-8")
    else:
        frame.to_parquet(path)
    table = load_or_clear_error(path)
    if table is None:  # only for a reason a user can see in the text: say which
        return
    assert table["id"].tolist() == frame["id"].tolist()
    assert table["question"].tolist() == [q.strip() for q in questions]
    assert [g[0] for g in table["gold"]] == [a.strip() for a in answers]


@FILES
@given(n_rows=st.integers(0, 4), duplicate=st.sampled_from(["id", "none"]))
def test_duplicate_ids_and_empty_tables_are_named(tmp_path, n_rows, duplicate):
    rows = [{"id": "same" if duplicate == "id" else f"q{i}", "question": f"Q{i}?", "answer": "x"} for i in range(n_rows)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    if n_rows == 0:
        with pytest.raises(TruthmapError, match="empty|no questions"):
            load_questions(str(path))
    elif duplicate == "id" and n_rows > 1:
        with pytest.raises(TruthmapError, match=r"row 2, field 'id': duplicate id 'same'"):
            load_questions(str(path))
    else:
        assert len(load_questions(str(path))[0]) == n_rows


@FILES
@given(column=st.sampled_from(["id", "question", "answer", "family"]), suffix=st.sampled_from([".csv", ".jsonl", ".json"]))
def test_a_column_named_twice_is_refused_not_guessed(tmp_path, column, suffix):
    names = ["id", "question", "answer", "family"]
    header = names + [column]
    values = ["q1", "Q?", "a", "f", "other"]
    path = tmp_path / f"questions{suffix}"
    if suffix == ".csv":
        path.write_text(",".join(header) + "\n" + ",".join(values) + "\n")
    else:
        record = "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(header, values)) + "}"
        path.write_text(record if suffix == ".jsonl" else f"[{record}]")
    with pytest.raises(TruthmapError, match=rf"{path.name}.*'{column}'"):
        load_questions(str(path))


# ---------------------------------------------------------------- normalisation and matching

@FAST
@given(TEXT)
@example("Ǆ ¼")  # compatibility forms of two letters, and of a fraction
@example("1,000.50 vs -3 in 2-3")
def test_each_word_is_its_own_span_normalised(text):
    """The span of every word, normalised alone, gives back that word: matches map onto the answer."""
    found = textmatch.words(text)
    for w in found:
        assert 0 <= w.start < w.end <= len(text)
        assert textmatch.normalize(text[w.start : w.end]) == w.norm
    assert [w.end for w in found] == sorted(w.end for w in found) and all(
        a.end <= b.start for a, b in zip(found, found[1:]))
    assert textmatch.normalize(text) == " ".join(w.norm for w in found)


@FAST
@given(prefix=TEXT, phrase=WORDY, suffix=TEXT)
def test_a_phrase_set_apart_by_spaces_is_found_and_its_span_holds_it(prefix, phrase, suffix):
    assume(textmatch.normalize(phrase))
    text = f"{prefix} {phrase} {suffix}"
    span = textmatch.find_phrase(textmatch.words(text), phrase)
    assert span is not None
    start, end = span
    assert textmatch.normalize(text[start:end]) == textmatch.normalize(phrase)
    assert start <= len(prefix) + 1 + len(phrase)  # this occurrence, or an earlier one


@FAST
@given(text=TEXT, phrases=st.lists(WORDY, min_size=1, max_size=4))
def test_first_match_is_the_earliest_occurrence_of_any_phrase(text, phrases):
    best = textmatch.first_match(text, phrases)
    answer_words = textmatch.words(text)
    spans = [s for p in phrases if (s := textmatch.find_phrase(answer_words, p))]
    if best is None:
        assert spans == []
        return
    phrase, start, end = best
    assert phrase in phrases and textmatch.normalize(text[start:end]) == textmatch.normalize(phrase)
    assert start == min(s for s, _ in spans)


@FAST
@given(st.integers(-10**12, 10**12), st.integers(0, 3))
def test_numbers_compare_as_numbers(n, zeros):
    plain = str(n)
    assert textmatch.canonical_number(f"{n:,}") == plain
    assert textmatch.canonical_number(f"{n}." + "0" * max(zeros, 1)) == plain
    # a number is one word: "9" is never found inside "19"
    assert textmatch.find_phrase(textmatch.words(f"about {n}1 units"), plain) is None


@FAST
@given(candidates=st.lists(WORDY, min_size=1, max_size=6), text=TEXT)
def test_vocabulary_finds_only_its_candidates_at_their_spans(candidates, text):
    vocabulary = textmatch.Vocabulary(candidates)
    planted = f"{text} {candidates[0]} ."
    found = vocabulary.first_in(planted)
    if textmatch.normalize(candidates[0]):
        assert found is not None
    if found is not None:
        candidate, start, end = found
        assert candidate in candidates
        assert textmatch.normalize(planted[start:end]) == textmatch.normalize(candidate)


# ---------------------------------------------------------------- exact answers on random tokenisations

@st.composite
def tokenised(draw):
    """(text, token spans): a random text cut into consecutive tokens at random places."""
    text = draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=12))) - {len(text)})
    bounds = [0] + cuts + [len(text)]
    return text, [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@FAST
@given(tokenised(), st.data())
def test_exact_answer_tokens_cover_exactly_its_visible_characters(case, data):
    text, spans = case
    start = data.draw(st.integers(0, len(text) - 1))
    end = data.draw(st.integers(start + 1, len(text)))
    found = char_span_to_tokens(spans, start, end, text)
    visible = [i for i in range(start, end) if text[i].strip()]
    if not visible:
        assert found is None
        return
    first, last = found
    owner = [next(k for k, (s, e) in enumerate(spans) if s <= i < e) for i in visible]
    assert (first, last) == (min(owner), max(owner))


class SplitTokenizer:
    """A tokenizer whose tokens are given pieces of text; re-tokenising may or may not give them back."""

    all_special_ids = [0]

    def __init__(self, pieces, retokenises):
        self.pieces, self.retokenises = pieces, retokenises

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i - 1] for i in ids if i != 0)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if not self.retokenises:  # e.g. the model generated a rare split of a word
            return {"input_ids": [99], "offset_mapping": [(0, len(text))]}
        offsets, at = [], 0
        for piece in self.pieces:
            offsets.append((at, at + len(piece)))
            at += len(piece)
        return {"input_ids": list(range(1, len(self.pieces) + 1)), "offset_mapping": offsets}


@FAST
@given(pieces=st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=5), min_size=1,
                       max_size=10),
       retokenises=st.booleans(), end_of_turn=st.booleans())
def test_token_spans_tile_the_answer_in_order(pieces, retokenises, end_of_turn):
    tokenizer = SplitTokenizer(pieces, retokenises)
    ids = list(range(1, len(pieces) + 1)) + ([0] if end_of_turn else [])
    answer = tokenizer.decode(ids)
    spans = token_char_spans(tokenizer, ids, answer)
    assert len(spans) == len(ids)
    assert spans[0][0] == 0 and spans[len(pieces) - 1][1] == len(answer)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 <= e0 == s1 <= e1  # consecutive, no gaps, no overlaps
    for k, piece in enumerate(pieces):
        assert answer[spans[k][0] : spans[k][1]] == piece
    if end_of_turn:
        assert spans[-1] == (len(answer), len(answer))


@FAST
@given(n_prompt=st.integers(1, 50), n_answer=st.integers(0, 30), data=st.data())
def test_position_indices_stay_inside_the_sequence(n_prompt, n_answer, data):
    exact = None
    if n_answer and data.draw(st.booleans()):
        first = data.draw(st.integers(0, n_answer - 1))
        exact = (first, data.draw(st.integers(first, n_answer - 1)))
    index = position_indices(n_prompt, n_answer, exact, DEFAULT_POSITIONS)
    total = n_prompt + n_answer
    assert set(index) == set(DEFAULT_POSITIONS)
    assert all(-1 <= i < total for i in index.values())
    assert index["last_q"] == n_prompt - 1
    assert index["first_answer"] == (n_prompt if n_answer else -1)
    for k in range(1, 9):
        assert index[str(-k)] == (total - k if k <= total else -1)  # counted over prompt and answer
    if exact is None:
        assert all(index[p] == -1 for p in index if p.startswith("exact_answer"))
    else:
        first, last = exact
        assert index["exact_answer_first"] == n_prompt + first and index["exact_answer_last"] == n_prompt + last
        assert index["exact_answer_before_first"] == n_prompt + first - 1
        assert index["exact_answer_after_last"] == (n_prompt + last + 1 if last + 1 < n_answer else -1)
