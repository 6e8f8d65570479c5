"""A reusable error detector: one probe, saved with everything needed to score new answers.

:class:`Detector` follows scikit-learn's estimator contract: ``Detector(C=1.0).fit(X, y)`` standardises
``X`` with the train rows' mean and deviation and fits an L2 logistic regression (the same problem as a
probe of stages/probe.py, solved by its :class:`~truthmap.logistic.BatchedLogisticRegression`);
``predict_proba(X)`` returns ``[n, 2]`` = (P(right), P(error)), ``classes_ = [0, 1]``, 1 = the answer is wrong.

``truthmap export`` (:func:`export_detector`) fits one on a run's train split at one (site, layer,
position) and writes a folder:

* ``detector.safetensors`` — float32 ``mean [d]``, ``scale [d]``, ``coef [d]`` (on standardised
  features), ``intercept [1]``;
* ``card.json`` — model id and revision, site, layer, position, task, train/test sizes, test AUC,
  threshold, the prompt's text around the question, the test ids the AUC was measured on, and the
  ``domain``: the answers the detector was trained on and what lies outside them (see below), and the
  ``locator``: every rule the label stage used to find the run's exact answers (:func:`locator_rules`),
  so that a new answer is located as the study located its own;
* ``fallback.safetensors`` — for an ``exact_answer_*`` detector, a second detector at the same layer on a
  position every answer has (``-1``, else ``last_q``), described by the card's ``fallback``.

**No silent scores.** Where the detector's position does not exist for an answer (no exact answer is
found), P(error) is NaN, ``flagged`` is missing (never False) and ``reason`` says why
(:meth:`ModelScorer.score_table`); the fallback detector's P(error) is given beside it, named as such.

``Detector.load(path)`` reads it back (no pickle). A Detector is a scikit-learn estimator
(``BaseEstimator``, ``ClassifierMixin``): ``clone``, ``get_params``, pipelines and ``score(X, y)`` work as
for any classifier. Scoring new text needs the language model too, so it lives in its own object:
``ModelScorer(detector)`` loads the card's model once; ``.score(question, answer)`` returns P(error) of
each pair, ``.ask(question)`` generates the answer first, ``.own_answers`` says whether an answer is the
model's own. A model other than the card's is refused unless ``force=True``.

**Domain.** A detector learned from the model's own greedy answers, read in the model's own hidden
states: it says whether the model's answer is wrong, not whether a text is. An answer the model did not
write (another model's, a person's, an edited one) is outside that domain, and its P(error) is not a
measured prediction ("What is the capital of Peru?" → "The capital of Peru is Bogotá." can score
near 0). ``detector.own_answers(question, answer)`` says, for each pair, whether the answer is the
model's own (its greedy answer, compared as normalised words) and the answer's mean token
log-probability under the model; ``truthmap score`` prints it and warns. The card's ``domain`` says so.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import TruthmapError
from ..metrics import auc_score
from ..positions import EXACT_POSITIONS, char_span_to_tokens, check_cell, position_indices, token_char_spans

if TYPE_CHECKING:
    from ..runfolder import Run

WEIGHTS = "detector.safetensors"
FALLBACK_WEIGHTS = "fallback.safetensors"  # the fallback cell's detector (card field "fallback")
CARD = "card.json"
FALLBACK_POSITIONS = ("-1", "last_q")  # cells every answer has, in order of preference
DEFAULT_THRESHOLD = 0.5


def _estimator_bases():
    from sklearn.base import BaseEstimator, ClassifierMixin

    return ClassifierMixin, BaseEstimator


class Detector(*_estimator_bases()):
    """Standardise, then logistic regression; predicts P(error) of an answer from one hidden state.

    Learned state: ``mean_``, ``scale_``, ``coef_`` (float32 ``[d]``) and ``intercept_`` (float).
    ``card`` holds what :func:`export_detector` knows about where the features come from.
    """

    def __init__(self, C: float = 1.0, threshold: float = DEFAULT_THRESHOLD, card: dict | None = None):
        self.C, self.threshold, self.card = C, threshold, card

    def fit(self, X, y) -> "Detector":
        import torch

        from ..logistic import BatchedLogisticRegression

        X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(np.int64)
        if X.ndim != 2 or len(X) != len(y):
            raise TruthmapError(f"Detector.fit: X must be [n, d] and y [n]; got {X.shape} and {y.shape}")
        if len(set(y.tolist())) < 2:
            raise TruthmapError(f"Detector.fit: the {len(y)} training answers are all of one class; need both")
        self.mean_ = X.mean(0)
        std = X.std(0)
        self.scale_ = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        Z = (X - self.mean_) / self.scale_
        model = BatchedLogisticRegression(C=self.C).fit(
            torch.from_numpy(Z)[None], torch.from_numpy(y), torch.ones((1, 1, len(y)), dtype=torch.bool))
        self.coef_ = model.coef_[0, 0].numpy().astype(np.float32)
        self.intercept_ = float(model.intercept_[0, 0])
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logit of P(error) ``[n]``, in float64 with numpy's pairwise sums (same on any machine/threads)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.coef_):
            raise TruthmapError(f"Detector: features must be [n, {len(self.coef_)}]; got {X.shape}")
        Z = (X.astype(np.float64) - self.mean_.astype(np.float64)) / self.scale_.astype(np.float64)
        return (Z * self.coef_.astype(np.float64)).sum(axis=1) + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        """1 where P(error) ≥ ``threshold`` (the answer is flagged as wrong)."""
        return (self.predict_proba(X)[:, 1] >= self.threshold).astype(np.int64)

    # ------------------------------------------------------------------ saving and loading

    def save(self, folder: str | Path) -> Path:
        from ..runfolder import write_json

        folder = Path(folder)  # made by atomic_path, never through a link
        self._save_weights(folder / WEIGHTS)
        card = {**(self.card or {}), "C": self.C, "threshold": self.threshold}
        fallback = getattr(self, "fallback_", None)
        if fallback is not None:
            fallback._save_weights(folder / FALLBACK_WEIGHTS)
            card["fallback"] = {**(fallback.card or {}), "C": fallback.C, "threshold": fallback.threshold}
        write_json(folder / CARD, card)
        return folder

    def _save_weights(self, path: Path) -> None:
        from safetensors.numpy import save_file

        from ..runfolder import atomic_path

        tensors = {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_,
                   "intercept": np.array([self.intercept_], dtype=np.float64)}
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, folder: str | Path) -> "Detector":
        """A detector folder of 'truthmap export', checked: the weights are four float vectors of one
        length, the card an object whose fields have the types export writes (one-line errors)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from ..runfolder import parse_json

        folder = Path(folder)
        for name in (WEIGHTS, CARD):
            if not (folder / name).is_file():
                raise TruthmapError(f"{folder}: no {name}; is this a folder written by 'truthmap export'?")

        def weights(path):
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, ValueError) as err:
                raise TruthmapError(f"{path}: unreadable ({str(err).splitlines()[0] if str(err) else 'empty'}); "
                                    f"export it again") from None

        tensors = weights(folder / WEIGHTS)
        if (folder / CARD).stat().st_size > MAX_CARD_BYTES:
            raise TruthmapError(f"{folder / CARD}: more than {MAX_CARD_BYTES} bytes; not a card of 'truthmap export'")
        try:
            card = parse_json((folder / CARD).read_bytes())
        except (OSError, ValueError) as err:
            raise TruthmapError(f"{folder / CARD}: {err}; export it again") from None
        _check_weights(folder / WEIGHTS, tensors)
        _check_card(folder / CARD, card)
        detector = cls._from_tensors(card, tensors)
        detector.fallback_ = None
        if isinstance(card.get("fallback"), dict):
            if not (folder / FALLBACK_WEIGHTS).is_file():
                raise TruthmapError(f"{folder}: the card names a fallback cell but {FALLBACK_WEIGHTS} is missing; "
                                    f"export it again")
            fallback_tensors = weights(folder / FALLBACK_WEIGHTS)
            _check_weights(folder / FALLBACK_WEIGHTS, fallback_tensors)
            _check_card(folder / CARD, {"model": card["model"], **card["fallback"]})
            if fallback_tensors["coef"].shape != tensors["coef"].shape:
                raise TruthmapError(f"{folder / FALLBACK_WEIGHTS}: not of the main detector's width; export it again")
            detector.fallback_ = cls._from_tensors(card["fallback"], fallback_tensors)
        return detector

    @classmethod
    def _from_tensors(cls, card: dict, tensors: dict) -> "Detector":
        detector = cls(C=card.get("C", 1.0), threshold=card.get("threshold", DEFAULT_THRESHOLD), card=card)
        detector.mean_, detector.scale_, detector.coef_ = tensors["mean"], tensors["scale"], tensors["coef"]
        detector.intercept_ = float(tensors["intercept"][0])
        detector.classes_ = np.array([0, 1])
        detector._lm = None
        return detector

    # ------------------------------------------------------------------ scikit-learn's score, and the old text API

    def score(self, X, y=None, sample_weight=None, model=None, force: bool = False, exact_answer=None):
        """scikit-learn's score: the mean accuracy of :meth:`predict` on ``X`` against ``y``.

        Given question and answer texts instead (the spelling of truthmap 0.1, kept for one release), it
        warns and returns :meth:`ModelScorer.score` of them."""
        if isinstance(X, str) or (isinstance(X, (list, tuple)) and X and isinstance(X[0], str)):
            _old_api("score")
            return self._scorer(model, force).score(X, y, exact_answer=exact_answer)
        from sklearn.metrics import accuracy_score

        return accuracy_score(y, self.predict(X), sample_weight=sample_weight)

    def ask(self, question, model=None, force: bool = False, max_new_tokens: int | None = None) -> list[dict]:
        """Deprecated: use ``ModelScorer(detector).ask``."""
        _old_api("ask")
        return self._scorer(model, force).ask(question, max_new_tokens=max_new_tokens)

    def own_answers(self, question, answer, model=None, force: bool = False, max_new_tokens: int | None = None):
        """Deprecated: use ``ModelScorer(detector).own_answers``."""
        _old_api("own_answers")
        return self._scorer(model, force).own_answers(question, answer, max_new_tokens=max_new_tokens)

    def _scorer(self, model, force) -> "ModelScorer":
        scorer = getattr(self, "_bound", None)
        if scorer is None or model not in (None, scorer.lm.model_id, scorer.lm):
            scorer = ModelScorer(self, model, force)
            self._bound = scorer
        return scorer


