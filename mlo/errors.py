"""Exceptions raised by mlo, each with a message that names what is wrong."""


class MLOError(Exception):
    """Base class for every error mlo raises on purpose."""


class GraphError(MLOError, ValueError):
    """The problems and their dependencies do not form a graph mlo can run."""


class ConfigError(MLOError, ValueError):
    """An engine or problem setting has an invalid value (the message names the field).

    ``field`` is the dotted path of the offending setting where it is known (every error of
    ``mlo.engine_from_config`` and of the applications' config loader:
    ``"engines.audience.iterations"``), else ``None``; code reads it here instead of
    parsing the message.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NonFiniteError(MLOError, FloatingPointError):
    """A loss, gradient or hypergradient contained NaN or Inf.

    Attributes name where: ``problem`` (whose update), ``edge`` (``"Q->R"`` for an
    edge VJP, ``None`` for the problem's own loss/gradient) and ``step``.
    """

    def __init__(self, message: str, problem: str, edge: str | None, step: int):
        super().__init__(message)
        self.problem = problem
        self.edge = edge
        self.step = step


class InputTypeError(MLOError, TypeError):
    """A value handed to mlo has the wrong type (an objective that returns no scalar tensor,
    row numbers that are not integers)."""
