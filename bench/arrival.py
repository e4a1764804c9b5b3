"""When a notification reached a measuring client: the time its bytes arrived, before asyncua decodes it.

The benchmarks' asyncua clients (bench/gateway.py's measuring client, bench/load_clients.py) run on
the same 2-core machine as the gateway, and asyncua decodes a PublishResponse in Python, item by item:
one carrying ~2,000 values (the gateway bench's subscriptions) takes tens of milliseconds, and a
client process with 25 clients decodes one message after another. Stamping arrival after the decode
counts the measuring client's own decode as the server's latency. `stamp_arrivals(client)` records,
on a connected asyncua Client, the time each complete PublishResponse is handed to its request's
future: in `data_received`, after the chunks are joined and the message is verified and decrypted,
but before it is decoded. That is as early as this process can tell, not the time the bytes reached
the socket: a client's event loop that is busy (another client's decode, a browse in the same
process) still delays it. `arrival(result)` gives it for a PublishResult (None when not stamped).
The benchmarks report both: the arrival (what the targets are checked on) and after the decode (what
this client saw). The node-opcua client of the stress case (tests/interop/bench_client.mjs) stamps
after node-opcua's decode, which is fast; this module is for asyncua clients only.

asyncua has no hook for this; the two replaced callables are instance attributes of one client's
protocol and session, set here and nowhere else (bench code only; the gateway does not use it).
"""

from __future__ import annotations

import time

from asyncua import Client, ua
from asyncua.ua.ua_binary import nodeid_to_binary, struct_from_binary
from asyncua.ua.uaerrors import UaStructParsingError

_PUBLISH_RESPONSE = nodeid_to_binary(ua.FourByteNodeId(ua.ObjectIds.PublishResponse_Encoding_DefaultBinary))
# The last stamped PublishResult and its arrival. asyncua's types have __slots__ (no attribute can be
# added) and cannot be weakly referenced; its publish loop hands the result to the subscription's
# callback right after `publish` returns, with no await between, where `arrival` reads it: one slot,
# compared by identity, is exact and holds nothing else.
_LAST: list = [None, None]


def stamp_arrivals(client: Client) -> None:
    """Stamp every PublishResponse of this connected client with its arrival time (before its
    subscriptions are created: the publish loop starts with the first one). Once per connection."""
    uaclient = client.uaclient
    protocol, session = uaclient.protocol, uaclient.session
    if protocol is None:
        raise RuntimeError("stamp_arrivals: the client is not connected")
    if getattr(protocol, "_cmcs_stamped", False):
        raise RuntimeError("stamp_arrivals: this connection is stamped already")
    received: dict[int, float] = {}  # id(body) -> time; only PublishResponses, each popped at once
    call_callback = protocol._call_callback

    def _call_callback(request_id, body):
        data = getattr(body, "_data", None)
        stamped = False
        if data is not None:
            pos = body._cur_pos
            if data[pos:pos + 4] == _PUBLISH_RESPONSE:
                received[id(body)] = time.time()
                stamped = True
        try:
            call_callback(request_id, body)
        except BaseException:
            if stamped:
                received.pop(id(body), None)  # no future took it: nobody will pop it
            raise

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        # asyncua's UaSession.publish (2.1.0), keeping the arrival time of the response's bytes
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await session._send_request(request, timeout=0)
        arrived = received.pop(id(data), None)
        try:
            response = struct_from_binary(ua.PublishResponse, data)
        except Exception as ex:
            session.logger.exception("Error parsing notification from server")
            raise UaStructParsingError from ex
        _LAST[0], _LAST[1] = response.Parameters, arrived
        return response

    protocol._call_callback = _call_callback
    protocol._cmcs_stamped = True
    protocol._cmcs_pending = received  # for tests: what is stamped and not yet taken
    session.publish = publish


def arrival(result: ua.PublishResult) -> float | None:
    """The arrival time stamp_arrivals gave this PublishResult (once), or None."""
    if _LAST[0] is result:
        arrived = _LAST[1]
        _LAST[0] = _LAST[1] = None
        return arrived
    return None