def _old_api(name: str) -> None:
    import warnings

    warnings.warn(f"Detector.{name}(question, …) is deprecated; use truthmap.ModelScorer(detector).{name}(…)",
                  DeprecationWarning, stacklevel=3)


class ModelScorer:
    """A detector bound to its language model: P(error) of question–answer texts, end to end.

    ``ModelScorer(detector, model=None, force=False)`` loads the card's model on first use (``model``: an
    id or a loaded model backend such as ``truthmap.backends.hf.LoadedModel``; another model than the
    card's is refused unless ``force``). It builds each prompt as the run did, locates the card's position,
    reads the hidden state and applies the detector.
    """

    def __init__(self, detector: Detector, model=None, force: bool = False, dtype: str = "auto",
                 device: str = "auto", target_false_flag: float | None = None):
        self.detector, self.force, self.dtype, self.device = detector, force, dtype, device
        self._wanted, self._lm = model, None
        self.target_false_flag = target_false_flag
        self.threshold = self._calibrated(self.card, detector.threshold)
        fallback = self.fallback
        self.fallback_threshold = self._calibrated(fallback.card or {}, fallback.threshold) if fallback else None

    def _calibrated(self, card: dict, threshold: float) -> float:
        """The card's threshold, or, given ``target_false_flag``, the split-conformal threshold for it from the
        card's validation scores of right answers (:mod:`.conformal`)."""
        if self.target_false_flag is None:
            return threshold
        from .conformal import conformal_threshold

        scores = (card.get("calibration") or {}).get("right_scores")
        if not scores:
            raise TruthmapError("this detector's card holds no validation scores to calibrate on (an export of an "
                                "older truthmap, or a run without a validation part); export it again")
        return conformal_threshold(scores, self.target_false_flag)["threshold"]

    @property
    def card(self) -> dict:
        return self.detector.card or {}

    @property
    def lm(self):
        """The card's model, loaded once (through the backend factory, as every command loads its model)."""
        from ..backends import ModelBackend, Models
        from ..config import Config

        if self._lm is not None:
            return self._lm
        card, force, model = self.card, self.force, self._wanted
        if isinstance(model, ModelBackend):
            lm = model
        else:
            name = model or card.get("model")
            if name != card.get("model") and not force:
                raise TruthmapError(f"this detector was trained on model '{card.get('model')}', not '{name}'; "
                                    f"its features mean nothing for another model (force=True / --force to try)")
            lm = Models(Config(model=name, dtype=self.dtype, device=self.device)).lm
        if not force:
            if lm.model_id != card.get("model"):
                raise TruthmapError(f"this detector was trained on model '{card.get('model')}', not "
                                    f"'{lm.model_id}' (force=True / --force to try anyway)")
            if card.get("model_revision") and lm.revision != card["model_revision"]:
                raise TruthmapError(f"model '{lm.model_id}' is at revision {lm.revision}, the detector was trained "
                                    f"at {card['model_revision']} (force=True / --force to try anyway)")
        self._lm = lm
        return lm


    def prompt_ids(self, lm, question: str) -> list[int]:
        from ..stages.generate import encode_prompt

        card = self.card or {}
        if card.get("prompt_prefix") is None:
            raise TruthmapError("this detector's prompts hold more than the question (a passage or options), "
                                "so it cannot build the prompt of a new question")
        return encode_prompt(lm.tokenizer, card["prompt_prefix"] + question.strip() + card["prompt_suffix"])

    def score(self, question, answer, exact_answer=None, gold=None, answer_type=None) -> np.ndarray:
        """P(error) of each (question, answer) pair (str or lists); NaN where it cannot be computed, with a
        warning that says how many and why (:meth:`score_table` gives the reason of each answer).

        ``exact_answer``: the span of each answer that states it, where known; otherwise it is found by
        the rules the study's label stage used (the card's ``locator``). An answer the model did not
        write is outside what the detector learned from: :meth:`own_answers` tells which these are.
        """
        table = self.score_table(question, answer, exact_answer=exact_answer, gold=gold, answer_type=answer_type)
        missing = table[table["p_error"].isna()]
        if len(missing):
            import warnings

            reasons = missing["reason"].value_counts()
            warnings.warn(f"{len(missing)} of {len(table)} answers not scored (P(error) NaN): "
                          + "; ".join(f"{n}× {r}" for r, n in reasons.items()), UserWarning, stacklevel=2)
        return table["p_error"].to_numpy(dtype=float)

    def score_table(self, question, answer, exact_answer=None, gold=None, answer_type=None):
        """One row per (question, answer): what the detector says and why (a pandas DataFrame).

        Columns: ``p_error`` (NaN: not scored), ``flagged`` (True / False, or <NA> when not scored:
        never False for an answer the detector could not score), ``status`` ("flagged", "not flagged",
        "not scored"), ``reason`` (why not, e.g. "no exact answer found in the answer"; "" when
        scored), ``exact_answer`` and ``exact_answer_route`` (the span found and the rule that found it),
        ``answer_type`` and ``answer_type_from`` (how the question's answer type was known), and, where
        the card has a fallback cell that exists for every answer (:func:`export_detector`),
        ``fallback_position``, ``fallback_p_error`` and ``fallback_flagged``: that cell's P(error) of
        the same answer, a separate detector with its own test AUC on the card.

        ``gold``: the gold answers of each question, used only when the study located right answers at
        their gold alias (the card's ``locator.exact_answer`` is "gold"), to reproduce its spans; a
        detector in use has no gold and locates every answer label-blind.
        """
        questions, answers = _as_list(question), _as_list(answer)
        if len(questions) != len(answers):
            raise TruthmapError(f"score: {len(questions)} questions but {len(answers)} answers")
        lm = self.lm
        answer_ids = [answer_token_ids(lm, a) for a in answers]
        return self._score_ids(lm, questions, answer_ids, _per_answer(exact_answer, len(questions)),
                               _per_answer(gold, len(questions), nested=True),
                               _per_answer(answer_type, len(questions)))

    def own_answers(self, question, answer, max_new_tokens: int | None = None) -> list[dict]:
        """For each (question, answer): is the answer the model's own? ``[{model_answer, own_answer,
        answer_logprob}]``.

        ``model_answer`` is the model's greedy answer to the card's prompt of the question (as ``ask``
        gives it); ``own_answer`` is True when the given answer says the same words (normalised: case,
        accents, punctuation and articles ignored); ``answer_logprob`` is the mean log-probability of the
        given answer's tokens under the model, its end-of-turn token included (a text the model would not
        write scores lower than its own answer).
        """
        from ..stages.generate import decode_answer, generate_answers
        from ..textmatch import normalize

        questions, answers = _as_list(question), _as_list(answer)
        if len(questions) != len(answers):
            raise TruthmapError(f"own_answers: {len(questions)} questions but {len(answers)} answers")
        lm = self.lm
        prompts = [self.prompt_ids(lm, q) for q in questions]
        generated = generate_answers(lm, prompts, max_new_tokens or self.card.get("max_new_tokens") or 24,
                                     progress=False)
        greedy = [decode_answer(lm.tokenizer, ids).strip() for ids, _ in generated]
        given = [answer_token_ids(lm, a) for a in answers]
        stats = lm.token_statistics([p + a for p, a in zip(prompts, given)], [len(p) for p in prompts])
        return [{"model_answer": own, "own_answer": normalize(own) == normalize(text),
                 "answer_logprob": float(np.log(np.clip(prob, 1e-30, 1.0)).mean())}
                for own, text, (prob, _) in zip(greedy, answers, stats)]

    def ask(self, question, max_new_tokens: int | None = None) -> list[dict]:
        """Generate the greedy answer to each question and score it: one dict per question with the
        columns of :meth:`score_table` (``flagged`` None where the answer could not be scored)."""
        import pandas as pd

        from ..stages.generate import decode_answer, generate_answers

        questions = _as_list(question)
        lm = self.lm
        prompts = [self.prompt_ids(lm, q) for q in questions]
        generated = generate_answers(lm, prompts, max_new_tokens or self.card.get("max_new_tokens") or 24,
                                     progress=False)
        answer_ids = [ids for ids, _ in generated]
        table = self._score_ids(lm, questions, answer_ids)
        table.insert(1, "answer", [decode_answer(lm.tokenizer, ids) for ids in answer_ids])
        return [{k: (None if v is pd.NA else v) for k, v in row.items()} for row in table.to_dict("records")]

    def _score_ids(self, lm, questions, answer_ids, exact_answers=None, gold=None, answer_types=None):
        import pandas as pd

        card = self.card
        prompt_ids = [self.prompt_ids(lm, q) for q in questions]
        located = locate(lm, questions, prompt_ids, answer_ids, [card["position"]], card.get("locator") or {},
                         exact_answers=exact_answers, gold=gold, answer_types=answer_types,
                         extractor=self.extractor)
        index = located[f"pos_{card['position']}"].to_numpy(dtype=np.int64)
        p = self._read_and_score(lm, self.detector, card, prompt_ids, answer_ids, index)
        table = pd.DataFrame({"question": questions, "p_error": p})
        table["flagged"] = pd.array([None if np.isnan(v) else bool(v >= self.threshold) for v in p], dtype="boolean")
        table["status"] = ["not scored" if np.isnan(v) else "flagged" if v >= self.threshold else "not flagged"
                           for v in p]
        table["reason"] = [why_not_scored(card["position"], route, text) if np.isnan(v) else ""
                           for v, route, text in zip(p, located["exact_answer_reason"], located["exact_answer"])]
        table["exact_answer"] = located["exact_answer"].to_numpy()
        table["exact_answer_route"] = located["exact_answer_reason"].to_numpy()
        table["answer_type"] = located["answer_type"].to_numpy()
        table["answer_type_from"] = located["answer_type_from"].to_numpy()
        fallback = self.fallback
        if fallback is not None:
            fcard = fallback.card
            findex = np.array([position_indices(len(pr), len(a), None, [fcard["position"]])[fcard["position"]]
                               for pr, a in zip(prompt_ids, answer_ids)], dtype=np.int64)
            fp = self._read_and_score(lm, fallback, fcard, prompt_ids, answer_ids, findex)
            table["fallback_position"] = fcard["position"]
            table["fallback_p_error"] = fp
            table["fallback_flagged"] = pd.array([None if np.isnan(v) else bool(v >= self.fallback_threshold) for v in fp],
                                                 dtype="boolean")
        return table

    @staticmethod
    def _read_and_score(lm, detector, card, prompt_ids, answer_ids, index) -> np.ndarray:
        """P(error) ``[n]`` of ``detector`` at token ``index`` of each sequence; NaN where index is -1."""
        from ..positions import site_rows

        out = np.full(len(prompt_ids), np.nan)
        keep = np.flatnonzero(index >= 0)
        row = site_rows(lm, card["site"]).index(card["layer"])
        for start in range(0, len(keep), 16):
            batch = keep[start : start + 16]
            sequences = [prompt_ids[i] + answer_ids[i] for i in batch]
            features = lm.hidden_states(sequences, index[batch][:, None], [card["site"]])[card["site"]]  # [R, B, 1, d]
            out[batch] = detector.predict_proba(features[row, :, 0])[:, 1]
        return out

    @property
    def fallback(self) -> "Detector | None":
        """The card's fallback detector (a cell every answer has), or None."""
        return getattr(self.detector, "fallback_", None)

    @property
    def extractor(self):
        """The model the study asked for exact answers its rules missed (the card's
        ``locator.extractor``): the studied model (None there), none ("none"), or another model, loaded."""
        name = (self.card.get("locator") or {}).get("extractor")
        if name == "none":
            return None
        if name is None or name == self.card.get("model"):
            return self.lm
        if getattr(self, "_extractor", None) is None:
            from ..backends import Models
            from ..config import Config

            self._extractor = Models(Config(model=name, dtype=self.dtype, device=self.device)).lm
        return self._extractor


