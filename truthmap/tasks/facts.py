"""facts — the built-in offline question set (truthmap/facts.py), the default task."""

from . import Task, register


def _build():
    from ..facts import build_facts

    return build_facts(seed=0)


register(Task(
    name="facts",
    description="Built-in short factual questions (capitals, languages, elements, arithmetic…); offline, the default.",
    builtin=_build,
))
