"""Resource limits and hostile input (gateway/limits.py, bench/fuzz_opcua.py), with real asyncua clients on
loopback against a real gateway on the demo site with its simulators.

What a site relies on: a client cannot hold more sessions, subscriptions or monitored items than the
server advertises (refused with the Bad codes of Part 4, counted); subscriptions left behind by a
closed session go away within their revised lifetime and the memory comes back; a message with a
lying size is refused at once and the server keeps serving; a short run of our fuzzer at its three
depths (raw bytes and lying sizes, mutated OpenSecureChannel, malformed bodies inside a
Basic256Sha256 SignAndEncrypt session) leaves it serving (`cmcs bench robustness`: >= 100k inputs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import socket
import struct
import time

import psutil
import pytest
import pytest_asyncio
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary, struct_to_binary

from bench.fuzz_modbus import HostileDevice
from bench.fuzz_opcua import fuzz_channel, fuzz_raw, fuzz_session
from bench.robustness import hostile_site
from gateway.app import Gateway
from gateway.limits import LOG_BUDGET, LOG_BURST
from gateway.security import ensure_cmcs_client
from gateway.users import set_user
from simulator.endpoints import SimulatorHost
from siteconfig.demo import demo_site
from siteconfig.points import POINTS

from .conftest import free_port, relocate_site

USER, PASSWORD = "scada", "scada-password"
SC = ua.StatusCodes


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory):
    """One gateway for the module (start and stop cost ~4 s): the demo site and its simulators."""
    data = tmp_path_factory.mktemp("limits")
    site = relocate_site(demo_site())
    opcua = dataclasses.replace(site.gateway.opcua, host="127.0.0.1", port=free_port(), allow_security_none=True)
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, opcua=opcua, stale_time_s=2.0))
    # aisle 1's endpoint is reached through a hostile device (bench/fuzz_modbus.py), faithful until told not to be
    gateway_site, upstream = hostile_site(site, free_port())
    set_user(data, USER, "Operator", password=PASSWORD)
    identity = ensure_cmcs_client(data)  # a trusted client certificate (role Engineer), for the fuzzer
    host = SimulatorHost(site)
    await host.start()
    device = HostileDevice(gateway_site.aisles[0].pdbs[0].device.port, upstream, seed=7, burst=100)
    await device.start()
    gw = Gateway(gateway_site, data)
    await gw.start()
    gw.fuzz_identity = identity
    gw.hostile_device = device
    yield gw
    await gw.stop()
    await device.stop()
    await host.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(running):
    """The module's gateway; each test may tighten its limits, they are put back after it."""
    guard = running.server.limits
    saved, connections = dataclasses.replace(guard.limits), running.server.server.iserver.max_connections
    yield running
    guard.limits = saved
    running.server.server.iserver.max_connections = connections
    await guard.publish_capabilities()


def _url(gw: Gateway) -> str:
    return f"opc.tcp://127.0.0.1:{gw.server.port}/cmcs"


async def _connect(gw: Gateway, anonymous: bool = False) -> Client:
    client = Client(_url(gw), timeout=10)
    if not anonymous:  # (an anonymous Viewer may subscribe; it skips the password hash, ~0.1 s a login)
        client.set_user(USER)
        client.set_password(PASSWORD)
    await client.connect()
    return client


def _variables(gw: Gateway, client_ns: int) -> list[ua.NodeId]:
    site = gw.site
    return [ua.NodeId(f"{name}.{p.name}", client_ns) for name, kind, _ in site.devices() for p in POINTS[kind]]


async def _abandon(client: Client) -> None:
    """Close the session keeping its subscriptions (DeleteSubscriptions=false), then the channel."""
    close = client.uaclient.close_session
    client.uaclient.close_session = lambda delete_subscriptions: close(False)
    await client.disconnect()


async def _read_server(client: Client, object_id: int):
    return await client.get_node(ua.NodeId(object_id)).read_value()


