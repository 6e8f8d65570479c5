"""The task registry: every question set truthmap can study, each a small declarative entry.

A task says four things (one module per task in this package, each ending in ``register(Task(...))``):

* how to load its rows: ``convert`` turns one source record (a CSV row, a JSON object, a hub example,
  as a plain dict) into one row of the questions table, and ``files`` / ``hub`` say where records come
  from by default;
* how to phrase the prompt: ``chat_prompt`` is the user message for a model with a chat template,
  ``base_prompt`` the raw text a base model continues (fields: ``{question}``, ``{context}``,
  ``{question_base}``);
* how to judge correctness and find the exact answer: ``grading`` names a rule of ``grading.GRADING_RULES``
  ("alias", "number" or "choice");
* how long an answer may be: ``max_new_tokens``.

Every task is phrased under two protocols (``--protocol``). ``brief``, the default, is the entry's
``chat_prompt`` / ``base_prompt`` / ``max_new_tokens`` (QA tasks ask "{question} Answer briefly." for 24
new tokens). ``reference`` reproduces the generation settings of the reference study (Orgad et al., "LLMs
Know More Than They Show", ICLR 2025): ``reference_chat_prompt`` (for most tasks the question alone),
``reference_base_prompt`` and ``reference_max_new_tokens`` (100; math 200); the label stage then grades
``alias`` tasks by substring, as the reference did (truthmap/grading.py). In both, a model without a
chat template stops at its first line break and is graded on the line before it (stages/generate.py).

``--dataset`` takes ``TASK``, ``TASK:SPLIT``, ``TASK:PATH``, or a bare path / hub id (the ``generic``
task, with ``--question-column`` / ``--answer-column``). ``resolve`` turns that string into a task and a
source. Adding a task touches one place: a new module here (importing what it needs from ``base.py``,
where the entry, the registry and the field readers are), imported at the bottom of this file.
"""

from __future__ import annotations

from .base import (BadRow, DATA_DIR_ENV, DEFAULT_BASE_PROMPT, DEFAULT_CHAT_PROMPT, LeftOut, LoadOptions,
                   MissingField, PROTOCOLS, READABLE_SUFFIXES, REFERENCE_MAX_NEW_TOKENS, REGISTRY, Source, Task,
                   answer_length, check_protocol, data_dir, get, get_task, gold, label, number, register, resolve,
                   text)  # noqa: F401  (the package's public names)

# the task modules register themselves on import; their order is the order `truthmap tasks` lists
from . import facts, triviaqa, hotpotqa, movies, nq, math_problems, winobias, winogrande, nli, imdb, generic  # noqa: F401
