"""Our own fuzzer for the OPC UA binary protocol (Part 6), at three depths, against a running server.

- raw: one TCP connection per input: random bytes, mutated Hello messages, and a valid Hello followed
  by chunk headers whose MessageSize lies (0, 7, huge, past the chunk limit) with partial bodies;
- channel: after a valid Hello, mutated OpenSecureChannel requests (SecurityPolicy None, so the
  server decodes them to the end), many per connection until the server closes it;
- session: malformed service bodies inside a real Basic256Sha256 SignAndEncrypt session: valid
  requests of most services, encoded by asyncua, with their parameters (now and then their header)
  mutated, then signed and encrypted over the client's own secure channel and sent as they are.

Each generator is deterministic for a seed; `Mutator` is the shared byte-level mutation engine.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable

from asyncua import Client, ua
from asyncua.common.connection import SecureConnection, TransportLimits
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.ua.ua_binary import nodeid_to_binary, struct_to_binary, uatcp_to_binary

# values that make decoders take the wrong branch (lengths, counts, sizes)
INTERESTING_U32 = (0, 1, 7, 8, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
CHUNK_TYPES = (b"MSGF", b"MSGC", b"MSGA", b"OPNF", b"CLOF", b"HELF", b"ACKF", b"ERRF", b"XXXF", b"MSGX")


class Mutator:
    """Byte-level mutations (bit flips, interesting integers, cuts, splices, garbage)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def garbage(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def mutate(self, data: bytes, start: int = 0) -> bytes:
        """`data` with 1-4 mutations at or after offset `start`."""
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if len(buf) <= start:
                buf += self.garbage(rng.randint(1, 16))
                continue
            at = rng.randrange(start, len(buf))
            op = rng.randrange(7)
            if op == 0:  # flip bits
                buf[at] ^= 1 << rng.randrange(8)
            elif op == 1:  # random bytes
                n = rng.randint(1, 8)
                buf[at:at + n] = self.garbage(n)
            elif op == 2 and at + 4 <= len(buf):  # an interesting 32-bit value (a length, a count)
                buf[at:at + 4] = struct.pack("<I", rng.choice(INTERESTING_U32))
            elif op == 3:  # cut the tail
                del buf[at:]
            elif op == 4:  # delete a range
                del buf[at:at + rng.randint(1, 32)]
            elif op == 5:  # duplicate a range
                piece = buf[at:at + rng.randint(1, 64)]
                buf[at:at] = piece * rng.randint(1, 4)
            else:  # append garbage
                buf += self.garbage(rng.randint(1, 64))
        return bytes(buf)


def hello(url: str) -> bytes:
    return uatcp_to_binary(ua.MessageType.Hello, ua.Hello(EndpointUrl=url))


def open_secure_channel_none() -> bytes:
    """A valid OPN (SecurityPolicy None, SecurityMode None) as a client sends it."""
    conn = SecureConnection(SecurityPolicyNone(), TransportLimits())
    request = ua.OpenSecureChannelRequest()
    request.Parameters.ClientProtocolVersion = 0
    request.Parameters.RequestType = ua.SecurityTokenRequestType.Issue
    request.Parameters.SecurityMode = ua.MessageSecurityMode.None_
    request.Parameters.ClientNonce = b""
    request.Parameters.RequestedLifetime = 3_600_000
    return conn.message_to_binary(struct_to_binary(request), message_type=ua.MessageType.SecureOpen, request_id=1)


# ---- depth 1: raw bytes and lying sizes ----------------------------------------------------------
def raw_input(m: Mutator, url: str, chunk_limit: int = 65535) -> bytes:
    rng = m.rng
    kind = rng.randrange(4)
    if kind == 0:
        return m.garbage(rng.randint(1, 2048))
    if kind == 1:
        return m.mutate(hello(url))
    size = rng.choice(INTERESTING_U32 + (chunk_limit, chunk_limit + 1, 12, 13))
    header = rng.choice(CHUNK_TYPES) + struct.pack("<I", size)
    body = m.garbage(rng.randint(0, 256))
    if kind == 2:
        return hello(url) + header + body
    return header + body


async def _one_connection(host: str, port: int, payload: bytes, linger_s: float) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, asyncio.TimeoutError):
        return
    try:
        writer.write(payload)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(65536), linger_s)
        except asyncio.TimeoutError:
            pass
    except (OSError, ConnectionError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ConnectionError):
            pass


