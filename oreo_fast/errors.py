"""Every error a user can fix, in one place, so the CLI maps them all to one exit status (2)
and one line on stderr instead of a traceback.

- :class:`DataError`: bad input data or a bad folder; it names the file, the 1-based line
  and the field where known.
- :class:`ModelDirError` / :class:`OutputError`: a model folder or the output location that
  cannot be used (both are :class:`DataError`, so they name the folder).
- :class:`CheckpointError`: a checkpoint that cannot be resumed from (a :class:`DataError`
  naming its manifest and the field).
- :class:`ConfigError`: a bad configuration value; it names the key (and the file).
- :class:`NonFiniteError`: training produced NaN/Inf values it could not skip past.
"""
from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data. ``path``, ``line`` (1-based) and ``field`` say where, when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{what}{message}")


class ModelDirError(DataError):
    """A model folder that cannot be used: missing, no config, no safetensors weights, or
    inconsistent with the other models of the run."""


class OutputError(DataError):
    """The output location cannot hold the run's results."""


class CheckpointError(DataError):
    """A trainer checkpoint that cannot be resumed from (names its file and field)."""


class ConfigError(ValueError):
    """A configuration problem, naming the key (and the file) at fault."""


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf values that it could not skip past."""


USER_ERRORS = (DataError, ConfigError, NonFiniteError)
"""What the command-line entry points report in one line with exit status 2."""
