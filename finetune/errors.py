"""User-facing errors: printed as a message and a non-zero exit, never as a traceback."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix (bad recipe, bad data, bad path). The CLI prints it without a traceback."""

    exit_code = 1


class RecipeError(FinetuneError):
    """One or more problems in a recipe, each naming its key path."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


class DataError(FinetuneError):
    """A data file or row that cannot be used."""

    exit_code = 3


class RunInterrupted(FinetuneError):
    """Ctrl-C or SIGTERM stopped training at a step boundary; a checkpoint to resume from was saved."""

    exit_code = 130
