"""Resource limits of the OPC UA server: what one client may hold, refused with the proper Bad codes.

A client that opens sessions, subscriptions and monitored items without bound, leaves them behind
(CloseSession with DeleteSubscriptions=false, a dropped channel), or sends messages with lying size
fields, must not be able to take the gateway down (issue 19: 300 sessions x 700 orphaned monitored
items took it from 167 MB to 564 MB, still growing). asyncua 2.1.0 already has most of the knobs
(`InternalServer.max_*`, `Server.limits`); this module sets them from the site's size, adds the
ones it lacks, counts every refusal and shows the limits where OPC UA clients look for them:

- `Server/ServerCapabilities` (MaxSessions, MaxSubscriptions, MaxSubscriptionsPerSession,
  MaxMonitoredItems, MaxMonitoredItemsPerSubscription, MaxMonitoredItemsQueueSize,
  OperationLimits/MaxMonitoredItemsPerCall, the continuation points);
- `Server/ServerDiagnostics/ServerDiagnosticsSummary` (current and cumulated sessions and
  subscriptions, rejected sessions and requests) and, next to it, `ResourceRefusals` (site
  namespace): one counter per kind of refusal. These are read on demand (value callbacks).

Orphaned subscriptions: Part 4 5.13.2 lets the server revise RequestedLifetimeCount and
RequestedMaxKeepAliveCount. asyncua expires a subscription after (MaxKeepAliveCount +
LifetimeCount + 1) publishing cycles without a Publish request when it has nothing to send
(LifetimeCount + 1 when it has), then deletes it (`InternalSubscription.publish_results`, checked in
tests/integration/test_limits.py), so both are revised to keep that under ORPHAN_LIFETIME_S. When a
limit is reached, abandoned subscriptions and sessions (no session / no channel left) are reclaimed
first, so a client that leaks them cannot lock the others out.

Everything is installed from `install()`, called once by gateway.server before the server starts.
The limits are read on every request, so `guard.limits` may be changed while the server runs
(tests tighten them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
import math
import struct
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from asyncua import ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import ServiceError
from asyncua.server.binary_server_asyncio import OPCUAProtocol
from asyncua.server.internal_session import InternalSession, SessionState
from asyncua.ua.ua_binary import uatcp_to_binary

if TYPE_CHECKING:
    from asyncua import Server

log = logging.getLogger(__name__)

SC = ua.StatusCodes
# Part 4 5.13.2: a subscription left without Publish requests for this long is deleted (issue 19).
ORPHAN_LIFETIME_S = 60.0
# Part 4 5.13.2.2: "the lifetime count shall be a minimum of three times the keep-alive count".
LIFETIME_PER_KEEPALIVE = 3
# Part 6 7.1.2: the TCP message types; anything else at the start of a message is garbage.
TCP_MESSAGE_TYPES = (b"HEL", b"ACK", b"ERR", b"RHE", b"OPN", b"MSG", b"CLO")
TCP_HEADER_BYTES = 8  # Part 6 7.1.2.2: MessageType(3) ChunkType(1) MessageSize(4)


@dataclass
class ResourceLimits:
    """What the server holds at most. `for_site()` gives the defaults for a site of that size."""

    max_sessions: int = 100
    max_connections: int = 125  # TCP connections (secure channels), pre-activation included
    max_subscriptions: int = 500
    max_subscriptions_per_session: int = 20
    max_monitored_items: int = 35_000
    max_monitored_items_per_subscription: int = 10_000
    max_monitored_items_per_call: int = 10_000  # asyncua advertises 10,000 in OperationLimits
    max_queue_size: int = 100  # notifications queued per monitored item (data changes)
    event_queue_size: int = 1000  # queued per event monitored item: what 0 gets, and the most
    max_unacked_notifications: int = 20  # NotificationMessages kept per subscription for Republish
    max_message_size: int = 16 * 1024 * 1024  # one request, all chunks
    max_chunk_size: int = 65535  # one TCP chunk (asyncua's default receive buffer)
    min_publishing_interval_ms: float = 50.0
    max_publishing_interval_ms: float = 10_000.0
    orphan_lifetime_s: float = ORPHAN_LIFETIME_S
    max_session_timeout_s: float = 120.0  # an idle (or abandoned) session is closed after this
    max_pending_activation_s: float = 15.0  # a connection or session not activated by then is closed

    @classmethod
    def for_site(cls, variable_count: int) -> "ResourceLimits":
        """Defaults for a site of `variable_count` variables: the built-in CMCS, one client subscribed
        to every variable (in one subscription), and 50 clients x 500 variables all fit, with room."""
        per_subscription = variable_count + 10_000  # every variable, plus the Server object's own
        # every item costs CPU on every change of its value: the total is what the site needs, not more
        total = 2 * variable_count + 50 * 500 + 10_000
        return cls(max_monitored_items=total, max_monitored_items_per_subscription=per_subscription)


@dataclass
class Refusals:
    """How many requests each limit refused since start (ResourceRefusals in the address space)."""

    sessions: int = 0  # CreateSession: BadTooManySessions
    subscriptions: int = 0  # CreateSubscription: BadTooManySubscriptions
    monitored_items: int = 0  # per item: BadTooManyMonitoredItems; per call: BadTooManyOperations
    connections: int = 0  # TCP connect: ERR BadMaxConnectionsReached
    messages_too_large: int = 0  # ERR BadTcpMessageTooLarge / BadRequestTooLarge
    malformed_messages: int = 0  # ERR BadTcpMessageTypeInvalid
    foreign_subscriptions: int = 0  # a request on another session's subscription: BadSubscriptionIdInvalid
    transfers_refused: int = 0  # TransferSubscriptions by another user: BadUserAccessDenied
    orphaned_subscriptions_reclaimed: int = 0  # deleted early to make room
    abandoned_sessions_reclaimed: int = 0  # closed early to make room

    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if not f.name.endswith("reclaimed"))


class ResourceGuard:
    """The limits of one asyncua Server and their counters, hung on its InternalServer as `cmcs_limits`."""

    def __init__(self, server: "Server", limits: ResourceLimits) -> None:
        self.server = server
        self.iserver = server.iserver
        self.limits = limits
        self.refusals = Refusals()
        self.cumulated_sessions = 0
        self.cumulated_subscriptions = 0

    # ---- what the server holds now ---------------------------------------------------------------
    def sessions(self) -> list[InternalSession]:
        return [s for s in self.iserver._external_sessions.values() if s.state != SessionState.Closed]

    def subscription_count(self) -> int:
        """Subscriptions of clients (the server's own internal ones, e.g. event history, not counted)."""
        internal = self.iserver.isession.session_id
        return sum(1 for sub in self.iserver.subscription_service.subscriptions.values() if sub.session_id != internal)

    def monitored_item_count(self) -> int:
        """Monitored items of clients' subscriptions."""
        internal = self.iserver.isession.session_id
        return sum(len(sub.monitored_item_srv._monitored_items)
                   for sub in self.iserver.subscription_service.subscriptions.values() if sub.session_id != internal)

    def _live_session_ids(self) -> set:
        return {s.session_id for s in self.sessions()} | {self.iserver.isession.session_id}

    def _sessions_on_a_channel(self) -> set[int]:
        bserver = self.server.bserver
        clients = bserver.clients if bserver is not None else []
        return {id(c.processor.session) for c in clients if c.processor is not None and c.processor.session}

    # ---- CreateSession -----------------------------------------------------------------------------
    def _reclaim_sessions(self, now: float) -> None:
        """Close sessions nobody can use: never activated within max_pending_activation_s (asyncua
        keeps one per repeated CreateSession on a channel), or activated but with no channel left."""
        on_channel = self._sessions_on_a_channel()
        for session in self.sessions():
            created = getattr(session, "cmcs_created_at", now)
            never_activated = session.state == SessionState.Created and now - created > self.limits.max_pending_activation_s
            detached = session.state == SessionState.Activated and id(session) not in on_channel
            if never_activated or (detached and len(self.sessions()) >= self.limits.max_sessions):
                self.iserver.unregister_external_session(session)
                if session.state == SessionState.Activated:
                    self.refusals.abandoned_sessions_reclaimed += 1
                    log.warning("closing abandoned session %s (no channel) to make room", session.name)
                asyncio.get_running_loop().create_task(session.close_session(True))

    def create_session(self, original):
        def create_session(name, user=None, external: bool = False):
            if external:
                now = time.monotonic()
                if len(self.sessions()) >= self.limits.max_sessions:
                    self._reclaim_sessions(now)
                if len(self.sessions()) >= self.limits.max_sessions:
                    self.refusals.sessions += 1
                    log.warning("refused a session from %s: at MaxSessions=%d", name, self.limits.max_sessions)
                    raise ServiceError(SC.BadTooManySessions)
            session = original(name, user, external) if user is not None else original(name, external=external)
            if external:
                session.cmcs_created_at = time.monotonic()
                self.cumulated_sessions += 1
                self.guard_ownership(session)
            return session

        return create_session

    # ---- subscription ownership ------------------------------------------------------------------
    def guard_ownership(self, session: InternalSession) -> None:
        """Part 4 5.13: a Subscription belongs to the Session that created it. asyncua's subscription
        service keys subscriptions by id alone, so any session could delete, modify, acknowledge,
        republish or take over any other's (the built-in CMCS's included) by guessing a small integer.
        The session's own services are wrapped here (instance attributes: the UaProcessor calls them
        through the session): another session's subscription is answered exactly like one that does
        not exist (BadSubscriptionIdInvalid), and TransferSubscriptions (Part 4 5.13.7) is allowed only
        to a session of the same user (not anonymous), else BadUserAccessDenied."""
        service = self.iserver.subscription_service

        def owns(sub_id) -> bool:
            sub = service.subscriptions.get(int(sub_id))
            return sub is None or sub.session_id == session.session_id  # asyncua answers unknown ids itself

        def foreign(sub_id) -> None:
            if not owns(sub_id):
                self.refusals.foreign_subscriptions += 1
                raise ServiceError(SC.BadSubscriptionIdInvalid)

        def refused_status():
            self.refusals.foreign_subscriptions += 1
            return ua.StatusCode(SC.BadSubscriptionIdInvalid)

        create_subscription = session.create_subscription
        set_publishing_mode, delete_subscriptions = session.set_publishing_mode, session.delete_subscriptions
        publish, transfer_subscriptions = session.publish, session.transfer_subscriptions

        def on_own(original, is_async: bool):
            """A service on one subscription (params.SubscriptionId): refused unless it is this session's."""
            if is_async:
                async def call(params):
                    foreign(params.SubscriptionId)
                    return await original(params)
            else:
                def call(params):
                    foreign(params.SubscriptionId)
                    return original(params)
            return call

        for name, is_async in (("create_monitored_items", True), ("modify_monitored_items", True),
                               ("set_monitoring_mode", True), ("delete_monitored_items", True),
                               ("modify_subscription", False), ("republish", False)):
            setattr(session, name, on_own(getattr(session, name), is_async))

        async def g_create_subscription(params, callback, request_callback=None):
            result = await create_subscription(params, callback, request_callback=request_callback)
            sub = service.subscriptions.get(result.SubscriptionId)
            if sub is not None:
                sub.cmcs_owner = _identity(session.user)
            return result

        async def g_set_publishing_mode(params):
            mask = [owns(i) for i in params.SubscriptionIds]
            if all(mask):
                return await set_publishing_mode(params)
            params.SubscriptionIds = [i for i, ok in zip(params.SubscriptionIds, mask) if ok]
            return _merge(mask, await set_publishing_mode(params) if params.SubscriptionIds else [], refused_status)

        async def g_delete_subscriptions(ids):
            mask = [owns(i) for i in ids]
            if all(mask):
                return await delete_subscriptions(ids)
            mine = [i for i, ok in zip(ids, mask) if ok]
            return _merge(mask, await delete_subscriptions(mine) if mine else [], refused_status)

        def g_publish(acks=None):
            acks = list(acks or [])
            mask = [owns(a.SubscriptionId) for a in acks]
            if all(mask):
                return publish(acks)
            count, results = publish([a for a, ok in zip(acks, mask) if ok])
            return count, _merge(mask, results, refused_status)

        async def g_transfer_subscriptions(params, callback):
            me = _identity(session.user)
            mask = []
            for sub_id in params.SubscriptionIds:
                sub = service.subscriptions.get(int(sub_id))
                mask.append(sub is None or sub.session_id == session.session_id
                            or (me[0] != "anonymous" and getattr(sub, "cmcs_owner", None) == me))
                if not mask[-1]:
                    self.refusals.transfers_refused += 1
                    log.warning("refused TransferSubscriptions of subscription %s to session %s: another user",
                                sub_id, session.name)
            if all(mask):
                return await transfer_subscriptions(params, callback)
            params.SubscriptionIds = [i for i, ok in zip(params.SubscriptionIds, mask) if ok]
            results = await transfer_subscriptions(params, callback) if params.SubscriptionIds else []
            return _merge(mask, results, lambda: ua.TransferResult(StatusCode=ua.StatusCode(SC.BadUserAccessDenied)))

        session.create_subscription = g_create_subscription
        session.set_publishing_mode = g_set_publishing_mode
        session.delete_subscriptions = g_delete_subscriptions
        session.publish = g_publish
        session.transfer_subscriptions = g_transfer_subscriptions

    # ---- CreateSubscription --------------------------------------------------------------------
    def revise_subscription(self, params: ua.CreateSubscriptionParameters) -> None:
        """Part 4 5.13.2: clamp the publishing interval, then the counts so that an orphan lives at
        most orphan_lifetime_s: (keep-alive + lifetime + 1) cycles, lifetime >= 3 x keep-alive."""
        lim = self.limits
        interval = params.RequestedPublishingInterval
        if not interval or not math.isfinite(interval) or interval < lim.min_publishing_interval_ms:
            interval = lim.min_publishing_interval_ms
        interval = min(interval, lim.max_publishing_interval_ms)
        cycles = int(lim.orphan_lifetime_s * 1000.0 / interval) - 1  # keep-alive + lifetime
        keepalive_cap = max(1, cycles // (LIFETIME_PER_KEEPALIVE + 1))
        keepalive = params.RequestedMaxKeepAliveCount or keepalive_cap
        keepalive = max(1, min(keepalive, keepalive_cap))
        lifetime_cap = max(LIFETIME_PER_KEEPALIVE * keepalive, cycles - keepalive)
        lifetime = params.RequestedLifetimeCount or lifetime_cap
        lifetime = min(max(lifetime, LIFETIME_PER_KEEPALIVE * keepalive), lifetime_cap)
        params.RequestedPublishingInterval = interval
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = lifetime

    async def _reclaim_orphan_subscription(self) -> bool:
        """Delete the oldest subscription whose session is gone (it could only be transferred)."""
        service = self.iserver.subscription_service
        live = self._live_session_ids()
        orphan = next((sid for sid, sub in service.subscriptions.items() if sub.session_id not in live), None)
        if orphan is None:
            return False
        log.info("deleting orphaned subscription %d (its session is closed) to make room", orphan)
        await service.delete_subscriptions([orphan])
        self.refusals.orphaned_subscriptions_reclaimed += 1
        return True

    def create_subscription(self, original):
        async def create_subscription(params, callback, session_id, request_callback=None):
            internal = session_id == self.iserver.isession.session_id
            if not internal:
                lim = self.limits
                service = self.iserver.subscription_service
                own = sum(1 for sub in service.subscriptions.values() if sub.session_id == session_id)
                if own >= lim.max_subscriptions_per_session:
                    self.refusals.subscriptions += 1
                    log.warning("refused a subscription: at MaxSubscriptionsPerSession=%d",
                                lim.max_subscriptions_per_session)
                    raise ServiceError(SC.BadTooManySubscriptions)
                if self.subscription_count() >= lim.max_subscriptions and not await self._reclaim_orphan_subscription():
                    self.refusals.subscriptions += 1
                    log.warning("refused a subscription: at MaxSubscriptions=%d", lim.max_subscriptions)
                    raise ServiceError(SC.BadTooManySubscriptions)
                self.revise_subscription(params)
            # asyncua's own total cap stays above ours (internal subscriptions do not count in ours)
            self.iserver.max_subscriptions = self.limits.max_subscriptions + 100
            result = await original(params, callback, session_id, request_callback=request_callback)
            self.cumulated_subscriptions += not internal
            return result

        return create_subscription

    # ---- CreateMonitoredItems / ModifyMonitoredItems ---------------------------------------------------
    def _queue_size(self, requested: int, events: bool = False) -> int:
        # Part 4 7.21: for data changes 0 and 1 both mean a queue of one (asyncua gives 0 its maximum);
        # for events 0 asks for the server's default event queue
        if events:
            return min(int(requested) or self.limits.event_queue_size, self.limits.event_queue_size)
        return max(1, min(int(requested), self.limits.max_queue_size))

    def create_monitored_items(self, original):
        async def create_monitored_items(params: ua.CreateMonitoredItemsParameters):
            lim = self.limits
            items = params.ItemsToCreate
            if len(items) > lim.max_monitored_items_per_call:
                self.refusals.monitored_items += 1
                raise ServiceError(SC.BadTooManyOperations)  # Part 4 7.38: more than the OperationLimits
            sub = self.iserver.subscription_service.subscriptions.get(params.SubscriptionId)
            if sub is None:
                return await original(params)  # asyncua answers BadSubscriptionIdInvalid
            own_room = max(0, lim.max_monitored_items_per_subscription - len(sub.monitored_item_srv._monitored_items))
            wanted = min(len(items), own_room)
            # orphaned subscriptions give way to a live one when the server-wide total is reached
            while lim.max_monitored_items - self.monitored_item_count() < wanted \
                    and await self._reclaim_orphan_subscription():
                pass
            room = max(0, min(wanted, lim.max_monitored_items - self.monitored_item_count()))
            for item in items:
                events = item.ItemToMonitor.AttributeId == ua.AttributeIds.EventNotifier
                item.RequestedParameters.QueueSize = self._queue_size(item.RequestedParameters.QueueSize, events)
            refused = items[room:]
            params.ItemsToCreate = items[:room]
            results = await original(params) if params.ItemsToCreate else []
            if refused:
                self.refusals.monitored_items += len(refused)
                log.warning("refused %d monitored items: at MaxMonitoredItemsPerSubscription=%d / MaxMonitoredItems=%d",
                            len(refused), lim.max_monitored_items_per_subscription, lim.max_monitored_items)
                results += [ua.MonitoredItemCreateResult(StatusCode=ua.StatusCode(SC.BadTooManyMonitoredItems))
                            for _ in refused]
            return results

        return create_monitored_items

    def modify_monitored_items(self, original):
        def modify_monitored_items(params: ua.ModifyMonitoredItemsParameters):
            sub = self.iserver.subscription_service.subscriptions.get(params.SubscriptionId)
            existing = sub.monitored_item_srv._monitored_items if sub is not None else {}
            for item in params.ItemsToModify:  # asyncua takes the requested queue size as it is
                mdata = existing.get(item.MonitoredItemId)
                events = mdata is not None and mdata.read_value_id.AttributeId == ua.AttributeIds.EventNotifier
                item.RequestedParameters.QueueSize = self._queue_size(item.RequestedParameters.QueueSize, events)
            return original(params)

        return modify_monitored_items

    # ---- the TCP layer (see _install_protocol_checks) --------------------------------------------------
    def refuse_tcp(self, protocol: OPCUAProtocol, transport, status: int, reason: str) -> None:
        """Part 6 7.1.5: answer with an ERR message, then close the connection."""
        try:
            transport.write(uatcp_to_binary(ua.MessageType.Error, ua.ErrorMessage(ua.StatusCode(status), reason)))
        finally:
            transport.close()

    # ---- the address space ---------------------------------------------------------------------------
    def capabilities(self) -> dict[int, int]:
        lim = self.limits
        caps = ua.ObjectIds
        return {
            caps.Server_ServerCapabilities_MaxSessions: lim.max_sessions,
            caps.Server_ServerCapabilities_MaxSubscriptions: lim.max_subscriptions,
            caps.Server_ServerCapabilities_MaxSubscriptionsPerSession: lim.max_subscriptions_per_session,
            caps.Server_ServerCapabilities_MaxMonitoredItems: lim.max_monitored_items,
            caps.Server_ServerCapabilities_MaxMonitoredItemsPerSubscription: lim.max_monitored_items_per_subscription,
            caps.Server_ServerCapabilities_MaxMonitoredItemsQueueSize: max(lim.max_queue_size, lim.event_queue_size),
            caps.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall: lim.max_monitored_items_per_call,
            # Part 5 6.3.2: 0 = no limit. asyncua keeps no browse/query continuation points (Browse
            # answers everything at once, BrowseNext is unsupported) and history continuation
            # points are stateless (a DateTime): nothing to exhaust.
            caps.Server_ServerCapabilities_MaxBrowseContinuationPoints: 0,
            caps.Server_ServerCapabilities_MaxQueryContinuationPoints: 0,
            caps.Server_ServerCapabilities_MaxHistoryContinuationPoints: 0,
        }

    async def publish_capabilities(self) -> None:
        """Write the limits to Server/ServerCapabilities (call again after changing `limits`)."""
        for node_id, value in self.capabilities().items():
            vt = ua.VariantType.UInt16 if "ContinuationPoints" in ua.ObjectIdNames.get(node_id, "") else \
                ua.VariantType.UInt32
            await self.server.write_attribute_value(ua.NodeId(node_id), ua.DataValue(ua.Variant(value, vt)))

    def _diagnostics(self) -> dict[int, callable]:
        ids = ua.ObjectIds
        prefix = "Server_ServerDiagnostics_ServerDiagnosticsSummary_"
        return {
            getattr(ids, prefix + "CurrentSessionCount"): lambda: len(self.sessions()),
            getattr(ids, prefix + "CumulatedSessionCount"): lambda: self.cumulated_sessions,
            getattr(ids, prefix + "CurrentSubscriptionCount"): self.subscription_count,
            getattr(ids, prefix + "CumulatedSubscriptionCount"): lambda: self.cumulated_subscriptions,
            getattr(ids, prefix + "RejectedSessionCount"): lambda: self.refusals.sessions,
            getattr(ids, prefix + "RejectedRequestsCount"): lambda: self.refusals.total(),
        }

    async def publish_diagnostics(self, namespace_index: int) -> None:
        """ServerDiagnosticsSummary counters and a ResourceRefusals object (site namespace) next to it,
        computed when read."""
        server = self.server

        def reader(get):
            def read(_nodeid, _attr):
                return ua.DataValue(ua.Variant(int(get()), ua.VariantType.UInt32),
                                    ServerTimestamp=datetime.now(timezone.utc))
            return read

        for node_id, get in self._diagnostics().items():
            server.set_attribute_value_callback(ua.NodeId(node_id), reader(get))
        await server.write_attribute_value(ua.NodeId(ua.ObjectIds.Server_ServerDiagnostics_EnabledFlag),
                                           ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
        parent = server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerDiagnostics))
        obj = await parent.add_object(ua.NodeId("ResourceRefusals", namespace_index),
                                      ua.QualifiedName("ResourceRefusals", namespace_index))
        counters = [(f.name, (lambda name=f.name: getattr(self.refusals, name))) for f in fields(Refusals)]
        counters += [("monitored_items_now", self.monitored_item_count)]
        for name, get in counters:
            browse = "".join(part.capitalize() for part in name.split("_"))
            var = await obj.add_variable(ua.NodeId(f"ResourceRefusals.{browse}", namespace_index),
                                         ua.QualifiedName(browse, namespace_index), ua.Variant(0, ua.VariantType.UInt32))
            server.set_attribute_value_callback(var.nodeid, reader(get))


def _identity(user) -> tuple[str, str]:
    """Who a session acts for, as TransferSubscriptions compares it: (token kind, user name)."""
    return (getattr(user, "token", None) or "anonymous", getattr(user, "name", None) or "anonymous")


def _merge(mask: list[bool], results: list, refused) -> list:
    """One result per requested operation, in order: the served ones (mask True) from `results`,
    the others from `refused()`."""
    done = iter(results)
    return [next(done) if ok else refused() for ok in mask]


def _guard_of(protocol: OPCUAProtocol) -> ResourceGuard | None:
    return getattr(protocol.iserver, "cmcs_limits", None)


def install_protocol_checks() -> None:
    """Patch asyncua 2.1.0's OPCUAProtocol (binary_server_asyncio.py) once per process; a server
    without `cmcs_limits` is served unchanged.

    - connection_made: asyncua refuses a connection past `max_connections` by closing the socket
      without a word; Part 6 7.1.5 wants an ERR message first (BadMaxConnectionsReached), and we count it.
    - data_received: asyncua buffers a chunk until its declared MessageSize has arrived and only
      then compares it with the receive buffer size, so one connection that declares 4 GB can
      make the server buffer 4 GB (and the `+=` on the buffer is quadratic). Here a header whose
      MessageSize is past the negotiated chunk size is answered at once with ERR
      BadTcpMessageTooLarge (Part 6 7.1.2.3), a message type that is none of Part 6's with ERR
      BadTcpMessageTypeInvalid, and the connection is closed.
    There is no hook for either (the protocol factory is bound when the server starts).
    """
    if getattr(OPCUAProtocol.data_received, "_cmcs_limits", False):
        return
    original_made = OPCUAProtocol.connection_made
    original_received = OPCUAProtocol.data_received

    def connection_made(self, transport):
        guard = _guard_of(self)
        if guard is not None and len(self.clients) >= self.iserver.max_connections:
            guard.refusals.connections += 1
            log.warning("refused a connection from %s: at %d connections", transport.get_extra_info("peername"),
                        self.iserver.max_connections)
            self.peer_name = transport.get_extra_info("peername")
            guard.refuse_tcp(self, transport, SC.BadMaxConnectionsReached, "too many connections")
            return
        original_made(self, transport)

    def data_received(self, data: bytes):
        guard = _guard_of(self)
        if guard is None:
            return original_received(self, data)
        if self.transport is None or self.transport.is_closing():
            return None  # refused or closing: drop what still arrives
        original_received(self, data)
        pending = self._buffer
        if len(pending) < TCP_HEADER_BYTES or self.transport.is_closing():
            return None
        message_type = bytes(pending[:3])
        (size,) = struct.unpack_from("<I", pending, 4)
        chunk_limit = min(self.processor._limits.max_recv_buffer or guard.limits.max_chunk_size,
                          guard.limits.max_chunk_size)
        if message_type not in TCP_MESSAGE_TYPES:
            guard.refusals.malformed_messages += 1
            status, reason = SC.BadTcpMessageTypeInvalid, "not an OPC UA TCP message"
        elif size > chunk_limit or len(pending) > chunk_limit:
            guard.refusals.messages_too_large += 1
            status, reason = SC.BadTcpMessageTooLarge, f"chunk of {size} bytes, limit {chunk_limit}"
        else:
            return None
        log.warning("closing the connection from %s: %s", self.peer_name, reason)
        self._buffer = b""
        guard.refuse_tcp(self, self.transport, status, reason)
        return None

    data_received._cmcs_limits = True  # type: ignore[attr-defined]
    OPCUAProtocol.connection_made = connection_made  # type: ignore[method-assign]
    OPCUAProtocol.data_received = data_received  # type: ignore[method-assign]


def install_decoder_bounds() -> None:
    """Patch asyncua 2.1.0's binary decoder (ua/ua_binary.py) once per process: an array whose
    declared length is more than the bytes left in the message is refused before any element is
    decoded, and an array of Null Variants must be empty.

    Why: `_create_uatype_array_deserializer` and `_create_list_deserializer` loop `range(length)`
    over the declared Int32 length. A Null Variant decodes from zero bytes, so one small Write or Call
    with a Variant array of type Null and length 2**31-1 kept the event loop in that loop (and
    growing a list of two billion None) until the process died: found by bench/fuzz_opcua.py in the
    session depth, any logged-in client (an anonymous Viewer too) could do it. Every other element
    takes at least one byte, so `length <= bytes left` bounds the work by the message size (16 MiB).
    Refused with BadDecodingError (a ServiceFault; the channel stays). No hook exists: the decoders
    are module functions, cached (functools.cache); the caches are cleared so that every cached
    deserializer is rebuilt on the bounded ones.
    """
    from asyncua.common.utils import Buffer
    from asyncua.ua import ua_binary

    if getattr(ua_binary._create_uatype_array_deserializer, "_cmcs_bounded", False):
        return
    uatype_arrays = ua_binary._create_uatype_array_deserializer.__wrapped__
    struct_lists = ua_binary._create_list_deserializer.__wrapped__

    def bounded(deserialize, zero_size_elements: bool):
        def checked(data):
            if isinstance(data, Buffer) and len(data) >= 4:
                (length,) = struct.unpack_from("<i", data._data, data._cur_pos)
                if length > len(data) - 4 or (zero_size_elements and length > 0):
                    raise ServiceError(SC.BadDecodingError)
            return deserialize(data)

        return checked

    @functools.cache
    def array_deserializer(vtype):
        return bounded(uatype_arrays(vtype), vtype == ua.VariantType.Null)

    @functools.cache
    def list_deserializer(uatype):
        return bounded(struct_lists(uatype), False)

    array_deserializer._cmcs_bounded = True  # type: ignore[attr-defined]
    ua_binary._create_uatype_array_deserializer = array_deserializer
    ua_binary._create_list_deserializer = list_deserializer
    for value in list(vars(ua_binary).values()):
        if callable(getattr(value, "cache_clear", None)) and value not in (array_deserializer, list_deserializer):
            value.cache_clear()


class _LargeRequestCounter(logging.Filter):
    """asyncua refuses a request past max_message_size / max_chunk_count (BadRequestTooLarge, in
    `SecureConnection._receive`) with an ERR of its own and leaves no trace but its log record
    (uaprocessor.py "Received request that exceed the transport limits"): count those. The record
    does not say which server: with several servers in one process (tests) each counts them all."""

    def __init__(self) -> None:
        super().__init__()
        self.guards: weakref.WeakSet[ResourceGuard] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Received request that exceed the transport limits"):
            for guard in self.guards:
                guard.refusals.messages_too_large += 1
        return True


_LARGE_REQUESTS = _LargeRequestCounter()

# A hostile client must not fill the disk through the log: asyncua logs each malformed message,
# refused request and fault it answers, many with a traceback (the robustness bench's 105k inputs gave
# ~30,000 ERROR records, several MB). Per call site: LOG_BURST records per LOG_WINDOW_S, the rest
# counted and said in the next record let through ("... [1,234 similar records suppressed in 60 s]")
# and in the periodic summary line (gateway/summary.py).
LOG_BURST = 20
LOG_WINDOW_S = 60.0


class LogBudget(logging.Filter):
    """At most `burst` records per `window_s` from each call site (logger, file, line) of the loggers it
    is put on; the records past it are dropped and counted (`suppressed`), and the first one let through
    after the window says how many of its kind were dropped. Records below WARNING are not counted."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._sites: dict[tuple[str, str, int], list] = {}  # call site -> [window start, passed, dropped]
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.pathname, record.lineno)
        now = self.clock()
        site = self._sites.get(key)
        if site is None:
            if len(self._sites) > 10_000:  # call sites are few; bound it anyway
                self._sites.clear()
            site = self._sites[key] = [now, 0, 0]
        elif now - site[0] >= self.window_s:
            if site[2]:  # no "%" added: the message may be a %-template of its args
                record.msg = f"{record.msg} [{site[2]:,} similar records suppressed in the last {now - site[0]:.0f} s]"
            site[0], site[1], site[2] = now, 0, 0
        if site[1] < self.burst:
            site[1] += 1
            return True
        site[2] += 1
        self.suppressed += 1
        return False


LOG_BUDGET = LogBudget()


def _asyncua_loggers() -> tuple[str, ...]:
    """The loggers of the asyncua modules imported so far (each makes its own at import, by __name__)."""
    return ("asyncua", *(name for name in logging.root.manager.loggerDict if name.startswith("asyncua.")))


def bound_logs(budget: LogBudget = LOG_BUDGET, names: tuple[str, ...] | None = None) -> None:
    """Put `budget` on the logger of every asyncua module imported (they log by __name__; a filter acts
    only on its own logger's records; the server's modules are all imported before `install`), after
    any filter already there (the counter of refused large requests must see every record).
    Idempotent. One budget for the process, as the loggers are (several servers in a test share it)."""
    for name in names or _asyncua_loggers():
        logger = logging.getLogger(name)
        if budget not in logger.filters:
            logger.addFilter(budget)


def _count_large_requests(guard: ResourceGuard) -> None:
    logger = logging.getLogger("asyncua.server.uaprocessor")
    if _LARGE_REQUESTS not in logger.filters:
        logger.addFilter(_LARGE_REQUESTS)
    _LARGE_REQUESTS.guards.add(guard)


async def install(server: "Server", variable_count: int, namespace_index: int,
                  limits: ResourceLimits | None = None) -> ResourceGuard:
    """Put the limits on an asyncua Server that is initialised but not started; returns the guard
    (`.limits`, `.refusals`). `variable_count`: the site's variables (the defaults scale with it);
    `namespace_index`: where the ResourceRefusals counters go."""
    limits = limits or ResourceLimits.for_site(variable_count)
    guard = ResourceGuard(server, limits)
    iserver = server.iserver
    iserver.cmcs_limits = guard  # type: ignore[attr-defined]
    install_protocol_checks()  # idempotent; gateway.asyncua_hooks.install() has put them in place already
    install_decoder_bounds()
    _count_large_requests(guard)
    bound_logs()  # after the counter
    # asyncua's own knobs (internal_server.py)
    iserver.max_connections = limits.max_connections
    iserver.max_session_timeout_ms = limits.max_session_timeout_s * 1000.0
    iserver.max_pending_activation_seconds = limits.max_pending_activation_s
    iserver.max_monitored_item_queue_size = limits.max_queue_size
    iserver.max_unacked_messages_per_subscription = limits.max_unacked_notifications
    iserver.max_subscriptions = limits.max_subscriptions + 100
    InternalSession.max_connections = limits.max_sessions  # activated sessions, class-wide in asyncua
    server.limits = TransportLimits(max_recv_buffer=limits.max_chunk_size, max_send_buffer=limits.max_chunk_size,
                                    max_chunk_count=math.ceil(limits.max_message_size / limits.max_chunk_size),
                                    max_message_size=limits.max_message_size)
    # instance hooks (the services are called through these attributes)
    iserver.create_session = guard.create_session(iserver.create_session)
    service = iserver.subscription_service
    service.create_subscription = guard.create_subscription(service.create_subscription)
    service.create_monitored_items = guard.create_monitored_items(service.create_monitored_items)
    service.modify_monitored_items = guard.modify_monitored_items(service.modify_monitored_items)
    await guard.publish_capabilities()
    await guard.publish_diagnostics(namespace_index)
    log.info("OPC UA limits: %s", ", ".join(f"{f.name}={getattr(limits, f.name)}" for f in fields(limits)))
    return guard
