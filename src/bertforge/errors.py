"""Errors a user can act on, each with the exit code the CLI returns for it."""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_BUILD_FAILED = 3


class BertforgeError(Exception):
    """A failure explained in one line; the CLI prints it without a traceback."""

    exit_code = EXIT_BUILD_FAILED


class UsageError(BertforgeError):
    """Bad input: a recipe, a path, a model spec or a flag."""

    exit_code = EXIT_USAGE


class SourceError(UsageError):
    """A model spec that does not resolve to a BERT checkpoint."""


class ModelFileError(UsageError):
    """A model file onnxruntime cannot load. Given by the user (a variant to run, bench or validate) it
    is bad input; a stage that meets one in its own work turns it into a StageError."""


class StageError(BertforgeError):
    """A stage ran but its output is not what the pipeline needs (e.g. fusion incomplete)."""


class EntryGone(StageError):
    """A cache entry another process built is not in this machine's cache nor in a remote one."""