def _tcp_exchange(port: int, payload: bytes) -> bytes:
    """Send `payload` (if any), then read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = b""
        try:
            if payload:
                s.sendall(payload)
            while part := s.recv(4096):
                data += part
        except ConnectionResetError:  # the server closed with our bytes unread: what it sent is in `data`
            pass
        return data


def _hello(max_message_size: int = 0) -> bytes:
    url = b"opc.tcp://127.0.0.1/cmcs"
    body = struct.pack("<IIIII", 0, 65535, 65535, max_message_size, 0) + struct.pack("<i", len(url)) + url
    return b"HELF" + struct.pack("<I", 8 + len(body)) + body


def _error_code(reply: bytes) -> int | None:
    """The StatusCode of the first ERR message in `reply` (Part 6 7.1.2.5), None if there is none."""
    at = reply.find(b"ERRF")
    return struct.unpack_from("<I", reply, at + 8)[0] if at >= 0 else None


async def test_sessions_subscriptions_and_items_past_the_limits_are_refused_and_counted(gateway):
    guard = gateway.server.limits
    lim = guard.limits
    lim.max_sessions, lim.max_subscriptions_per_session, lim.max_subscriptions = 3, 2, 4
    lim.max_monitored_items_per_subscription, lim.max_monitored_items = 50, 80
    await guard.publish_capabilities()
    clients = [await _connect(gateway) for _ in range(3)]
    try:
        # what a client reads: the limits as ServerCapabilities
        c = clients[0]
        assert await _read_server(c, ua.ObjectIds.Server_ServerCapabilities_MaxSessions) == 3
        assert await _read_server(c, ua.ObjectIds.Server_ServerCapabilities_MaxSubscriptionsPerSession) == 2
        assert await _read_server(c, ua.ObjectIds.Server_ServerCapabilities_MaxMonitoredItemsPerSubscription) == 50
        assert await _read_server(c, ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall) \
            == lim.max_monitored_items_per_call

        # a fourth session: BadTooManySessions, and counted
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await _connect(gateway)
        assert refused.value.code == SC.BadTooManySessions
        assert guard.refusals.sessions == 1
        assert await _read_server(c, ua.ObjectIds.Server_ServerDiagnostics_ServerDiagnosticsSummary_RejectedSessionCount) == 1
        assert await _read_server(c, ua.ObjectIds.Server_ServerDiagnostics_ServerDiagnosticsSummary_CurrentSessionCount) == 3

        # subscriptions: 2 per session
        ns = await c.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
        nodes = [c.get_node(n) for n in _variables(gateway, ns)]
        subs = [await c.create_subscription(200, None) for _ in range(2)]
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await c.create_subscription(200, None)
        assert refused.value.code == SC.BadTooManySubscriptions

        # monitored items: 50 per subscription, the rest of the call refused item by item
        results = await subs[0].subscribe_data_change(nodes[:60])
        assert sum(isinstance(r, int) for r in results) == 50
        assert [r for r in results if not isinstance(r, int)] == [ua.StatusCode(SC.BadTooManyMonitoredItems)] * 10
        # 80 in all: the second subscription gets 30
        results = await subs[1].subscribe_data_change(nodes[60:110])
        assert sum(isinstance(r, int) for r in results) == 30
        assert guard.monitored_item_count() == 80
        assert guard.refusals.monitored_items == 30

        # 4 subscriptions in all: the second session gets 2, the third none
        for _ in range(2):
            await clients[1].create_subscription(200, None)
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await clients[2].create_subscription(200, None)
        assert refused.value.code == SC.BadTooManySubscriptions
        assert guard.refusals.subscriptions == 2

        # the requested lifetime is revised: an orphan cannot outlive orphan_lifetime_s
        assert subs[0].parameters.RequestedLifetimeCount == 10000  # what the client asked for
        server_sub = gateway.server.server.iserver.subscription_service.subscriptions[subs[0].subscription_id]
        revised = server_sub.data
        assert (revised.RevisedLifetimeCount + revised.RevisedMaxKeepAliveCount + 1) \
            * revised.RevisedPublishingInterval <= lim.orphan_lifetime_s * 1000
        assert revised.RevisedLifetimeCount >= 3 * revised.RevisedMaxKeepAliveCount

        # the counters are in the address space, next to ServerDiagnosticsSummary
        diag = c.get_node(ua.NodeId(ua.ObjectIds.Server_ServerDiagnostics))
        site_ns = ns
        refusals = await diag.get_child(f"{site_ns}:ResourceRefusals")
        assert await (await refusals.get_child(f"{site_ns}:Sessions")).read_value() == 1
        assert await (await refusals.get_child(f"{site_ns}:MonitoredItems")).read_value() == 30
    finally:
        for client in clients:
            await client.disconnect()


async def test_connections_past_the_limit_get_an_error_message(gateway):
    guard = gateway.server.limits
    gateway.server.server.iserver.max_connections = 2
    held = [socket.create_connection(("127.0.0.1", gateway.server.port)) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)
        reply = await asyncio.to_thread(_tcp_exchange, gateway.server.port, b"")  # the ERR comes unasked
        assert _error_code(reply) == SC.BadMaxConnectionsReached
        assert guard.refusals.connections == 1
    finally:
        for s in held:
            s.close()


async def test_a_lying_or_oversize_message_is_refused_and_the_server_keeps_serving(gateway):
    guard = gateway.server.limits
    port = gateway.server.port
    # a chunk header that declares 1 GB: refused at once (the server does not wait for, nor buffer, 1 GB)
    t0 = time.monotonic()
    reply = await asyncio.to_thread(_tcp_exchange, port, _hello() + b"MSGF" + struct.pack("<I", 1 << 30) + b"\0" * 64)
    assert _error_code(reply) == SC.BadTcpMessageTooLarge
    assert time.monotonic() - t0 < 2.0
    # garbage instead of a message
    reply = await asyncio.to_thread(_tcp_exchange, port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _error_code(reply) == SC.BadTcpMessageTypeInvalid
    assert guard.refusals.messages_too_large >= 1 and guard.refusals.malformed_messages == 1
    # a real request, in chunks, past max_message_size: asyncua's BadRequestTooLarge
    guard_limits = gateway.server.server.limits
    assert guard_limits.max_message_size == guard.limits.max_message_size
    client = await _connect(gateway)
    try:
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
        huge = "x" * (guard.limits.max_message_size + 1024)
        with pytest.raises(Exception):  # noqa: B017 - the server closes the channel with an ERR
            await client.get_node(ua.NodeId("SourceA.Available", ns)).write_value(ua.Variant(huge, ua.VariantType.String))
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - the channel is gone already
            pass
    # and it keeps serving
    client = await _connect(gateway)
    try:
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
        assert await client.get_node(ua.NodeId("SourceA.Available", ns)).read_value() in (True, False, None)
    finally:
        await client.disconnect()


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


async def test_subscriptions_of_closed_sessions_are_freed_within_their_lifetime(gateway):
    guard = gateway.server.limits
    guard.limits.orphan_lifetime_s = 2.0  # the test's bound (default 60 s): the same revision, shorter
    probe = await _connect(gateway)
    ns = await probe.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
    variables = _variables(gateway, ns)

    async def orphan() -> None:
        client = await _connect(gateway, anonymous=True)
        sub = await client.create_subscription(100, None)
        await sub.subscribe_data_change([client.get_node(n) for n in variables[:300]], queuesize=0)
        await _abandon(client)

    async def round_of(sessions: int) -> tuple[float, float]:
        """`sessions` sessions leave 300 monitored items each behind; (peak RSS MB, seconds to free them)."""
        for _ in range(0, sessions, 10):
            await asyncio.gather(*(orphan() for _ in range(10)))
        closed_at = time.monotonic()
        assert guard.subscription_count() > 0  # left behind
        peak_mb = _rss_mb()
        while guard.subscription_count() and time.monotonic() - closed_at < 10:
            await asyncio.sleep(0.1)
        freed_s = time.monotonic() - closed_at
        assert guard.subscription_count() == 0, f"{guard.subscription_count()} orphans left after {freed_s:.0f} s"
        assert guard.monitored_item_count() == 0
        return peak_mb, freed_s

    # a first round brings the process to its working size (allocator arenas, caches)
    await round_of(20)
    gc.collect()
    baseline_mb = _rss_mb()
    peak_mb, freed_s = await round_of(20)
    assert freed_s <= guard.limits.orphan_lifetime_s + 1.5
    assert await _read_server(probe, ua.ObjectIds.Server_ServerDiagnostics_ServerDiagnosticsSummary_CurrentSubscriptionCount) == 0
    gc.collect()
    after_mb = _rss_mb()
    # the memory the orphans held is given back: a second round does not grow the process
    assert after_mb - baseline_mb < 5.0, (baseline_mb, peak_mb, after_mb)
    await probe.disconnect()


async def test_a_session_cannot_touch_another_sessions_subscription(gateway):
    """Part 4 5.13: a subscription belongs to its session. Another session (here an anonymous one,
    and a second session of the same user) gets BadSubscriptionIdInvalid for every service on it,
    as for an id that does not exist; TransferSubscriptions works for the same user only. The owner's
    subscription keeps delivering throughout."""
    guard = gateway.server.limits
    owner = await _connect(gateway)
    intruder = await _connect(gateway, anonymous=True)
    same_user = await _connect(gateway)
    try:
        ns = await owner.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
        node = owner.get_node(_variables(gateway, ns)[0])
        received: list = []

        class Handler:
            def datachange_notification(self, _node, value, _data):
                received.append(value)

        sub = await owner.create_subscription(100, Handler())
        [handle] = await sub.subscribe_data_change([node], queuesize=1)
        sid = sub.subscription_id
        server_sub = gateway.server.server.iserver.subscription_service.subscriptions[sid]
        before = guard.refusals.foreign_subscriptions
        s = intruder.uaclient.session
        invalid = ua.StatusCode(SC.BadSubscriptionIdInvalid)

        assert await s.delete_subscriptions([sid]) == [invalid]
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await s.create_monitored_items(ua.CreateMonitoredItemsParameters(
                SubscriptionId=sid, ItemsToCreate=[ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=ua.MonitoringParameters(ClientHandle=99, SamplingInterval=0, QueueSize=1))]))
        assert refused.value.code == SC.BadSubscriptionIdInvalid
        for call in (
            lambda: s.delete_monitored_items(ua.DeleteMonitoredItemsParameters(SubscriptionId=sid, MonitoredItemIds=[handle])),
            lambda: s.modify_monitored_items(ua.ModifyMonitoredItemsParameters(SubscriptionId=sid)),
            lambda: s.set_monitoring_mode(ua.SetMonitoringModeParameters(
                SubscriptionId=sid, MonitoringMode=ua.MonitoringMode.Disabled, MonitoredItemIds=[handle])),
            lambda: s.update_subscription(ua.ModifySubscriptionParameters(SubscriptionId=sid, RequestedPublishingInterval=60000)),
            lambda: s.republish(sid, 1),
        ):
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await call()
            assert refused.value.code == SC.BadSubscriptionIdInvalid
        assert await s.set_publishing_mode(ua.SetPublishingModeParameters(PublishingEnabled=False, SubscriptionIds=[sid])) \
            == [invalid]
        # another user may not take it over; the same user may (a client reconnecting, Part 4 5.13.7)
        [result] = await s.transfer_subscriptions(ua.TransferSubscriptionsParameters(SubscriptionIds=[sid]))
        assert result.StatusCode == ua.StatusCode(SC.BadUserAccessDenied)
        assert guard.refusals.transfers_refused == 1
        assert guard.refusals.foreign_subscriptions - before == 8

        # nothing changed: the owner's subscription is whole and still publishing
        assert server_sub.session_id == _server_session_id(gateway, owner)
        assert gateway.server.server.iserver.subscription_service.subscriptions[sid] is server_sub
        assert list(server_sub.monitored_item_srv._monitored_items) == [handle]
        assert server_sub.data.RevisedPublishingInterval < 60000
        assert server_sub._publishing_enabled
        received.clear()
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert received, "the owner's subscription stopped delivering"

        [moved] = await same_user.uaclient.session.transfer_subscriptions(
            ua.TransferSubscriptionsParameters(SubscriptionIds=[sid]))
        assert moved.StatusCode.is_good()
        assert server_sub.session_id == _server_session_id(gateway, same_user)
    finally:
        for c in (intruder, same_user, owner):
            await c.disconnect()


def _server_session_id(gw: Gateway, client: Client) -> ua.NodeId:
    """The server-side SessionId of a client's session (found by its authentication token)."""
    return gw.server.server.iserver._external_sessions[client.uaclient.session.authentication_token].session_id


