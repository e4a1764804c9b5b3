"""When a notification reached a measuring client: the time its bytes arrived, before asyncua decodes it.

The benchmarks' OPC UA clients are asyncua clients on the same 2-core machine as the gateway, and
asyncua decodes a PublishResponse in Python, item by item: one carrying ~2,000 values (the gateway
bench's subscriptions) takes tens of milliseconds to decode, and a client process with 25 clients
decodes one message after another. Stamping arrival after the decode counts the measuring client's
own cost as the server's latency. `stamp_arrivals(client)` records, on a connected asyncua
Client, the time each PublishResponse's last chunk was taken off the socket (the protocol's
callback for a complete response, run from `data_received`); `arrival(result)` gives it for a
PublishResult (None when not stamped). The benchmarks report both: the arrival (the server's
latency, what the targets are checked on) and after the decode (what this client saw).

asyncua has no hook for this; the two replaced callables are instance attributes of one client's
protocol and session, set here and nowhere else (bench code only; the gateway does not use it).
"""

from __future__ import annotations

import time

from asyncua import Client, ua
from asyncua.ua.ua_binary import nodeid_to_binary, struct_from_binary

_PUBLISH_RESPONSE = nodeid_to_binary(ua.FourByteNodeId(ua.ObjectIds.PublishResponse_Encoding_DefaultBinary))
# id(PublishResult) -> arrival (asyncua's types have __slots__: no attribute can be added). asyncua's
# publish loop hands the result to its subscription's callback right after `publish` returns, where
# `arrival` pops it; a result no callback takes (an unknown subscription) is dropped at the bound.
_ARRIVALS: dict[int, float] = {}
_BOUND = 10_000


def stamp_arrivals(client: Client) -> None:
    """Stamp every PublishResponse of this connected client with its arrival time (before its
    subscriptions are created: the publish loop starts with the first one)."""
    uaclient = client.uaclient
    protocol, session = uaclient.protocol, uaclient.session
    if protocol is None:
        raise RuntimeError("stamp_arrivals: the client is not connected")
    received: dict[int, float] = {}  # id(body) -> time; only PublishResponses, each popped at once
    call_callback = protocol._call_callback

    def _call_callback(request_id, body):
        data = getattr(body, "_data", None)
        if data is not None:
            pos = body._cur_pos
            if data[pos:pos + 4] == _PUBLISH_RESPONSE:
                received[id(body)] = time.time()
        call_callback(request_id, body)

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        # asyncua's UaSession.publish, keeping the arrival time of the response's bytes
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await session._send_request(request, timeout=0)
        arrived = received.pop(id(data), None)
        response = struct_from_binary(ua.PublishResponse, data)
        if arrived is not None:
            if len(_ARRIVALS) >= _BOUND:
                _ARRIVALS.clear()
            _ARRIVALS[id(response.Parameters)] = arrived
        return response

    protocol._call_callback = _call_callback
    session.publish = publish


def arrival(result: ua.PublishResult) -> float | None:
    """The arrival time stamp_arrivals gave this PublishResult (once), or None."""
    return _ARRIVALS.pop(id(result), None)
