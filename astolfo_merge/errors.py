"""Error types a user can read. Each names the file / field / key and the problem.

`AstolfoError` and its subclasses are *bad input* (CLI exit code 2, no traceback); anything else
escaping the library is an internal error (exit code 1).
"""
import math


class AstolfoError(Exception):
    """Base class of every user-facing error."""


class CheckpointError(AstolfoError):
    """A checkpoint file cannot be read as one: names the file and what is wrong."""

    def __init__(self, path, problem):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


class RecipeError(AstolfoError):
    """A recipe field is missing, unknown or out of range: names the field."""

    def __init__(self, field, problem):
        self.field, self.problem = field, problem
        super().__init__(f"recipe field '{field}': {problem}")


class ArchitectureError(AstolfoError):
    """Inputs that cannot be merged together (mixed architectures, prediction types, layouts)."""


class OutputExistsError(AstolfoError):
    def __init__(self, path):
        self.path = str(path)
        super().__init__(f"{self.path}: output exists; pass --overwrite (or 'overwrite': true) to replace it")


class MergeKeyError(AstolfoError):
    """A method failed on one key: names the key and the input files involved."""

    def __init__(self, key, problem, files=()):
        self.key, self.problem, self.files = key, problem, list(files)
        where = f" (inputs: {', '.join(self.files)})" if self.files else ""
        super().__init__(f"key '{key}': {problem}{where}")


class MemoryBudgetError(AstolfoError):
    """The plan cannot run inside the memory budget; says how much it would need."""


class Cancelled(AstolfoError):
    """The job was cancelled; nothing was written."""

    def __init__(self):
        super().__init__("merge cancelled; no output was written")


class OptionError(AstolfoError):
    """A run option (memory budget, plot file, open-file limit) is unusable: names the option."""

    def __init__(self, option, problem):
        self.option, self.problem = option, problem
        super().__init__(f"{option}: {problem}")


def check_memory_gb(value, option="memory budget (GB)") -> float:
    """A memory budget in GB as a float: finite and above 0 (NaN, inf, 0 and negatives are refused)."""
    try:
        gb = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(option, f"{str(value)[:40]!r} is not a number of GB") from None
    if not math.isfinite(gb) or gb <= 0:
        raise OptionError(option, f"must be a finite number of GB above 0 (e.g. 1.5), got {value}")
    return gb


def check_throttle(value, option="throttle (seconds per key)") -> float:
    """A pause per key in seconds as a float: finite, 0 (none) up to a minute."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(option, f"{str(value)[:40]!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= 60:
        raise OptionError(option, f"must be a number of seconds from 0 to 60, got {value}")
    return seconds
