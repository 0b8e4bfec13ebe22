"""A problem in a recipe names its key and the fix; `ConfigError` carries every problem found at once."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing to fix: `key` is the recipe key (or keys, "a and b") it concerns."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(ValueError):
    """One or more problems in a recipe or its data, each naming a key and the fix."""

    def __init__(self, problems: list[Problem | str]):
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self):  # rebuilt from its problems when it crosses a process boundary (the driver's helper)
        return ConfigError, (self.problems,)

    @property
    def messages(self) -> list[str]:
        """The problems as the lines a user reads."""
        return [str(p) for p in self.problems]