class Probe:
    """A normal client's read; a failure to answer it is a liveness failure."""

    def __init__(self, url):
        self.url, self.client, self.failures, self.reads = url, None, 0, 0

    async def __call__(self) -> bool:
        self.reads += 1
        try:
            if self.client is None:
                self.client = Client(self.url, timeout=5)
                await self.client.connect()
            await self.client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State)).read_value()
            return True
        except Exception:  # noqa: BLE001 - any failure to answer a normal read is a liveness failure
            self.failures += 1
            self.client = None
            return False


async def test_fuzz_raw_bytes_and_lying_sizes(gateway):
    probe = Probe(_url(gateway))
    # what reaches a log handler: asyncua's records pass gateway.limits.LOG_BUDGET first
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("asyncua").addHandler(handler)
    suppressed = LOG_BUDGET.suppressed
    try:
        sent = await fuzz_raw("127.0.0.1", gateway.server.port, _url(gateway), 800, seed=1, probe=probe,
                              probe_every=250)
    finally:
        logging.getLogger("asyncua").removeHandler(handler)
    assert sent == 800
    assert await probe() and probe.failures == 0
    await probe.client.disconnect()
    # each malformed input is logged by asyncua (most with a traceback); per call site only LOG_BURST a minute
    dropped = LOG_BUDGET.suppressed - suppressed
    sites = {(r.name, r.pathname, r.lineno) for r in seen}
    print(f"{len(seen)} records from {len(sites)} call sites let through, {dropped} suppressed")
    assert dropped > len(seen), (len(seen), dropped)
    assert len(seen) <= len(sites) * LOG_BURST
    # and the periodic summary says it, even if no record of that kind follows
    assert f"asyncua log records suppressed {LOG_BUDGET.suppressed:,}" in gateway.summary.line()