async def fuzz_raw(host: str, port: int, url: str, count: int, seed: int, probe: Callable[[], Awaitable[bool]],
                   probe_every: int = 1000, concurrency: int = 32) -> int:
    m = Mutator(seed)
    sent = 0
    while sent < count:
        batch = min(concurrency, count - sent)
        await asyncio.gather(*(_one_connection(host, port, raw_input(m, url), 0.05) for _ in range(batch)))
        before, sent = sent, sent + batch
        if before // probe_every != sent // probe_every:
            await probe()
    return sent


# ---- depth 2: mutated OpenSecureChannel ----------------------------------------------------------
async def fuzz_channel(host: str, port: int, url: str, count: int, seed: int, probe: Callable[[], Awaitable[bool]],
                       probe_every: int = 1000, per_connection: int = 50, concurrency: int = 8) -> int:
    base = open_secure_channel_none()
    sent = 0

    async def one_connection(m: Mutator, n: int) -> int:
        done = 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, asyncio.TimeoutError):
            return 0
        try:
            writer.write(hello(url))
            await asyncio.wait_for(reader.read(65536), 5)  # ACK
            for _ in range(n):
                writer.write(m.mutate(base, start=8 if m.rng.random() < 0.8 else 0))
                done += 1
                await writer.drain()
                if reader.at_eof():
                    break
            try:
                await asyncio.wait_for(reader.read(65536), 0.05)
            except asyncio.TimeoutError:
                pass
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ConnectionError):
                pass
        return max(done, 1)

    mutators = [Mutator(seed * 1000 + i) for i in range(concurrency)]
    while sent < count:
        got = await asyncio.gather(*(one_connection(mutators[i], min(per_connection, count - sent))
                                     for i in range(concurrency)))
        before, sent = sent, sent + sum(got)
        if before // probe_every != sent // probe_every:
            await probe()
    return sent


# ---- depth 3: malformed service bodies in a signed and encrypted session -------------------------
def base_requests(ns: int) -> list:
    """One valid request of most services (not those that end or replace the session)."""
    node = ua.NodeId("SourceA.Available", ns)
    unit = ua.NodeId("MATS-01-01", ns)
    read = ua.ReadRequest()
    read.Parameters.NodesToRead = [ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value)] * 3
    browse = ua.BrowseRequest()
    browse.Parameters.NodesToBrowse = [ua.BrowseDescription(NodeId=ua.NodeId(ua.ObjectIds.ObjectsFolder),
                                                            ResultMask=63)]
    write = ua.WriteRequest()
    write.Parameters.NodesToWrite = [ua.WriteValue(NodeId=node, AttributeId=ua.AttributeIds.Value,
                                                   Value=ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))]
    call = ua.CallRequest()
    call.Parameters.MethodsToCall = [ua.CallMethodRequest(ObjectId=unit, MethodId=ua.NodeId("MATS-01-01.SwitchSource", ns),
                                                          InputArguments=[ua.Variant(2, ua.VariantType.Int32)])]
    translate = ua.TranslateBrowsePathsToNodeIdsRequest()
    translate.Parameters.BrowsePaths = [ua.BrowsePath(StartingNode=ua.NodeId(ua.ObjectIds.ObjectsFolder),
                                                      RelativePath=ua.RelativePath(Elements=[ua.RelativePathElement(
                                                          TargetName=ua.QualifiedName("Server", 0))]))]
    history = ua.HistoryReadRequest()
    history.Parameters.HistoryReadDetails = ua.ReadRawModifiedDetails(NumValuesPerNode=10)
    history.Parameters.NodesToRead = [ua.HistoryReadValueId(NodeId=node)]
    create_sub = ua.CreateSubscriptionRequest()
    create_sub.Parameters = ua.CreateSubscriptionParameters(RequestedPublishingInterval=500, RequestedLifetimeCount=600,
                                                            RequestedMaxKeepAliveCount=20, PublishingEnabled=True)
    items = ua.CreateMonitoredItemsRequest()
    items.Parameters.SubscriptionId = 1
    items.Parameters.ItemsToCreate = [ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=node, AttributeId=ua.AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=ua.MonitoringParameters(ClientHandle=1, SamplingInterval=100, QueueSize=1))]
    modify_items = ua.ModifyMonitoredItemsRequest()
    modify_items.Parameters.ItemsToModify = [ua.MonitoredItemModifyRequest(MonitoredItemId=112)]
    delete_items = ua.DeleteMonitoredItemsRequest()
    delete_items.Parameters.MonitoredItemIds = [112]
    publish = ua.PublishRequest()
    republish = ua.RepublishRequest()
    mode = ua.SetPublishingModeRequest()
    mode.Parameters.SubscriptionIds = [1]
    monitoring = ua.SetMonitoringModeRequest()
    register = ua.RegisterNodesRequest()
    register.Parameters.NodesToRegister = [node]
    browse_next = ua.BrowseNextRequest()
    browse_next.Parameters.ContinuationPoints = [b"\x00" * 8]
    add_nodes = ua.AddNodesRequest()
    add_nodes.Parameters.NodesToAdd = [ua.AddNodesItem(BrowseName=ua.QualifiedName("x", ns))]
    return [read, browse, write, call, translate, history, create_sub, items, modify_items, delete_items, publish,
            republish, mode, monitoring, register, browse_next, add_nodes, ua.GetEndpointsRequest(),
            ua.FindServersRequest(), ua.ModifySubscriptionRequest()]


