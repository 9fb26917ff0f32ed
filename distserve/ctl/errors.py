"""Errors that end a command with a one-line message and a chosen exit code (never a traceback)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PROBLEM = 1  # unknown ids, doctor findings, drain timeouts, refused writes
EXIT_UNAVAILABLE = 2  # etcd unreachable (bad arguments also exit 2, as argparse does)
EXIT_USAGE = 2  # a bad argument: a malformed id or value, a revision in the future


class CtlError(Exception):
    """A user-facing failure: printed as `distserve-ctl: <message>` and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_PROBLEM) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CtlError):
    """A bad argument found after parsing (it needed etcd, or several options together): exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class UnknownId(CtlError):
    def __init__(self, what: str, ident: str, known: list[str] | None = None) -> None:
        hint = ""
        if known is not None:
            shown = ", ".join(sorted(known)[:8]) or "none"
            more = f" (+{len(known) - 8} more)" if len(known) > 8 else ""
            hint = f"; known {what}s: {shown}{more}"
        super().__init__(f"unknown {what} {ident!r}{hint}", EXIT_PROBLEM)
