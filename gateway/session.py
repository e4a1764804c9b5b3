"""Who is calling: the per-request context of the OPC UA server.

asyncua tells neither a method callback nor a user manager nor a certificate validator which
session or connection the request came on. gateway.asyncua_hooks records them here, in context
variables set in the task that serves the request (so the callback, awaited in that task, sees
them): `CURRENT_SESSION` around InternalSession.call (method calls), `CURRENT_PROCESSOR` around
UaProcessor._process_message (every request of a connection). Keep callbacks async: an executor
thread does not see the context.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.users import session_role

if TYPE_CHECKING:
    from asyncua.server.internal_session import InternalSession
    from asyncua.server.uaprocessor import UaProcessor

# The session whose method call is being served.
CURRENT_SESSION: contextvars.ContextVar[InternalSession | None] = contextvars.ContextVar("cmcs_session", default=None)
# The processor (connection) whose request is being served.
CURRENT_PROCESSOR: contextvars.ContextVar[UaProcessor | None] = contextvars.ContextVar("cmcs_processor",
                                                                                       default=None)


def session_role_of(session: InternalSession | None) -> tuple[str, str]:
    """(user, role) of a session. The server's own internal session is Admin; a client is what it
    logged in as (gateway.users); anything else is a Viewer."""
    if session is None:
        return "-", "Viewer"
    if not session.external and session is getattr(session.iserver, "isession", None):
        return "server", "Admin"
    return session_role(session.user)


# How caller() turns the session into (user, role).
ROLE_RESOLVER: Callable[[InternalSession | None], tuple[str, str]] = session_role_of


def caller() -> tuple[str, str]:
    """(user name, role) of the session calling now: what it logged in as (gateway.security)."""
    return ROLE_RESOLVER(CURRENT_SESSION.get())
