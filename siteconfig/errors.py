"""The one error type every `cmcs` sub-command raises for an expected failure.

It lives here, at the bottom of the import graph, so that `cmcs` (the CMCS, an OPC UA client),
`bench` and `gateway` can all raise it without importing each other; `gateway.cli` prints it
as one line.
"""

from __future__ import annotations


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
