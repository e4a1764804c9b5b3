"""bench/arrival.py: the benchmarks' clients stamp a notification when its bytes arrive, before
asyncua decodes it (the decode is the measuring client's cost, not the server's latency)."""

from __future__ import annotations

import asyncio
import time

import pytest

from asyncua import Client, Server, ua
from asyncua.common.subscription import Subscription

from bench.arrival import arrival, stamp_arrivals

from .conftest import free_port


class _Recorder(Subscription):
    seen: list[tuple[float | None, float, int]]
    again: list[float | None]

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:  # noqa: D401
        data = publish_result.NotificationMessage.NotificationData or []
        items = sum(len(n.MonitoredItems) for n in data if isinstance(n, ua.DataChangeNotification))
        self.seen.append((arrival(publish_result), time.time(), items))
        self.again.append(arrival(publish_result))  # each stamp is given once


async def test_every_publish_response_is_stamped_before_it_is_decoded():
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/t")
    ns = await server.register_namespace("urn:test:arrival")
    variables = [await server.nodes.objects.add_variable(ns, f"V{i}", 0.0) for i in range(2000)]
    async with server:
        client = Client(f"opc.tcp://127.0.0.1:{port}/t")
        async with client:
            stamp_arrivals(client)
            with pytest.raises(RuntimeError):
                stamp_arrivals(client)  # twice on one connection would stamp through two wrappers
            params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=100, RequestedLifetimeCount=600,
                                                     RequestedMaxKeepAliveCount=20, PublishingEnabled=True)
            sub = _Recorder(client.uaclient, params, handler=None)
            sub.seen, sub.again = [], []
            await sub.init()
            await sub.subscribe_data_change([client.get_node(v.nodeid) for v in variables], queuesize=1)
            for step in range(1, 6):
                for v in variables:
                    await v.write_value(float(step))
                await asyncio.sleep(0.3)
            await sub.delete()
            # other requests (reads, browses) are not stamped, and no stamp is left behind
            assert await client.get_node(variables[0].nodeid).read_value() == 5.0
            await client.nodes.objects.get_children()
            assert client.uaclient.protocol._cmcs_pending == {}
    with_data = [(a, d) for a, d, items in sub.seen if items]
    assert len(with_data) >= 5, sub.seen
    # every result was stamped, no later than this callback saw it decoded
    assert all(a is not None and a <= d for a, d, _ in sub.seen), sub.seen
    assert sub.again == [None] * len(sub.seen)
    assert arrival(ua.PublishResult()) is None  # a result stamp_arrivals never saw
