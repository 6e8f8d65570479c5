"""What runs beside or after the stages of truthmap/stages/, on a run folder they wrote.

Optional stages of ``truthmap run`` (each registered at the bottom of its module, stages/base.py; pipeline.py
runs them when asked): entropy.py (``samples`` after extract, ``entropy`` after baselines: semantic entropy
and its probes; always in a study without gold answers), wholemap.py (``wholemap``, after probe), cost.py
(``cost``) and attention.py (``--also attention``, after baselines). Commands on a finished run:
resample.py (``truthmap resample``: error types), choice.py (``truthmap choose``), transfer.py
(``truthmap transfer``: probes across tasks), detector.py (``truthmap export`` / ``score`` / ``ask``:
the Detector estimator and ModelScorer) and audit.py (``python -m truthmap.analyses.audit``: the
exact-answer locator against hand-checked spans). Analyses import stages; stages never import analyses.
"""
