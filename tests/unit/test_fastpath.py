"""The gateway's fast per-value path gives exactly what the generic paths give.

- the compiled Modbus block decoder (siteconfig.profiles ReadBlock.decode) against the per-point
  decoder, for every shipped profile and a little-endian word order;
- DataValues built field by field against asyncua's constructors;
- the DataChangeNotification encoder against asyncua's own serializer, byte for byte, and
  decoded back by asyncua's decoder;
- the synchronous monitored-item notification against asyncua's awaited callback, on a real
  server subscription.
"""

from __future__ import annotations

import asyncio
import math
import random
from datetime import datetime, timedelta, timezone

import pytest
from asyncua import Server, ua
from asyncua.ua import ua_binary

from information_model import fastpath
from siteconfig.profiles import PointMap, ReadBlock, decode_block, load_profile, read_blocks

PROFILES = ("power_source_v1", "pdb_segment_v1", "micro_ats_v1", "des_v1")


def _same(a, b) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


@pytest.mark.parametrize("name", PROFILES)
def test_compiled_block_decode_equals_per_point_decode(name):
    rnd = random.Random(name)
    profile = load_profile(name)
    for table in profile.tables():
        for block in read_blocks(profile, table):
            for _ in range(300):
                bits = table in ("coil", "discrete")
                regs = [rnd.randrange(2) if bits else rnd.randrange(65536) for _ in range(block.count + rnd.randrange(2))]
                expected, got = decode_block(block, regs), block.decode(regs)
                assert list(expected) == list(got)
                assert all(_same(expected[k], got[k]) for k in expected), (name, table, expected, got)