class SessionFuzzer:
    """Malformed bodies over a connected asyncua client's own secure channel (signed and encrypted)."""

    def __init__(self, client: Client, ns: int, seed: int):
        self.client = client
        self.m = Mutator(seed)
        self.requests = base_requests(ns)
        self.answered = 0
        self.unanswered = 0

    def _encoded(self) -> tuple[bytes, int]:
        """A valid body (typeid, header with our session's token, parameters) and where the header ends."""
        proto = self.client.uaclient.protocol
        request = self.m.rng.choice(self.requests)
        proto._setup_request_header(request.RequestHeader, 10)
        typeid = nodeid_to_binary(request.TypeId)
        header = struct_to_binary(request.RequestHeader)
        body = struct_to_binary(request)
        return body, len(typeid) + len(header)

    async def send(self, count: int, answer_wait_s: float = 10.0, quiet_s: float = 0.3) -> int:
        """Send `count` malformed bodies (in the channel's own chunks), then wait for the answers."""
        proto = self.client.uaclient.protocol
        if proto is None or proto.transport is None:
            raise ConnectionError("the fuzzing session is gone")
        futures = []
        for _ in range(count):
            if proto.transport is None or proto.transport.is_closing():
                raise ConnectionError("the server closed the fuzzing session's channel")
            proto.revolve_security_token()
            body, header_end = self._encoded()
            mutated = self.m.mutate(body, start=header_end if self.m.rng.random() < 0.9 else len(body) // 8)
            request_id = proto._request_id + 1
            data = proto._connection.message_to_binary(mutated, message_type=ua.MessageType.SecureMessage,
                                                       request_id=request_id)
            proto._request_id = request_id
            future = asyncio.get_running_loop().create_future()
            proto._callbackmap[request_id] = future
            futures.append((request_id, future))
            proto.transport.write(data)
        # the server answers in order: once no answer came for `quiet_s`, the rest never will
        pending = {f for _, f in futures}
        deadline = asyncio.get_running_loop().time() + answer_wait_s
        while pending and asyncio.get_running_loop().time() < deadline:
            done, pending = await asyncio.wait(pending, timeout=quiet_s)
            if not done:
                break
        self.answered += count - len(pending)
        self.unanswered += len(pending)
        # what did not come back stays registered: a late answer must find its request (asyncua's client
        # drops the connection on an answer it does not expect); the map goes with the connection
        for _, future in futures:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning for the ServiceFaults
        return count


async def fuzz_session(make_client: Callable[[], Awaitable[Client]], ns: int, count: int, seed: int,
                       probe: Callable[[], Awaitable[bool]], probe_every: int = 1000, batch: int = 200) -> dict:
    """`count` malformed bodies in batches; a new session when the server closes one (counted)."""
    sent = reconnects = 0
    client = await make_client()
    fuzzer = SessionFuzzer(client, ns, seed)
    try:
        while sent < count:
            n = min(batch, count - sent)
            try:
                await fuzzer.send(n)
            except (ConnectionError, OSError):
                reconnects += 1
                try:
                    await client.disconnect()
                except Exception:  # noqa: BLE001 - it is gone
                    pass
                client = await make_client()
                fuzzer.client = client
                continue
            before, sent = sent, sent + n
            if before // probe_every != sent // probe_every:
                await probe()
    finally:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001
            pass
    return {"inputs": sent, "answered": fuzzer.answered, "unanswered": fuzzer.unanswered, "sessions_lost": reconnects}