async def test_fuzz_mutated_open_secure_channel(gateway):
    probe = Probe(_url(gateway))
    sent = await fuzz_channel("127.0.0.1", gateway.server.port, _url(gateway), 1500, seed=2, probe=probe,
                              probe_every=250)
    assert sent >= 1500
    assert await probe() and probe.failures == 0
    await probe.client.disconnect()


async def test_fuzz_malformed_bodies_in_an_encrypted_session(gateway):
    cert, key, uri = gateway.fuzz_identity
    probe = Probe(_url(gateway))

    async def secure_client() -> Client:
        client = Client(_url(gateway), timeout=10)
        client.application_uri = uri
        await client.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.load_client_certificate(str(cert))
        await client.load_private_key(key)
        await client.connect()
        return client

    first = await secure_client()
    ns = await first.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
    await first.disconnect()
    t0 = time.monotonic()
    result = await fuzz_session(secure_client, ns, 1000, seed=3, probe=probe, probe_every=250)
    assert result["inputs"] == 1000
    assert result["answered"] > 0.5 * result["inputs"], result
    assert await probe() and probe.failures == 0, result
    assert time.monotonic() - t0 < 30
    await probe.client.disconnect()


async def test_a_variant_array_of_null_with_a_huge_length_is_refused_at_once(gateway):
    """Found by the fuzzer: asyncua decodes a Null Variant from zero bytes, so a Write carrying a Null
    array of length 2**31-1 kept the server's event loop busy until the process died."""
    client = await _connect(gateway)
    try:
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{gateway.site.name}")
        proto = client.uaclient.protocol
        request = ua.WriteRequest()
        request.Parameters.NodesToWrite = [ua.WriteValue(NodeId=ua.NodeId("SourceA.Available", ns),
                                                         AttributeId=ua.AttributeIds.Value,
                                                         Value=ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))]
        proto._setup_request_header(request.RequestHeader, 10)
        body = bytearray(struct_to_binary(request))
        # the DataValue at the end: mask 0x03 (value, status), Variant Boolean (0x01) True (0x01), status Good
        at = body.rindex(bytes([0x03, 0x01, 0x01, 0, 0, 0, 0])) + 1
        body[at:at + 2] = bytes([0x80]) + struct.pack("<i", 2**31 - 1)  # a Variant array of Null, 2**31-1 long
        request_id = proto._request_id = proto._request_id + 1
        future = asyncio.get_running_loop().create_future()
        proto._callbackmap[request_id] = future
        t0 = time.monotonic()
        proto.transport.write(proto._connection.message_to_binary(bytes(body), message_type=ua.MessageType.SecureMessage,
                                                                  request_id=request_id))
        answer = await asyncio.wait_for(future, 5)
        assert time.monotonic() - t0 < 1.0
        typeid = answer.copy()
        assert nodeid_from_binary(typeid) == ua.FourByteNodeId(ua.ObjectIds.ServiceFault_Encoding_DefaultBinary)
        assert struct_from_binary(ua.ResponseHeader, typeid).ServiceResult.value == SC.BadDecodingError
        # the session is still there and served
        assert await client.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_State)).read_value() == 0
    finally:
        await client.disconnect()