def test_compiled_decode_little_word_order_and_errors():
    points = (PointMap("A", "input", 10, "uint32", word_order="little"),
              PointMap("B", "input", 12, "int16", scale=0.1),
              PointMap("C", "input", 13, "float32", word_order="little"),
              PointMap("D", "input", 15, "int32", kind="int"))
    block = ReadBlock("input", 10, 7, points)
    rnd = random.Random(3)
    for _ in range(500):
        regs = [rnd.randrange(65536) for _ in range(7)]
        expected, got = decode_block(block, regs), block.decode(regs)
        assert all(_same(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="returned 6"):
        block.decode([0] * 6)
    with pytest.raises(ValueError, match="0..65535"):
        block.decode([0, 0, 70000, 0, 0, 0, 0])


def test_datavalues_equal_asyncua_constructors():
    now = datetime.now(timezone.utc)
    good = ua.StatusCode(ua.StatusCodes.Good)
    for value, vt in ((1.5, ua.VariantType.Double), (3, ua.VariantType.Int32), (True, ua.VariantType.Boolean),
                      ("x", ua.VariantType.String), (7, ua.VariantType.UInt32)):
        fast = fastpath.datavalue(fastpath.scalar_variant(fastpath.coerce(value, vt), vt), good, now, now)
        assert fast == ua.DataValue(ua.Variant(value, vt), StatusCode=good, SourceTimestamp=now, ServerTimestamp=now)
    assert fastpath.coerce(1, ua.VariantType.Double) == 1.0 and type(fastpath.coerce(1, ua.VariantType.Double)) is float


def _notification(rnd: random.Random) -> ua.DataChangeNotification:
    t0 = datetime(2026, 12, 2, 6, 0, tzinfo=timezone.utc)
    times = [t0 + timedelta(microseconds=rnd.randrange(10**9)) for _ in range(5)] + [None]
    statuses = [ua.StatusCode(c) for c in (ua.StatusCodes.Good, ua.StatusCodes.UncertainLastUsableValue,
                                           ua.StatusCodes.BadCommunicationError)] + [None]
    variants = [lambda: ua.Variant(rnd.random() * 1e6, ua.VariantType.Double),
                lambda: ua.Variant(rnd.random(), ua.VariantType.Float),
                lambda: ua.Variant(rnd.randrange(-2**31, 2**31), ua.VariantType.Int32),
                lambda: ua.Variant(rnd.randrange(2**32), ua.VariantType.UInt32),
                lambda: ua.Variant(rnd.random() < 0.5, ua.VariantType.Boolean),
                lambda: ua.Variant("café", ua.VariantType.String),
                lambda: ua.Variant(),
                lambda: ua.Variant([1.0, 2.0], ua.VariantType.Double),
                lambda: ua.Variant(datetime.now(timezone.utc), ua.VariantType.DateTime)]
    items = []
    for handle in range(400):
        dv = ua.DataValue(rnd.choice(variants)(), StatusCode=rnd.choice(statuses),
                          SourceTimestamp=rnd.choice(times), ServerTimestamp=rnd.choice(times))
        if handle % 97 == 0:
            dv.SourcePicoseconds = 5
        items.append(ua.MonitoredItemNotification(ClientHandle=rnd.randrange(2**32), Value=dv))
    return ua.DataChangeNotification(MonitoredItems=items)


def test_datachange_encoding_is_byte_identical_to_asyncua():
    rnd = random.Random(20)
    generic = ua_binary.create_dataclass_serializer(ua.DataChangeNotification)
    for _ in range(5):
        notif = _notification(rnd)
        body = fastpath.encode_datachange_notification(notif)
        assert body == generic(notif)
        decoded = ua_binary.struct_from_binary(ua.DataChangeNotification, ua.utils.Buffer(body))
        assert [i.ClientHandle for i in decoded.MonitoredItems] == [i.ClientHandle for i in notif.MonitoredItems]
    empty = ua.DataChangeNotification(MonitoredItems=[])
    assert fastpath.encode_datachange_notification(empty) == generic(empty)


def test_installed_encoder_serves_publish_responses_only_for_datachanges():
    fastpath.install_fast_encoding()
    fastpath.install_fast_encoding()  # idempotent: one wrapper
    assert ua_binary.struct_to_binary.__closure__ is not None
    notif = _notification(random.Random(1))
    events = ua.EventNotificationList(Events=[ua.EventFieldList(ClientHandle=3, EventFields=[ua.Variant(1.0)])])
    result = ua.PublishResult(SubscriptionId=7)
    result.NotificationMessage.NotificationData = [notif, events]
    response = ua.PublishResponse(Parameters=result)
    decoded = ua_binary.struct_from_binary(ua.PublishResponse, ua.utils.Buffer(ua_binary.struct_to_binary(response)))
    data = decoded.Parameters.NotificationMessage.NotificationData
    assert [type(d) for d in data] == [ua.DataChangeNotification, ua.EventNotificationList]
    generic = ua_binary.create_dataclass_serializer(ua.DataChangeNotification)(notif)
    expected = ua_binary.struct_from_binary(ua.DataChangeNotification, ua.utils.Buffer(generic))
    assert data[0] == expected
    assert data[1].Events[0].EventFields[0].Value == 1.0


async def _subscribed_values(fast: bool) -> list:
    """Write 3 rounds of values to 3 monitored variables (one with a deadband); what a client receives."""
    server = Server()
    await server.init()
    server.set_endpoint("opc.tcp://127.0.0.1:0/t")  # never started: subscriptions are internal
    ns = await server.register_namespace("urn:test:fastpath")
    objects = server.nodes.objects
    nodes = [await objects.add_variable(ua.NodeId(f"v{i}", ns), f"v{i}", 0.0) for i in range(3)]
    received: list = []

    class Handler:
        def datachange_notification(self, node, val, data):
            received.append((node.nodeid.Identifier, val))

    sub = await server.create_subscription(50, Handler())
    await sub.subscribe_data_change(nodes[:2])
    await sub.deadband_monitor(nodes[2], 5.0, 1)
    await asyncio.sleep(0.2)
    received.clear()
    aspace = server.iserver.aspace
    for round_ in range(3):
        batch = []
        for i, node in enumerate(nodes):
            dv = ua.DataValue(ua.Variant(float(round_ ** 2 * (1 + i)), ua.VariantType.Double))
            attval = aspace._nodes[node.nodeid].attributes[ua.AttributeIds.Value]
            attval.value = dv
            batch.append((attval.datachange_callbacks, dv))
        if fast:
            await fastpath.notify(batch)
        else:
            for callbacks, dv in batch:
                for handle, cb in list(callbacks.items()):
                    await cb(handle, dv)
        await asyncio.sleep(0.15)
    await sub.delete()
    await server.stop()
    return sorted(received)


def test_synchronous_notify_delivers_what_asyncua_delivers():
    slow = asyncio.run(_subscribed_values(False))
    fast = asyncio.run(_subscribed_values(True))
    assert fast == slow
    assert ("v0", 4.0) in fast and ("v2", 12.0) in fast and ("v2", 3.0) not in fast  # the deadband held
