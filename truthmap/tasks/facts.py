"""facts — the built-in offline question set, the default task (its tables and generation: facts_data.py)."""

from .base import Task, register


def _build():
    from .facts_data import build_facts

    return build_facts(seed=0)


# id prefix -> the kind of entity the question is about (ids are "<prefix>-<code>[-…]", facts_data.py)
ENTITY_OF_PREFIX = {"capital": "country", "city": "country", "continent": "country", "language": "country",
                    "currency": "country", "state_capital": "state", "symbol": "element", "element": "element",
                    "atomic_number": "element"}


def entity(question_id: str, question: str) -> str:
    """The entity a question is about: every question on one country (its capital, currency, language,
    continent, its cities), one U.S. state or one element shares a split part; arithmetic has none."""
    prefix, _, rest = question_id.partition("-")
    kind = ENTITY_OF_PREFIX.get(prefix)
    return f"{kind}:{rest.split('-')[0]}" if kind and rest else ""


register(Task(
    name="facts",
    description="Built-in short factual questions (capitals, languages, elements, arithmetic…); offline, the default.",
    builtin=_build,
    group=entity,
))
