"""The one error tree of YADTQ.

Every error a user can cause or meet derives from :class:`YadtqError`. Each class carries the
exit code the command-line tools use for it (DESIGN section 12), so a command prints one line
that names the problem and exits with a documented code; a traceback is only for the unexpected.
"""

from __future__ import annotations


class YadtqError(Exception):
    """Base class of every error YADTQ raises on purpose."""

    exit_code = 1


class UsageError(YadtqError):
    """Bad command-line usage or bad input from the user."""

    exit_code = 2


class UnreachableError(YadtqError):
    """The server's socket or the Kafka broker cannot be reached. ``lasting`` is set when
    trying again cannot help (no permission to use the socket); ``absent`` when nothing listens
    at the socket (no server, or not yet)."""

    exit_code = 3
    lasting = False
    absent = False


class WaitTimeout(YadtqError):
    """A wait for a task's result ran out of time."""

    exit_code = 4


class ConfigError(YadtqError):
    """The configuration is invalid: an unknown key, a wrong type, a missing required value."""

    exit_code = 78  # EX_CONFIG; the unit lists it in RestartPreventExitStatus=


class BadMessage(YadtqError):
    """A Kafka message does not have the shape DESIGN section 2 fixes.

    ``task_id`` is set when the message is a submission whose id could still be read, so the
    task can be recorded as failed with this error instead of being skipped.
    """

    def __init__(self, message: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id


class RequestError(YadtqError):
    """A socket request was refused; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        if code in CLIENT_ERROR_CODES:
            self.exit_code = UsageError.exit_code
        elif code in UNAVAILABLE_CODES:
            self.exit_code = UnreachableError.exit_code
        else:
            self.exit_code = 1


#: Socket error codes that mean the request itself was wrong (exit code 2 in yadtqctl).
CLIENT_ERROR_CODES = frozenset({"bad_request", "too_large", "unknown_op", "conflict", "bad_task",
                                "unroutable"})
#: Socket error codes that mean the server or Kafka cannot take the request now (exit code 3).
UNAVAILABLE_CODES = frozenset({"busy", "unavailable"})
