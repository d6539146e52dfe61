"""One error family: every failure s2cli reports says what was given, what was expected, and the fix."""
from __future__ import annotations


class S2Error(Exception):
    """Base of every error s2cli raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, what: str, *, given: object = None, expected: str | None = None, fix: str | None = None):
        self.what = what
        self.given = given
        self.expected = expected
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.what]
        if self.given is not None:
            parts.append(f"given {self.given!r}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        msg = "; ".join(parts)
        if self.fix:
            msg += f". Fix: {self.fix}"
        return msg


class ConfigError(S2Error, ValueError):
    """Bad usage or configuration, detected before any weights load (CLI exit code 2)."""

    exit_code = 2


class WeightsNotFoundError(ConfigError):
    """Weights are not on this machine and cannot be had now: offline and not in the HF cache, the hub unreachable
    (after one short timeout, no retries), no such repo or revision; or a --weights path that does not exist."""