# what an exact-answer route that found nothing means, in words
_NOT_FOUND = {
    "no_candidate_in_answer": "no exact answer found in the answer",
    "empty_answer": "the answer is empty",
    "refusal": "the answer names nothing (a refusal)",
    "extractor_output_not_in_answer": "no exact answer found (the extractor's phrase is not in the answer)",
    "extractor_output_not_an_answer": "no exact answer found (the extractor's phrase names nothing)",
    "span_not_on_tokens": "the exact answer does not fall on token boundaries",
    "referent_names_no_option": "the answer's referent names none of the options",
}


def why_not_scored(position: str, route: str, exact_text: str) -> str:
    """One line: why the detector's position does not exist for an answer."""
    if position in EXACT_POSITIONS and not exact_text:
        return f"{_NOT_FOUND.get(route, 'no exact answer found')} (route {route})"
    if position in EXACT_POSITIONS:
        return f"position {position} does not exist in this answer (exact answer '{exact_text}' at its edge)"
    return f"position {position} does not exist in this answer (too short)"


def _per_answer(value, n: int, nested: bool = False):
    """None, or one value per answer; with ``nested`` (gold answers), each a list of strings (a list of
    strings given for a single answer is that answer's gold)."""
    if value is None:
        return None
    value = [value] if isinstance(value, str) else list(value)
    if nested:
        if n == 1 and value and all(isinstance(v, str) for v in value):
            value = [value]
        value = [[v] if isinstance(v, str) else list(v) for v in value]
    if len(value) != n:
        raise TruthmapError(f"score: {n} answers but {len(value)} values of exact_answer/gold/answer_type")
    return value


