"""Names every floor of the package shares, on the ground floor: the version, the default model, the
sites a model is read at, the populations and the smallest class of a study (the token positions have
a module of their own: positions.py).

Settings (config.py), model code and the stages all name these; defined here, they import them without
importing each other (``models``, ``stages.label`` and ``stages.baselines`` keep their old names for them).
"""

__version__ = "0.1.0"

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
SITES = ("residual", "mlp", "attention")  # where hidden states are read (backends.hf.LoadedModel.hook_site)
BASELINE_SITE = "baseline"  # the ``site`` of the baselines' rows in the results tables (stages/baselines.py)

MIN_PER_CLASS = 10  # right and wrong answers a study needs of each
POPULATIONS = ("common", "each")  # which answers each position's probe is trained on (stages/label.py)
EXACT_ANSWER_MODES = ("blind", "gold")  # how exact answers are located (stages/label.py); the first is the default
GRADERS = ("alias", "strict", "lenient")  # which grader's label becomes `correct` (stages/label.py); the first is the default
