"""The one exception type a user sees: a message they can act on, never a library traceback."""


class TruthmapError(Exception):
    """A problem with the user's input or environment, phrased as one actionable line.

    The CLI prints ``str(err)`` and exits with status 2; the Python API lets it propagate.
    Messages name the file, row and field where there is one.
    """


class CannotRun(TruthmapError):
    """An optional analysis that cannot run on this data (too few answers of a kind, a model without
    attention weights …). The message says why and what would make it run. ``truthmap run`` skips the
    analysis with that line (summary.json ``skipped``) and finishes the rest; asked for by name, it is an error.
    """


def where(path=None, row=None, field=None) -> str:
    """Format the 'file, row, field' prefix of an error message."""
    parts = []
    if path is not None:
        parts.append(str(path))
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)