async def test_a_hostile_modbus_device_marks_its_aisle_bad_and_the_gateway_recovers(gateway):
    """A hostile device (bench/fuzz_modbus.py) in place of aisle 1's endpoint: garbage, lying lengths,
    wrong ids, exceptions, fragments, stalls. The gateway keeps serving, aisle 1 goes Bad while the
    other aisles stay Good, and aisle 1 is Good again soon after the device behaves."""
    device, site = gateway.hostile_device, gateway.site
    client = await _connect(gateway)
    try:
        ns = await client.get_namespace_index(f"urn:cmcs-gateway:site:{site.name}")
        watched = client.get_node(ua.NodeId(f"{site.aisles[0].pdbs[0].name}.Current", ns))
        other = client.get_node(ua.NodeId(f"{site.aisles[1].pdbs[0].name}.Current", ns))

        async def status(node) -> ua.StatusCode:
            return (await node.read_data_value(raise_on_bad_status=False)).StatusCode

        async def until(node, good: bool, timeout_s: float) -> float:
            t0 = time.monotonic()
            while (await status(node)).is_good() != good:
                assert time.monotonic() - t0 < timeout_s, f"{node} not {'Good' if good else 'Bad'} in {timeout_s} s"
                await asyncio.sleep(0.1)
            return time.monotonic() - t0

        await until(watched, True, 15)
        frames0 = device.frames
        device.hostile = True
        await until(watched, False, 10)
        await asyncio.sleep(2.5)  # past the stale time: Bad, not Uncertain
        assert (await status(watched)).is_bad()
        assert (await status(other)).is_good()
        assert device.frames - frames0 > 50
        device.hostile = False
        await until(watched, True, 15)
        assert (await status(other)).is_good()
    finally:
        device.hostile = False
        await client.disconnect()