MAX_CARD_BYTES = 1 << 28  # the card lists the test ids: a few MB for a million answers


def _check_weights(path: Path, tensors: dict) -> None:
    missing = [k for k in ("mean", "scale", "coef", "intercept") if k not in tensors]
    if missing:
        raise TruthmapError(f"{path}: no tensor {', '.join(missing)}; export the detector again")
    d = tensors["coef"].shape
    for name in ("mean", "scale", "coef"):
        t = tensors[name]
        if t.ndim != 1 or t.shape != d or t.dtype.kind != "f" or not np.isfinite(t).all():
            raise TruthmapError(f"{path}: tensor '{name}' is not a finite float vector of the length of 'coef'")
    if (tensors["scale"] == 0).any():
        raise TruthmapError(f"{path}: tensor 'scale' holds a zero; export the detector again")
    t = tensors["intercept"]
    if t.shape != (1,) or t.dtype.kind != "f" or not np.isfinite(t).all():
        raise TruthmapError(f"{path}: tensor 'intercept' is not one finite number")


def _check_card(path: Path, card) -> None:
    """The fields a detector uses, of the types 'truthmap export' writes."""
    from ..runfolder import sanitise

    if not isinstance(card, dict):
        raise TruthmapError(f"{path}: holds {type(card).__name__}, not a card (an object)")
    text = (str,)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    from ..config import check_setting

    for name in ("model", "C", "max_new_tokens"):  # the card's settings: checked by the settings' own schema
        if name in card:
            check_setting(name, card[name], f"{path}")
    rules = {"threshold": lambda v: number(v) and 0 <= v <= 1,
             "prompt_prefix": lambda v: v is None or isinstance(v, text),
             "prompt_suffix": lambda v: v is None or isinstance(v, text),
             "model_revision": lambda v: v is None or isinstance(v, text),
             "test_ids": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
             "test_auc": lambda v: v is None or number(v),
             "locator": _locator_ok, "fallback": lambda v: isinstance(v, dict),
             "calibration": _calibration_ok}
    for name, ok in rules.items():
        if name in card and not ok(card[name]):
            raise TruthmapError(f"{path}: field '{name}' is {sanitise(repr(card[name]), 60)}; export the detector again")
    if "model" not in card:
        raise TruthmapError(f"{path}: field 'model' is missing; export the detector again")
    if card.get("prompt_prefix") is not None and not isinstance(card.get("prompt_suffix"), str):
        raise TruthmapError(f"{path}: field 'prompt_suffix' is missing; export the detector again")
    from ..constants import SITES

    if "site" in card and card["site"] not in SITES:
        raise TruthmapError(f"{path}: field 'site' is {sanitise(repr(card['site']), 60)}, not one of {', '.join(SITES)}")
    if "layer" in card or "position" in card:  # the cell names what is extracted: checked whole
        check_cell(card.get("site", "residual"), card.get("layer"), card.get("position"), path)


