"""Every place where the gateway replaces a part of asyncua, in one module.

asyncua 2.1 offers hooks for most of what the gateway needs (user manager, permission ruleset,
certificate validator, PostRead callbacks, history storage: gateway/security.py and
gateway/historian.py use those). Five things it has no hook for; each is patched here, with a
docstring that says why (docs/notes/asyncua.md has the findings behind them):

1. `InternalSession.call` records the calling session (gateway.session.CURRENT_SESSION): method
   callbacks are not told who calls, and the command service decides by role.
2. `MonitoredItemValues.set_current_datavalue` without its deep copy: at 1,000 units the copy
   was three quarters of the time spent notifying a client subscribed to every variable.
3. `UaProcessor.process` and `UaProcessor._process_message` hand each message to the server's
   security state (gateway.security.SecurityState, hung on the InternalServer as
   `cmcs_security`): asyncua checks a client's certificate only in CreateSession, never the
   one that opens the channel, and serves a None channel the site has not allowed.
4. `monitored_item_service.WhereClauseEvaluator` becomes `SpecWhereClauseEvaluator`: asyncua's
   event filter compares OfType exactly, reads only the first element of a browse path and
   cannot select the ConditionId, so a client filtering on ConditionType or ActiveState/Id would
   never get an alarm (gateway/alarms).
5. `MethodService._call` answers a Call on an ObjectId or MethodId that is not in the address
   space with BadNodeIdUnknown (Part 4 7.38: the node does not exist) instead of asyncua's
   BadNodeIdInvalid (which Part 4 keeps for a NodeId whose syntax is wrong): a method call on a
   unit a site reload removed says that the unit is unknown, as the command service does.

Three more live beside the code they serve, and are installed from here too, so that this module
is the one place that says what of asyncua is replaced (with 8 and 9 below, put on a server's
instances):

6. `OPCUAProtocol.connection_made` / `data_received` (gateway/limits.py
   `install_protocol_checks`): an ERR BadMaxConnectionsReached instead of a silent close past the
   connection limit, and a chunk whose declared size is past the negotiated limit refused at once
   (asyncua buffered whatever size a peer declared: one connection could make it hold 4 GB).
7. `ua_binary._create_uatype_array_deserializer` / `_create_list_deserializer` (gateway/limits.py
   `install_decoder_bounds`): an array longer than the bytes left is refused (BadDecodingError);
   one Write with a Null-Variant array of length 2**31-1 froze the server (found by our fuzzer).
8. `ua_binary.struct_to_binary` for DataChangeNotification (information_model/fastpath.py
   `install_fast_encoding`): a precompiled, byte-identical encoder; asyncua's generic one was the
   largest share of the cost of publishing to a client subscribed to every variable.

`install()` puts them all in place, once per process (idempotent). They only ever change what a
server *with our state* does: a server without `cmcs_security` is served by asyncua's own code.

Those seven replace asyncua's classes or modules, for every server in the process. Two more are
put on one server's *instances* (its InternalServer and the services it holds) while that server
is set up, by the code they serve (gateway/server.py calls both); they are not in `install()` or
`installed()`, because there is nothing to install before a server exists:

8. gateway/limits.py `install(server, ...)` (the resource limits, issue 19) wraps, on that
   server only, `iserver.create_session` (MaxSessions: BadTooManySessions, after closing sessions
   never activated or left without a channel) and `iserver.subscription_service`'s
   `create_subscription` (per session and in total: BadTooManySubscriptions, after deleting an
   orphaned subscription; the lifetime and keep-alive counts revised so that an orphan dies within
   60 s), `create_monitored_items` and `modify_monitored_items` (BadTooManyMonitoredItems per item,
   BadTooManyOperations per call, queue sizes clamped). asyncua calls these services through those
   attributes (`UaProcessor` -> `iserver.create_session`, `InternalSession` ->
   `subscription_service.*`), so a wrapper there sees every client request, and asyncua has no
   hook before any of them. The same function sets asyncua's own knobs (`iserver.max_*`,
   `Server.limits`, and `InternalSession.max_connections`, which asyncua keeps on the class, so it
   holds for every server in the process), adds a logging filter on `asyncua.server.uaprocessor`
   that counts the requests asyncua refuses as past the transport limits (it counts them nowhere
   else), a second one on every asyncua logger (`LogBudget`: 20 WARNING+ records a minute per call
   site, so that a hostile client cannot fill the disk with asyncua's tracebacks), and writes ServerCapabilities, ServerDiagnosticsSummary and `ResourceRefusals`.
9. gateway/security.py `secure_server` (its `_install_access_policy`) replaces
   `iserver.attribute_service` with `RoleAwareAttributeService` (asyncua's AttributeService
   subclassed): a client's Write is
   decided by its role (only the site's writable setpoints, Engineer and up, values in range,
   audited); asyncua alone lets any authenticated user write a CurrentWrite variable and has no
   per-write hook. (The UserAccessLevel/UserExecutable answers use asyncua's PostRead callback,
   an ordinary hook.)

One more replacement lives outside the gateway, and is listed here so that this stays the index of
every place asyncua is patched: the benchmarks' measuring clients (bench code only) replace two
callables on one client's protocol and session instances to time a PublishResponse before asyncua
decodes it (bench/arrival.py `stamp_arrivals`); no server, and no client the gateway runs, is touched.

State hung on asyncua's objects, read by the code above: `iserver.cmcs_security`
(gateway.security.SecurityState), `iserver.cmcs_limits` (gateway.limits.ResourceGuard), and on an
InternalSession `cmcs_created_at` (limits) and `cmcs_channel_certificate` (security).

The patches reach into private parts of asyncua (`_process_message`, `_connection`,
`_transport`, `_aspace`, `_eval_el`, `_eval_op`; hook 8 also reads `_external_sessions`,
`_monitored_items` and `bserver.clients`); they were written for, and tested with, asyncua
`ASYNCUA_VERSION`. On any other version `install()` refuses to start (`AsyncuaVersionError`, one
line on the command line) instead of warning: patch 3 carries the channel-certificate and None
checks, and a silent mismatch there would leave a server that looks secured and is not. To move
to another asyncua: read each patched method in the new version, adapt, run the security,
alarm and interop tests, then change ASYNCUA_VERSION (and the pin in pyproject.toml).
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from asyncua import ua
from asyncua.server import monitored_item_service
from asyncua.server.address_space import AddressSpace, MethodService
from asyncua.server.internal_session import InternalSession
from asyncua.server.monitored_item_service import MonitoredItemValues
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import uatcp_to_binary

from asyncua.server.binary_server_asyncio import OPCUAProtocol
from asyncua.ua import ua_binary

from gateway.limits import install_decoder_bounds, install_protocol_checks
from gateway.session import CURRENT_PROCESSOR, CURRENT_SESSION
from information_model.fastpath import install_fast_encoding
from siteconfig.errors import CliError

log = logging.getLogger(__name__)

ASYNCUA_VERSION = "2.1.0"  # the version every patch below was read against (pyproject.toml pins it)
_MARK = "_cmcs_hook"  # attribute set on each replacement, so install() knows it is done


class AsyncuaVersionError(CliError):
    """The installed asyncua is not the one these patches were written for (printed as one line)."""


def check_version(installed: str | None = None) -> None:
    """Refuse any asyncua but ASYNCUA_VERSION (the installed one unless `installed` is given)."""
    installed = installed if installed is not None else metadata.version("asyncua")
    if installed != ASYNCUA_VERSION:
        raise AsyncuaVersionError(
            f"asyncua {installed} is installed, but gateway/asyncua_hooks.py patches asyncua {ASYNCUA_VERSION} "
            f"internals: install asyncua=={ASYNCUA_VERSION} (pyproject.toml), or review the patches for {installed}")


def install() -> None:
    """Check the asyncua version, then put every patch in place (once per process)."""
    check_version()
    _install_session_context()
    _install_cheap_datachange()
    _install_connection_checks()
    _install_event_filter()
    _install_unknown_call_target()
    install_protocol_checks()
    install_decoder_bounds()
    install_fast_encoding()


def installed() -> dict[str, bool]:
    """Which patches are in place (for tests and diagnostics)."""
    return {
        "InternalSession.call": getattr(InternalSession.call, _MARK, False),
        "MonitoredItemValues.set_current_datavalue": getattr(MonitoredItemValues.set_current_datavalue, _MARK, False),
        "UaProcessor.process": getattr(UaProcessor.process, _MARK, False),
        "UaProcessor._process_message": getattr(UaProcessor._process_message, _MARK, False),
        "WhereClauseEvaluator": monitored_item_service.WhereClauseEvaluator is SpecWhereClauseEvaluator,
        "MethodService._call": getattr(MethodService._call, _MARK, False),
        "OPCUAProtocol.data_received": getattr(OPCUAProtocol.data_received, "_cmcs_limits", False),
        "ua_binary array decoders": getattr(ua_binary._create_uatype_array_deserializer, "_cmcs_bounded", False),
        "ua_binary.struct_to_binary": getattr(ua_binary.struct_to_binary, "_cmcs_fast", False),
    }


# ---- 1. the calling session ------------------------------------------------------------------------
def _install_session_context() -> None:
    """asyncua's method callbacks (`Server.link_method`, `NodeData.call`) get the object and the
    arguments, not the session: nothing says who calls. InternalSession.call is awaited in the
    task that serves the client's Call request, and so is the callback; recording the session in
    a context variable around it lets gateway.session.caller() answer (user, role)."""
    if getattr(InternalSession.call, _MARK, False):
        return
    original = InternalSession.call

    async def call(self, params):
        token = CURRENT_SESSION.set(self)
        try:
            return await original(self, params)
        finally:
            CURRENT_SESSION.reset(token)

    setattr(call, _MARK, True)
    InternalSession.call = call  # type: ignore[method-assign]


# ---- 2. no deep copy per monitored value -------------------------------------------------------------
def _install_cheap_datachange() -> None:
    """asyncua deep-copies every DataValue on its way to a monitored item, "to prevent referencing
    the inner value". Values written by this gateway are never mutated after they are stored
    (each update is a new DataValue), so the copy only costs: at 1,000 units it was three
    quarters of the time spent notifying a client subscribed to every variable (0.9-1.4 s of CPU
    per full update, 0.22 s without it)."""
    if getattr(MonitoredItemValues.set_current_datavalue, _MARK, False):
        return

    def set_current_datavalue(self, cur_val):
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = cur_val

    setattr(set_current_datavalue, _MARK, True)
    MonitoredItemValues.set_current_datavalue = set_current_datavalue  # type: ignore[method-assign]


# ---- 3. the connection checks -----------------------------------------------------------------------
def _install_connection_checks() -> None:
    """asyncua validates only the certificate a client puts in CreateSession, not the one that
    secured the channel; it opens a None channel for discovery and, with no None endpoint, then
    serves every service on it; it has no hook where a login could be throttled per address, nor
    one that tells the user manager which identity token came. These two wrappers hand each
    message to the server's `cmcs_security` (gateway.security.SecurityState):
    `check_open(processor, header, body)` for an OpenSecureChannel on a channel not yet open
    (refused with an ERR message, then asyncua closes the connection), and
    `process_message(processor, original, ...)` for every request after it, with the processor
    in gateway.session.CURRENT_PROCESSOR (the certificate validator reads the channel from it)."""
    if getattr(UaProcessor.process, _MARK, False):
        return
    original_process = UaProcessor.process
    original_message = UaProcessor._process_message

    async def process(self, header, body):
        sec = getattr(self.iserver, "cmcs_security", None)
        if sec is not None and header.MessageType == ua.MessageType.SecureOpen and not self._connection.is_open():
            refusal = await sec.check_open(self, header, body)
            if refusal is not None:
                status, reason = refusal
                err = ua.ErrorMessage(ua.StatusCode(status), reason)
                self._transport.write(uatcp_to_binary(ua.MessageType.Error, err))
                return False  # asyncua closes the connection
        return await original_process(self, header, body)

    async def _process_message(self, typeid, requesthdr, seqhdr, body):
        sec = getattr(self.iserver, "cmcs_security", None)
        if sec is None:
            return await original_message(self, typeid, requesthdr, seqhdr, body)
        token = CURRENT_PROCESSOR.set(self)
        try:
            return await sec.process_message(self, original_message, typeid, requesthdr, seqhdr, body)
        finally:
            CURRENT_PROCESSOR.reset(token)

    setattr(process, _MARK, True)
    setattr(_process_message, _MARK, True)
    UaProcessor.process = process  # type: ignore[method-assign]
    UaProcessor._process_message = _process_message  # type: ignore[method-assign]


# ---- 4. the event filter, as Part 4 7.7 defines it --------------------------------------------------
_HAS_SUBTYPE = ua.NodeId(ua.ObjectIds.HasSubtype)
_SUBTYPE_CACHE: dict[tuple[ua.NodeId, ua.NodeId], bool] = {}


def is_subtype(aspace: AddressSpace, type_id: Any, of: Any) -> bool:
    """type_id is `of` or one of its subtypes."""
    if not isinstance(type_id, ua.NodeId) or not isinstance(of, ua.NodeId):
        return False
    key = (type_id, of)
    hit = _SUBTYPE_CACHE.get(key)
    if hit is None:
        hit, tid, seen = False, type_id, set()
        while tid is not None and tid not in seen:
            if tid == of:
                hit = True
                break
            seen.add(tid)
            nd = aspace.get(tid)
            if nd is None:
                break
            tid = next((r.NodeId for r in nd.references if not r.IsForward and r.ReferenceTypeId == _HAS_SUBTYPE), None)
        _SUBTYPE_CACHE[key] = hit
    return hit


class SpecWhereClauseEvaluator(monitored_item_service.WhereClauseEvaluator):
    """asyncua's evaluator compares OfType exactly, reads only the first element of a browse path
    and cannot select the ConditionId: a client filtering OfType(ConditionType), or on
    ActiveState/Id, would never get our alarms."""

    def _eval_el(self, index: int, event: Any) -> Any:
        el = self.elements[index]
        if el.FilterOperator == ua.FilterOperator.OfType:
            return is_subtype(self._aspace, getattr(event, "EventType", None), self._eval_op(el.FilterOperands[0], event))
        return super()._eval_el(index, event)

    def _eval_op(self, op: Any, event: Any) -> Any:
        if isinstance(op, ua.SimpleAttributeOperand):
            if op.BrowsePath:
                return getattr(event, "/".join(q.Name for q in op.BrowsePath), None)
            if op.AttributeId == ua.AttributeIds.NodeId:
                return getattr(event, "NodeId", None)  # the ConditionId
        return super()._eval_op(op, event)


def _install_event_filter() -> None:
    """asyncua builds each event MonitoredItem's evaluator from the module attribute
    `monitored_item_service.WhereClauseEvaluator` (no hook to pass another): replacing that
    attribute makes every new event item use SpecWhereClauseEvaluator (see its docstring)."""
    if monitored_item_service.WhereClauseEvaluator is not SpecWhereClauseEvaluator:
        monitored_item_service.WhereClauseEvaluator = SpecWhereClauseEvaluator


# ---- 5. a Call on a node that does not exist ---------------------------------------------------------
def _install_unknown_call_target() -> None:
    """asyncua 2.1.0 `MethodService._call` answers BadNodeIdInvalid when the ObjectId or MethodId is
    not in the address space; the node is unknown, not malformed (Part 4 7.38 BadNodeIdUnknown). It
    matters since a site reload deletes units: a client calling SwitchSource on one is told it is gone."""
    original = MethodService._call
    if getattr(original, _MARK, False):
        return

    async def _call(self, method: ua.CallMethodRequest) -> ua.CallMethodResult:
        if getattr(self, "cmcs_security", None) is not None and (
                method.ObjectId not in self._aspace or method.MethodId not in self._aspace):
            return ua.CallMethodResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown))
        return await original(self, method)

    setattr(_call, _MARK, True)
    MethodService._call = _call
