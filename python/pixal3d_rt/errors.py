"""User-facing errors: one line that names the file or input and the remedy, never a deep traceback."""


class Pixal3DError(Exception):
    """Base class; the CLI prints `error: <message>` and exits with status 2."""


class CheckpointError(Pixal3DError):
    """A weights file is missing, unreadable, of the wrong class, or does not match its network."""


class InputImageError(Pixal3DError):
    """The input image is missing, unreadable, or has nothing to reconstruct."""


class BudgetError(Pixal3DError):
    """A request does not fit the resources it was given."""


class StageOutOfMemory(BudgetError):
    """A stage ran out of memory (the pipeline may plan it again under a tighter budget)."""


class OutputError(Pixal3DError):
    """The output path cannot be written."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's text, cut to a readable length (library messages can be paragraphs)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