def _calibration_ok(calibration) -> bool:
    """The card's ``calibration``: an object whose ``right_scores`` (if any) are sorted finite numbers."""
    if not isinstance(calibration, dict):
        return False
    scores = calibration.get("right_scores", [])
    return (isinstance(scores, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) for v in scores)
            and all(a <= b for a, b in zip(scores, scores[1:])))


def _locator_ok(locator) -> bool:
    """The card's ``locator`` has the shape :func:`locator_rules` writes."""
    strings = lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v)  # noqa: E731
    if not isinstance(locator, dict) or locator.get("exact_answer", "blind") not in ("blind", "gold"):
        return False
    if not (locator.get("extractor") is None or isinstance(locator.get("extractor"), str)):
        return False
    vocabularies, questions = locator.get("vocabularies", {}), locator.get("questions", {})
    grading = locator.get("grading", {})
    return (isinstance(vocabularies, dict) and all(strings(v) for v in vocabularies.values())
            and isinstance(grading, dict) and all(isinstance(v, str) for v in grading.values())
            and isinstance(questions, dict)
            and all(isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], str)
                    and strings(v[2]) for v in questions.values()))


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def end_of_turn_id(lm) -> int | None:
    """The token the chat template puts after an assistant message (the one a finished answer ends with);
    for a model without a chat template, the line break that ends its one-line answer."""
    from ..stages.generate import answers_one_line, encode_prompt

    stops = lm.end_of_turn_ids()
    tok = lm.tokenizer
    if answers_one_line(tok):
        line_break = tok("\n", add_special_tokens=False)["input_ids"][-1:]
        if line_break and line_break[0] in stops:
            return line_break[0]
    if getattr(tok, "chat_template", None):
        user = [{"role": "user", "content": "Q"}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": "A"}], tokenize=False)
        after = encode_prompt(tok, full)[len(encode_prompt(tok, prompt)):]
        found = next((t for t in after if t in stops), None)
        if found is not None:
            return found
    return stops[0] if stops else None


def answer_token_ids(lm, answer: str) -> list[int]:
    """Token ids of a finished answer as the model would have produced it: the text, then end-of-turn."""
    ids = lm.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    stop = end_of_turn_id(lm)
    return ids + ([stop] if stop is not None else [])


def locate(lm, questions: list[str], prompt_ids: list[list[int]], answer_ids: list[list[int]],
           positions: list[str], locator: dict, exact_answers: list[str] | None = None, gold=None,
           answer_types: list[str] | None = None, extractor=None):
    """Where each position lies in prompt_ids + answer_ids, found as the study's label stage found it.

    ``locator`` is the card's ``locator`` (:func:`locator_rules`): each question's task (its grading
    rule), answer type and options, the vocabularies, the exact-answer mode. Returns a DataFrame, one row
    per answer: ``pos_<position>`` (token index, -1 = absent), ``exact_answer``, ``exact_answer_reason``
    (the route), ``answer_type``, ``answer_type_from`` ("given", "run" = the question is one of the
    study's, "nearest" = the answer type of the study's most similar question, "none").
    Given ``exact_answers`` are used as they are, where they occur in the answer (whole words).
    """
    import pandas as pd

    from .. import textmatch
    from ..stages.generate import decode_answer
    from ..stages.label import label_answers

    n = len(questions)
    texts = [decode_answer(lm.tokenizer, ids) for ids in answer_ids]
    kinds = [question_kind(locator, q, (answer_types or [None] * n)[i]) for i, q in enumerate(questions)]
    table = pd.DataFrame({"answer_type": [k["answer_type"] for k in kinds],
                          "answer_type_from": [k["source"] for k in kinds]})
    if not EXACT_POSITIONS & set(positions):
        index = [position_indices(len(p), len(a), None, positions) for p, a in zip(prompt_ids, answer_ids)]
        return table.assign(exact_answer="", exact_answer_reason="not_needed",
                            **{f"pos_{p}": [i[p] for i in index] for p in positions})
    columns = ["exact_answer", "exact_answer_reason"] + [f"pos_{p}" for p in positions]
    given = list(exact_answers) if exact_answers is not None else [None] * n
    rows: list = [None] * n
    for i, exact in enumerate(given):
        if exact:  # the caller's exact answer: found in the answer by whole-word match, as the extractor's are
            text = texts[i]
            span = textmatch.find_phrase(textmatch.words(text), exact)
            rows[i] = [text[span[0]:span[1]] if span else "", "given" if span else "given_not_in_answer",
                       *_indices_from_span(lm, prompt_ids[i], answer_ids[i], text, span, positions)]
    by_rules = [i for i in range(n) if rows[i] is None]
    if by_rules:
        use_gold = locator.get("exact_answer", "blind") == "gold" and gold is not None
        # label-blind: the gold only grades, and it is not known here; a choice task's options are the
        # candidates its rule looks for (all of them, the right one not marked)
        frame = pd.DataFrame({"id": [f"q{i}" for i in by_rules], "question": [questions[i] for i in by_rules],
                              "gold": [list(gold[i]) if use_gold else list(kinds[i]["options"]) for i in by_rules],
                              "family": "", "subgroup": "",
                              "answer_type": [kinds[i]["answer_type"] or "" for i in by_rules],
                              "task": [kinds[i]["task"] for i in by_rules],
                              "wrong_answers": [[] for _ in by_rules]})
        generations = pd.DataFrame({"id": frame["id"], "prompt": "", "prompt_ids": [prompt_ids[i] for i in by_rules],
                                    "answer_ids": [answer_ids[i] for i in by_rules],
                                    "answer": [texts[i] for i in by_rules]})
        answers = label_answers(frame, generations, locator.get("vocabularies") or {}, lm.tokenizer, positions,
                                extractor=extractor, progress=False, exact_answer="gold" if use_gold else "blind")
        for i, values in zip(by_rules, answers[columns].itertuples(index=False)):
            rows[i] = list(values)
    return pd.concat([table, pd.DataFrame(rows, columns=columns)], axis=1)


def locate_positions(lm, questions, prompt_ids, answer_ids, positions, exact_answers=None, gold=None,
                     locator: dict | None = None) -> np.ndarray:
    """Index ``[n, P]`` of each position (-1: absent): :func:`locate`'s ``pos_`` columns."""
    located = locate(lm, questions, prompt_ids, answer_ids, positions, locator or {}, exact_answers, gold,
                     extractor=lm)
    return located[[f"pos_{p}" for p in positions]].to_numpy(dtype=np.int64)


def locator_rules(run_dir: Path | Run, config: dict) -> dict:
    """The card's ``locator``: every rule the label stage used to find a run's exact answers.

    ``exact_answer`` ("gold": right answers were located at their gold alias; "blind": every answer by
    the rules that see no gold), ``extractor`` (the model asked where the rules found nothing: null =
    the studied model, "none" = no extractor, else a model id), ``grading`` (task -> grading rule),
    ``vocabularies`` (answer type -> candidate answers), ``questions`` (normalised question -> [task,
    answer type, options]; options only for a choice task, all of them, sorted), ``unknown_question``
    (how a question that is not one of the run's gets its answer type).
    """
    import pandas as pd

    from .. import textmatch
    from ..runfolder import ANSWERS, QUESTIONS, VOCABULARIES, at
    from ..tasks import get_task

    run = at(run_dir)  # a folder or an open Run
    # questions.parquet holds each question's answer type; a run folder assembled without it (answers only)
    # gives the tasks and options
    questions = run.read_parquet(QUESTIONS if run.path(QUESTIONS).exists() else ANSWERS)
    vocabularies = run.read_json(VOCABULARIES) if run.path(VOCABULARIES).exists() else {}
    tasks = questions["task"] if "task" in questions.columns else pd.Series("generic", index=questions.index)
    grading = {task: get_task(task).grading for task in sorted(set(tasks))}
    answer_types = questions["answer_type"] if "answer_type" in questions.columns else pd.Series("", index=questions.index)
    wrong = questions["wrong_answers"] if "wrong_answers" in questions.columns else pd.Series([[]] * len(questions))
    table = {}
    for question, task, answer_type, gold, others in zip(questions["question"], tasks, answer_types,
                                                          questions["gold"], wrong):
        options = sorted(set(list(gold) + list(others))) if grading[task] == "choice" else []
        table.setdefault(textmatch.normalize(question), [task, answer_type or "", options])
    return {"exact_answer": exact_answer_mode(run), "extractor": config.get("extractor_model"),
            "grading": grading, "vocabularies": vocabularies, "questions": table,
            "unknown_question": "the task and answer type of the run's question sharing the most words with it "
                                "(numbers count as one word '#'); a choice task's options are then unknown"}


def exact_answer_mode(run_dir: Path | Run) -> str:
    """How the run's label stage located right answers: summary.json's ``exact_answer.mode`` where it says,
    else "gold" when any answer's route is the gold alias (the rule before label-blind spans), else "blind"."""
    from ..runfolder import ANSWERS, SUMMARY, at

    run = at(run_dir)  # a folder or an open Run
    said = (run.read_json_object(SUMMARY, default={}).get("exact_answer") or {})
    if isinstance(said, dict) and said.get("mode") in ("blind", "gold"):
        return said["mode"]
    answers = run.read_parquet(ANSWERS)
    routes = answers["exact_answer_reason"] if "exact_answer_reason" in answers.columns else []
    return "gold" if "gold_alias" in set(map(str, routes)) else "blind"


@functools.lru_cache(maxsize=100_000)
def _signature(question: str) -> frozenset:
    from .. import textmatch

    return frozenset("#" if textmatch.canonical_number(w.norm) is not None else w.norm
                     for w in textmatch.words(question))


def question_kind(locator: dict, question: str, answer_type: str | None = None) -> dict:
    """{task, answer_type, options, source} of a question under the card's locator (see locator_rules)."""
    from .. import textmatch

    known = locator.get("questions") or {}
    found = known.get(textmatch.normalize(question))
    source = "run"
    if found is None and known:
        words = _signature(question)
        best = max(known.items(), key=lambda item: len(words & _signature(item[0])) / max(1, len(words | _signature(item[0]))))
        found, source = [best[1][0], best[1][1], []], "nearest"
    if found is None:
        found, source = ["generic", "", []], "none"
    task, kind, options = found
    if answer_type is not None and str(answer_type).strip():
        kind, source = str(answer_type).strip(), "given"
    return {"task": task, "answer_type": kind, "options": options, "source": source}


def _indices_from_span(lm, prompt_ids, answer_ids, text, span, positions) -> list[int]:
    tokens = None
    if span is not None:
        tokens = char_span_to_tokens(token_char_spans(lm.tokenizer, answer_ids, text), span[0], span[1], text)
    return list(position_indices(len(prompt_ids), len(answer_ids), tokens, positions).values())


# ---------------------------------------------------------------------- training from a run folder

def cell_data(run_dir: Path | Run, site: str, layer: int, position: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, features ``[n, d]``, y ``[n]`` with 1 = error) of one cell of a run, valid examples only."""
    from ..stages.extract import load_features
    from ..runfolder import ANSWERS, at

    ids, X = load_features(run_dir, site, layer, position)
    answers = at(run_dir).read_parquet(ANSWERS).set_index("id")
    y = (~answers.loc[ids, "correct"].astype(bool)).to_numpy().astype(np.int64)
    return ids, X, y


def split_ids(run_dir: Path | Run, seed: int | str) -> tuple[set, set]:
    from ..runfolder import SPLITS, at

    run = at(run_dir)  # a folder or an open Run
    splits = run.read_splits(SPLITS)["seeds"]
    if str(seed) not in splits:
        raise TruthmapError(f"{run.path(SPLITS)}: no seed {seed} (have {sorted(splits, key=int)})")
    return set(splits[str(seed)]["train"]), set(splits[str(seed)]["test"])


def fit_cell(run_dir: Path | Run, site: str, layer: int, position: str, seed: int | str = 0, C: float = 1.0):
    """A Detector fitted on one cell's train split of ``seed``; returns (detector, test ids, test X, test y).

    The detector's ``n_train_`` is the number of train answers where the position exists."""
    ids, X, y = cell_data(run_dir, site, layer, position)
    train_ids, test_ids = split_ids(run_dir, seed)
    train = np.array([i in train_ids for i in ids])
    test = np.array([i in test_ids for i in ids])
    validation = np.isin(ids, list(validation_ids(run_dir, seed)))
    detector = Detector(C=C).fit(X[train], y[train])
    detector.n_train_ = int(train.sum())
    # P(error) and labels of the validation answers: what export calibrates the threshold on
    detector.validation_ = (detector.predict_proba(X[validation])[:, 1], y[validation])
    return detector, [i for i, t in zip(ids, test) if t], X[test], y[test]


def validation_ids(run_dir: Path | Run, seed: int | str) -> set:
    """The ids of the validation part of ``seed`` (empty for splits written without one)."""
    from ..runfolder import SPLITS, at

    part = at(run_dir).read_splits(SPLITS)["seeds"].get(str(seed), {}).get("validation", [])
    return {i for i in part if isinstance(i, str)} if isinstance(part, list) else set()


def calibrate(detector: Detector, X_test, y_test, target_false_flag: float) -> dict:
    """Set ``detector.threshold`` by split-conformal calibration on its validation right answers
    (:mod:`.conformal`) and describe it, with what the threshold does on the test part; the card's
    ``calibration``. Where the validation part holds too few right answers for the target, the
    threshold stays and the returned ``status`` says why."""
    from .conformal import conformal_threshold, false_flag_bound

    p_val, y_val = detector.validation_
    right_scores = np.sort(p_val[y_val == 0])
    out = {"method": "split-conformal", "part": "validation", "target_false_flag": float(target_false_flag),
           "rule": "threshold = the next float above the k-th smallest P(error) of the n right validation "
                   "answers, k = ceil((n + 1)(1 - target)); flag when P(error) >= threshold",
           "guarantee": "a new right answer exchangeable with the validation ones is flagged with probability "
                        "<= (n + 1 - k)/(n + 1) <= target; given this validation part, the false-flag rate is "
                        "Beta(n + 1 - k, k) distributed (interval_95)",
           "right_scores": [float(v) for v in right_scores]}
    try:
        found = conformal_threshold(right_scores, target_false_flag)
    except TruthmapError as err:
        return {**out, "status": f"not calibrated: {err}; the threshold stays {detector.threshold:g}"}
    detector.threshold = found["threshold"]
    p_test = detector.predict_proba(X_test)[:, 1] if len(X_test) else np.array([])
    flagged = p_test >= detector.threshold
    right, wrong = y_test == 0, y_test == 1
    return {**out, "status": "calibrated", **{k: found[k] for k in ("rank", "n_right", "score_at_rank",
                                                                     "expected_false_flag")},
            "interval_95": list(false_flag_bound(found["n_right"], found["rank"])),
            "test_right": int(right.sum()), "test_false_flag_rate": float(flagged[right].mean()) if right.any() else None,
            "test_wrong": int(wrong.sum()), "test_flag_rate_wrong": float(flagged[wrong].mean()) if wrong.any() else None}


def risk_coverage_card(detector: Detector, X_test, y_test) -> dict | None:
    """The card's ``risk_coverage`` on the test part: accuracy kept vs fraction answered, its area, and the
    point the card's threshold answers at (:func:`.conformal.risk_coverage`); None without test answers."""
    from .conformal import risk_coverage

    if not len(X_test):
        return None
    p = detector.predict_proba(X_test)[:, 1]
    curve = risk_coverage(p, y_test)
    kept = p < detector.threshold
    return {"part": "test", **curve,
            "at_threshold": {"coverage": float(kept.mean()),
                             "accuracy": float((y_test[kept] == 0).mean()) if kept.any() else None}}


def prompt_frame(run_dir: Path | Run) -> tuple[str | None, str | None]:
    """(prefix, suffix) such that every prompt of the run is prefix + question + suffix, or (None, None)."""
    from ..runfolder import ANSWERS, at

    answers = at(run_dir).read_parquet(ANSWERS)
    frames = set()
    for prompt, question in zip(answers["prompt"], answers["question"]):
        if prompt.count(question) != 1:
            return None, None
        before, after = prompt.split(question)
        frames.add((before, after))
    return frames.pop() if len(frames) == 1 else (None, None)


DEFAULT_TARGET_FALSE_FLAG = 0.1  # export's target false-flag rate on right answers
RISK_COVERAGE_FIGURE = "risk_coverage.png"  # export: the card's risk-coverage curve


def export_detector(run_dir: str | Path, *, site: str, layer: int, position: str, out: str | Path | None = None,
                    seed: int | str = 0, C: float = 1.0, target_false_flag: float = DEFAULT_TARGET_FALSE_FLAG) -> Path:
    """Fit a Detector on the run's train split (``seed``), measure it on the test split, and save it.

    ``out`` (default ``<run>/detectors/<site>-L<layer>-<position>``) must be new, empty or a detector.
    The threshold is calibrated on the seed's validation part for ``target_false_flag`` (:func:`calibrate`);
    the card holds the risk-coverage curve on the test part, also drawn as ``risk_coverage.png``."""
    from .conformal import conformal_rank

    conformal_rank(1, target_false_flag)  # a target outside (0, 1) is refused before any work
    from ..runfolder import CONFIG, SUMMARY, Run, child, guard

    run_dir = Path(run_dir)
    cell = check_cell(site, layer, position)  # the values name the default folder: nothing else may
    # a folder named on the command line is checked from its parent (it is no link); the default from the run
    anchor = Path(os.path.abspath(out)).parent if out else None
    out = Path(out) if out else child(run_dir, f"detectors/{cell['site']}-L{cell['layer']}-{cell['position']}", "detector")
    for name in (WEIGHTS, FALLBACK_WEIGHTS, CARD, RISK_COVERAGE_FIGURE):  # before any work: no link on the way,
        guard(out / name, anchor=anchor)  # no file of someone else replaced
    with Run.reading(run_dir) as run:  # under the run's shared lock, every file checked against its manifest
        config, summary = run.read_json_object(CONFIG), run.read_json_object(SUMMARY, default={})
        if not isinstance(config.get("model"), str):
            raise TruthmapError(f"{run_dir / CONFIG}: no model named; is this a run folder?")
        detector, test_ids, X_test, y_test = fit_cell(run, site, layer, position, seed, C)
        detector.fallback_ = _fit_fallback(run, site, layer, position, seed, C, target_false_flag)
        calibration = calibrate(detector, X_test, y_test, target_false_flag)
        return _finish_export(run, detector, test_ids, X_test, y_test, config, summary, site, layer, position,
                              seed, out, calibration)


def _fit_fallback(run_dir: Path | Run, site: str, layer: int, position: str, seed, C: float,
                  target_false_flag: float) -> "Detector | None":
    """A detector at the same site and layer on a position every answer has (the first of
    FALLBACK_POSITIONS the run extracted), for an answer whose own position does not exist; None when
    the detector's position always exists or the run has none of them."""
    if position not in EXACT_POSITIONS:
        return None
    for candidate in FALLBACK_POSITIONS:
        try:
            fallback, ids, X_test, y_test = fit_cell(run_dir, site, layer, candidate, seed, C)
        except TruthmapError:  # not extracted in this run
            continue
        auc = float(auc_score(fallback.predict_proba(X_test)[:, 1], y_test)) if len(set(y_test.tolist())) == 2 else None
        calibration = calibrate(fallback, X_test, y_test, target_false_flag)
        fallback.card = {"site": site, "layer": int(layer), "position": candidate, "train_size": fallback.n_train_,
                         "test_size": len(ids), "test_auc": auc, "calibration": calibration,
                         "risk_coverage": risk_coverage_card(fallback, X_test, y_test)}
        return fallback
    return None


def _finish_export(run_dir, detector, test_ids, X_test, y_test, config, summary, site, layer, position, seed, out,
                   calibration):
    from ..constants import __version__

    auc = float(auc_score(detector.predict_proba(X_test)[:, 1], y_test)) if len(set(y_test.tolist())) == 2 else None
    prefix, suffix = prompt_frame(run_dir)
    protocol = config.get("protocol", "brief")
    max_new_tokens = config.get("max_new_tokens")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:  # the task's own answer length, as the generate stage chose it
        from ..runfolder import QUESTIONS, at
        from ..tasks import answer_length

        max_new_tokens = answer_length(at(run_dir).read_parquet(QUESTIONS)["task"], None, protocol)
    task = summary.get("dataset", config.get("dataset"))
    detector.card = {
        "model": config["model"], "model_revision": summary.get("model_revision"),
        "site": site, "layer": int(layer), "position": position,
        "task": task, "seed": int(seed),
        "train_size": detector.n_train_,
        "test_size": len(test_ids), "test_auc": auc,
        "positive_class": "error (the answer is wrong)", "threshold_rule": "flag when P(error) >= threshold",
        "prompt_prefix": prefix, "prompt_suffix": suffix, "max_new_tokens": int(max_new_tokens),
        # the run folder's name, not its path: a card is meant to be shared, a machine's paths are not
        "run": run_dir.root.resolve().name, "test_ids": test_ids, "truthmap": __version__,
        "domain": domain(config["model"], task, protocol, int(max_new_tokens)),
        "locator": locator_rules(run_dir, config),
        "calibration": calibration,
        "risk_coverage": risk_coverage_card(detector, X_test, y_test),
    }
    folder = detector.save(out)
    curve = detector.card["risk_coverage"]
    if curve is not None:
        from .conformal import plot_risk_coverage

        at = curve["at_threshold"]
        plot_risk_coverage(curve, folder / RISK_COVERAGE_FIGURE,
                           f"{site} layer {layer} · {position} · test part",
                           (at["coverage"], at["accuracy"]) if at["accuracy"] is not None else None)
    return folder


def domain(model: str, task: str, protocol: str, max_new_tokens: int) -> dict:
    """The card's ``domain``: what the detector's P(error) was measured on, and what lies outside it."""
    return {
        "answers": f"greedy answers of {model} itself (at most {max_new_tokens} new tokens, protocol "
                   f"{protocol}), to the run's prompt of each question",
        "questions": f"questions of {task}",
        "protocol": protocol,
        "outside": "an answer the model did not write (another model's, a person's, an edited one) or a "
                   "question of another kind: its P(error) is not a measured prediction; 'truthmap score' "
                   "warns when a given answer is not the model's own greedy answer",
    }


def check_card_auc(detector: Detector, run_dir: str | Path) -> tuple[float, float]:
    """(test AUC recomputed from the stored features of ``run_dir``, the run the detector was exported
    from; AUC on the card): equal for an intact detector."""
    card = detector.card
    run_dir = Path(run_dir)
    ids, X, y = cell_data(run_dir, card["site"], card["layer"], card["position"])
    row = {i: k for k, i in enumerate(ids)}
    rows = [row[i] for i in card["test_ids"]]
    return float(auc_score(detector.predict_proba(X[rows])[:, 1], y[rows])), card["test_auc"]
