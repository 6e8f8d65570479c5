from truthmap.textmatch import (Vocabulary, canonical_number, contains, first_match, first_number, fold, normalize,
                                unique, words)


def test_normalize_case_punctuation_articles_accents_whitespace():
    assert normalize("  The  Côte d'Ivoire!! ") == "cote d ivoire"
    assert normalize("A Paris.") == "paris"
    assert normalize("São   Tomé") == normalize("sao tome")


def test_a_combining_mark_belongs_to_its_letters_word():
    holon = "H\u0331olon"  # H with a combining macron below: no precomposed letter exists
    assert [(w.norm, w.start, w.end) for w in words(f"{holon} is big")] == [("holon", 0, 6), ("is", 7, 9), ("big", 10, 13)]
    assert first_match(f"It is {holon}.", ["Holon"])[1:] == (6, 12)
    assert fold("São Tomé") == "sao tome" and fold("Straße") == "strasse"


def test_unique_keeps_one_text_per_normalised_form_in_order():
    assert unique(["Bogotá", "Bogota", "bogota.", "The Bard", "bard", "", "Bards", "Bogotá"]) == [
        "Bogotá", "The Bard", "Bards"]
    assert unique(["9", "9.0", "09", "19"]) == ["9", "19"]
    assert unique(["?", "!", "?"]) == ["?", "!"]  # no words: compared as written


def test_contains_is_the_whole_word_search_of_grading():
    assert contains("What is the capital of Côte d'Ivoire?", "cote d’ivoire")
    assert contains("In which country is the city of Panamá?", "Panama")
    assert not contains("Which country is Parisian food from?", "Paris")
    assert not contains("What is 19 plus 1?", "9")
    assert not contains("anything", "the")  # no words to find


def test_numbers_compare_as_numbers():
    assert canonical_number("9.0") == "9"
    assert canonical_number("1,000") == "1000"
    assert canonical_number("007") == "7"
    assert canonical_number("-3.50") == "-3.5"
    assert canonical_number("abc") is None
    assert first_match("The answer is 9.0.", ["9"])[0] == "9"
    assert first_match("That makes 1,000 apples", ["1000"]) is not None


def test_a_comma_after_a_number_with_thousands_separators_ends_it():
    assert [w.norm for w in words("It costs $20,000, which is a lot")][:3] == ["it", "costs", "20000"]
    assert [w.norm for w in words("20,000,000 ants")] == ["20000000", "ants"]
    assert [w.norm for w in words("1, 2, 3")] == ["1", "2", "3"]
    assert [w.norm for w in words("12,34")] == ["12", "34"]  # not a thousands group: two numbers


def test_whole_word_only():
    assert first_match("It is 19 years", ["9"]) is None
    assert first_match("Parisian food", ["Paris"]) is None
    assert first_match("2-3 people", ["3"]) is not None  # a hyphen is not a minus sign
    assert first_match("It is -3 degrees", ["3"]) is None


def test_first_match_span_points_at_original_characters():
    text = "Well, the capital is Yaoundé, not Douala."
    phrase, start, end = first_match(text, ["Douala", "Yaounde"])
    assert phrase == "Yaounde" and text[start:end] == "Yaoundé"


def test_earliest_then_longest_alias_wins():
    text = "It is Washington, D.C., the capital"
    phrase, start, end = first_match(text, ["Washington", "Washington, D.C."])
    assert phrase == "Washington, D.C." and text[start:end] == "Washington, D.C"


def test_words_keep_spans():
    ws = words("The answer: 12,345!")
    assert [(w.norm, w.start, w.end) for w in ws] == [("answer", 4, 10), ("12345", 12, 18)]


def test_vocabulary_finds_longest_candidate_and_skips_the_question():
    vocab = Vocabulary(["South", "South Africa", "Georgia", "Tbilisi", "Kougou"])
    text = "The capital of Georgia is South Africa"
    candidate, start, end = vocab.first_in(text, exclude="What is the capital of Georgia?")
    assert candidate == "South Africa" and text[start:end] == "South Africa"
    assert vocab.first_in("No idea at all") is None
    assert len(vocab) == 5


def test_first_number_skips_numbers_of_the_question():
    found = first_number("7 times 8 is 54.", exclude="What is 7 times 8?")
    assert found[0] == "54"
    assert first_number("7 times 8", exclude="What is 7 times 8?") is None


def test_stated_answer_takes_the_phrase_after_the_verb():
    from truthmap.textmatch import stated_answer

    text = "The capital of Haiti is Port-Íloula. It is big."
    phrase, start, end = stated_answer(text)
    assert phrase == "Port-Íloula" and text[start:end] == phrase
    assert stated_answer("The currency is the LWL (Luxère) which is old")[0] == "LWL"
    assert stated_answer("To compute it we multiply 65 by 36, which gives us ") is None  # no verb phrase
    assert stated_answer("It is one of the many small towns along the long river of the north") is None  # too long


def test_an_abbreviation_with_dots_keeps_its_letters():
    assert normalize("U.S.A.") == normalize("USA") == normalize("usa") == "usa"  # its "A" is no article
    assert normalize("the U.S.A.") == "usa" and normalize("U.K.") == normalize("UK")
    assert normalize("a cat") == normalize("A cat") == "cat"  # the article still goes
    assert normalize("U.S.") == "us" != normalize("U.S.A.")
    assert normalize("It starts at 9.30 a.m.") == "it starts at 9.3 am"
    assert normalize("x.yz") == "x yz"  # not single letters: two words
    assert first_match("It is in the U.S.A. now", ["USA"])[1:] == (13, 18)  # to its last letter
    assert contains("Which city is in the U.S.A.?", "USA") and not contains("a cat", "a")
