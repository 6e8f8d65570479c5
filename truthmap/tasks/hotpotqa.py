"""hotpotqa, hotpotqa_context — HotpotQA multi-hop questions, without and with their supporting paragraphs.

Reads the hub schema of ``hotpot_qa`` (distractor): ``id, question, answer, type, level,
supporting_facts: {title, sent_id}, context: {title, sentences}``, or the original JSON list (``_id``,
``supporting_facts: [[title, sent_id]]``, ``context: [[title, [sentences]]]``). The context shown with a
question is its supporting paragraphs (the ones ``supporting_facts`` names, each as "Title: text"),
not the eight distractors, so prompts stay short; under ``--protocol reference`` it is every paragraph,
distractors included, as the reference study showed it: each sentence on its own line, no titles. A
yes/no question gets the other word as its wrong answer, so that the first of "yes" / "no" the answer
says decides.
"""

from .base import BadRow, Task, gold, register, text
from ..textmatch import normalize


def _paragraph_sentences(record: dict) -> dict[str, list[str]]:
    """Title -> the paragraph's sentences, in order, from either schema."""
    context = record.get("context")
    if isinstance(context, dict):  # hub: {"title": [...], "sentences": [[...], ...]}
        pairs = zip(context.get("title") or [], context.get("sentences") or [])
    elif isinstance(context, list):  # original: [[title, [sentences]], ...]
        pairs = [(item[0], item[1]) for item in context if isinstance(item, (list, tuple)) and len(item) == 2]
    else:
        raise BadRow("context", "missing or not a list of paragraphs")
    return {str(title): [str(s) for s in sentences] for title, sentences in pairs}


def _every_sentence(record: dict) -> str:
    """All paragraphs, distractors included, one sentence a line (the reference study's context)."""
    lines = [s.strip() for sentences in _paragraph_sentences(record).values() for s in sentences]
    if not any(lines):
        raise BadRow("context", "no paragraphs")
    return "\n".join(line for line in lines if line)


def _supporting_titles(record: dict) -> list[str]:
    facts = record.get("supporting_facts")
    if isinstance(facts, dict):  # hub: {"title": [...], "sent_id": [...]}
        titles = facts.get("title") or []
    else:  # original: [[title, sent_id], ...]
        titles = [f[0] for f in facts or [] if f]
    return list(dict.fromkeys(str(t) for t in titles))  # in order, once each


def _convert(record: dict, with_context: bool, protocol: str = "brief") -> dict:
    source_id = record.get("id", record.get("_id"))
    row = {
        "id": None if source_id is None else str(source_id),
        "question": text(record, "question", "question"),
        "gold": gold(record, "answer"),
        "family": str(record.get("type") or "hotpotqa"),
        "subgroup": str(record.get("level") or ""),
    }
    yes_no = {"yes": "no", "no": "yes"}.get(normalize(row["gold"][0]))
    if yes_no:  # a comparison asked as yes/no: "No, …" names the other answer (graded as a choice)
        row["wrong_answers"] = [yes_no]
    if with_context and protocol == "reference":
        row["context"] = _every_sentence(record)
    elif with_context:
        paragraphs, titles = _paragraph_sentences(record), _supporting_titles(record)
        if not titles:
            raise BadRow("supporting_facts", "no supporting paragraphs named")
        missing = [t for t in titles if t not in paragraphs]
        if missing:
            raise BadRow("context", f"supporting paragraph {missing[0]!r} is not in the context")
        row["context"] = "\n".join(f"{t}: {''.join(paragraphs[t]).strip()}" for t in titles)
    return row


register(Task(
    name="hotpotqa",
    description="HotpotQA multi-hop questions, no context (hub hotpot_qa distractor or a local JSON/Parquet); alias match.",
    convert=lambda record, options: _convert(record, with_context=False),
    hub=("hotpot_qa", "distractor", "validation"),
))

register(Task(
    name="hotpotqa_context",
    description="HotpotQA with its supporting paragraphs as context (all paragraphs with --protocol reference); alias match.",
    convert=lambda record, options: _convert(record, with_context=True, protocol=options.protocol),
    chat_prompt="Context: {context}\n\nQuestion: {question} Answer briefly.",
    base_prompt="Context: {context}\n\nQ: {question}\nA:",
    reference_chat_prompt="{context}\n{question}",
    reference_base_prompt="Q: {context}\n{question}\nA:",
    hub=("hotpot_qa", "distractor", "validation"),
))
