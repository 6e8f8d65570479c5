"""Draft rows for the exact-answer audit from finished label stages (tests/fixtures/exact_answer_audit.csv).

    python bench/audit_draft.py OUT.csv RUN_DIR [RUN_DIR ...]

Reads each run folder's questions.parquet, vocabularies.json and generations.parquet, grades each answer
by its task's rule (the label stage's ``correct``); writes one row per answer with the columns
of ``truthmap.analyses.audit`` and an empty ``exact_answer``, which a reader fills in after reading the answer
(the span as it appears in the answer, or ``none``). The locator's own span is deliberately not written:
the hand span must not be copied from what it audits. For alias-graded tasks the extractor model (the
embedded default) is asked for every answer where the rules find no candidate or a refusal, and its raw
reply is kept, so the audit replays the extractor without a model. Rules that find fewer candidates
(stricter) send no row to the extractor that was not asked; other rows' reply is empty (none placed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from truthmap import runfolder as rf
from truthmap.analyses.audit import COLUMNS
from truthmap import textmatch
from truthmap.grading import GRADING_RULES
from truthmap.stages.label import extractor_replies
from truthmap.tasks import get_task


def draft(run_dirs: list[Path]) -> pd.DataFrame:
    rows, needs_extractor = [], []
    for run_dir in run_dirs:
        questions = rf.read_parquet(run_dir / rf.QUESTIONS)
        answers = rf.read_parquet(run_dir / rf.GENERATIONS).set_index("id")
        vocabularies = {k: textmatch.Vocabulary(list(v)) for k, v in rf.read_json(run_dir / rf.VOCABULARIES).items()}
        for q in questions.itertuples():
            if q.id not in answers.index:
                continue
            answer = answers.loc[q.id, "answer"]
            task = getattr(q, "task", "generic")
            wrong = list(q.wrong_answers) if getattr(q, "wrong_answers", None) is not None else []
            answer_type = getattr(q, "answer_type", "") or ""
            grade, _ = GRADING_RULES[get_task(task).grading]
            correct, (_, _, _, reason) = grade(answer, q.question, list(q.gold), wrong, answer_type, vocabularies)
            needs_extractor.append(reason in ("no_candidate_in_answer", "refusal"))
            rows.append({
                "task": task, "id": q.id, "question": q.question, "gold": json.dumps(list(q.gold)),
                "wrong_answers": json.dumps(wrong), "answer_type": answer_type, "answer": answer,
                "correct": bool(correct), "extractor_reply": "", "exact_answer": "", "note": "",
            })
    table = pd.DataFrame(rows, columns=COLUMNS)
    alias = table.task.map(lambda t: get_task(t).grading == "alias") & pd.Series(needs_extractor, index=table.index)
    if alias.any():
        from truthmap.backends.hf import load_model

        lm = load_model(dtype="float32", device="cpu")
        replies = extractor_replies(lm, table.question[alias].tolist(), table.answer[alias].tolist())
        table.loc[alias, "extractor_reply"] = replies
    return table


if __name__ == "__main__":
    out, *runs = sys.argv[1:]
    draft([Path(r) for r in runs]).to_csv(out, index=False)
    print(f"wrote {out}")
