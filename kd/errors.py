"""Errors that kdflow reports as one line to the user.

`InputError` is bad input (config, data, arguments, weights): the CLI prints its
message on one line and exits with code 2. `GateRejected` exits with code 3.
`TrainingDiverged` is a run that failed (exit 1) because its loss stopped being finite.
"""


class InputError(ValueError):
    """Bad input from the user: a config field, a data file, a name, a weights file."""


class GateRejected(RuntimeError):
    """The promotion gate said no."""


class TrainingDiverged(RuntimeError):
    """The epoch's mean training loss is nan or inf: the run stops instead of training on."""


def root_cause(e: BaseException) -> BaseException:
    """The exception that started a failure, through Ray's wrappers: a ``RayTaskError``'s
    ``cause``, a Ray Train ``WorkerGroupError``'s ``worker_failures`` (lowest rank first),
    and ``__cause__`` links of exceptions that carry no message of their own."""
    seen: set[int] = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        nxt = (failures[min(failures)] if isinstance(failures, dict) and failures
               else getattr(e, "cause", None))
        if not isinstance(nxt, BaseException) and not str(e).strip():
            nxt = e.__cause__
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    return e


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` of `root_cause` (no traceback)."""
    root = root_cause(e)
    first = (str(root).strip().splitlines() or [""])[0]
    return f"{type(root).__name__}: {first}"
