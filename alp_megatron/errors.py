"""Exception types a user can cause, each naming what to fix."""


class AlpError(Exception):
    """Base class of every error alp-megatron raises on purpose."""


class ConfigError(AlpError, ValueError):
    """A configuration value is invalid.

    The message always names the field (dotted path), the value that was given and how to fix it.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"config field '{field}': {problem}. Fix: {fix}")
