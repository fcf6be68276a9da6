"""The project's exception types.

Every error caused by bad input (a file, a folder, a config field) is raised as one of these, with a
message that names the offending file or field and what is wrong with it.
"""


class AviJaxError(Exception):
    """Base class of the errors avi_jax raises on purpose."""


class InputError(AviJaxError, ValueError):
    """Bad user input: unreadable/empty audio, NaN coefficients, wrong shapes, missing files."""


class ConfigError(AviJaxError, ValueError):
    """A config field is missing or inconsistent (e.g. a pretrained path that does not exist)."""


class CheckpointError(AviJaxError, ValueError):
    """A checkpoint folder or file cannot be read or does not match the model."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class RenderError(AviJaxError, RuntimeError):
    """The mesh renderer cannot run (no headless OpenGL/EGL on this machine)."""


class TrainingDivergedError(AviJaxError, RuntimeError):
    """A training metric (loss, gradient norm, ...) became NaN or infinite; no checkpoint of that state
    was written."""


class WorkdirConfigError(ConfigError):
    """A workdir's stages were trained with a config that differs from the run's in a field that defines
    them; the message lists the fields (old -> new) and the ways out (a new workdir, or retraining)."""


def run_command(command, args) -> int:
    """Run a command-line tool's ``command(args) -> exit status``; the project's errors become one line
    ``error: ...`` on stderr and exit status 2 (no traceback). Used by ``infer``, ``export`` and ``evaluate``."""
    import sys
    try:
        return command(args)
    except AviJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
