"""A hostile Modbus TCP device: it stands in for one endpoint (an aisle's devices) and is either a
faithful proxy to the real simulator ("behave") or answers every request with a burst of hostile
frames: garbage, MBAP headers with lying lengths, wrong transaction ids, wrong unit ids, exception
responses, wrong byte counts, fragments dribbled out, stalls, and dropped connections. It never
sends a well-formed answer to the request it got (a plausible lie would be indistinguishable
from a real device's values), so the endpoint's devices must end up Bad.

It can also be a slowed device ("slow"): `slow_s` > 0 and each request received then is answered
faithfully, but that many seconds late (a device whose CPU or link is overloaded; this kernel has
no netem to delay packets instead). `first_prompt_at` is the monotonic time of the first request
answered at once after a slowed period: the moment the device "answers again".
"""

from __future__ import annotations

import asyncio
import random
import struct
import time


WRITE_FUNCTIONS = (5, 6, 15, 16)  # write single coil / register, multiple coils / registers


class HostileDevice:
    """`await start()`, then set `hostile` True/False; `frames` counts the hostile frames sent."""

    def __init__(self, listen_port: int, upstream: tuple[str, int], seed: int = 0, burst: int = 400,
                 host: str = "127.0.0.1"):
        self.host, self.port, self.upstream = host, listen_port, upstream
        self.rng = random.Random(seed)
        self.burst = burst
        self.hostile = False
        self.slow_s = 0.0  # > 0: every request received now is answered that late
        self.late_answers = 0
        self.writes = 0  # write requests (function codes 5, 6, 15, 16) received: commands that reached the device
        self.first_prompt_at: float | None = None
        self._was_slow = False
        self.frames = 0
        self.connections = 0
        self.requests = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    # ---- one connection from the gateway -------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        upstream = None
        try:
            while True:
                header = await reader.readexactly(7)  # MBAP: transaction, protocol, length, unit
                tid, _proto, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(max(0, length - 1))
                self.requests += 1
                self.writes += bool(pdu) and pdu[0] in WRITE_FUNCTIONS
                delay = self.slow_s  # what the device is like when the request arrives
                if not self.hostile:
                    if upstream is None:
                        upstream = await asyncio.open_connection(*self.upstream)
                    up_reader, up_writer = upstream
                    up_writer.write(header + pdu)
                    await up_writer.drain()
                    reply_header = await up_reader.readexactly(7)
                    (_, _, reply_length, _) = struct.unpack(">HHHB", reply_header)
                    reply = reply_header + await up_reader.readexactly(max(0, reply_length - 1))
                    if delay > 0:
                        self._was_slow = True
                        await asyncio.sleep(delay)
                        self.late_answers += 1
                    elif self._was_slow:
                        self._was_slow = False
                        self.first_prompt_at = time.monotonic()
                    writer.write(reply)
                    await writer.drain()
                    continue
                if upstream is not None:
                    upstream[1].close()
                    upstream = None
                if not await self._hostile_answer(writer, tid, unit, pdu):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback logs a cancelled handler as an error)
        finally:
            self._tasks.discard(task)
            if upstream is not None:
                upstream[1].close()
            writer.close()

    async def _hostile_answer(self, writer: asyncio.StreamWriter, tid: int, unit: int, pdu: bytes) -> bool:
        """A burst of hostile frames for one request; False when the connection is to be dropped."""
        rng = self.rng
        function = pdu[0] if pdu else 3
        if rng.random() < 0.05:  # a stall: the gateway must time out, not hang
            self.frames += 1
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            return True
        if rng.random() < 0.05:  # an answer in fragments, one byte short of what its header says
            frame = self._read_reply(tid, unit, function, rng.randint(1, 60))[:-1]
            self.frames += 1
            for i in range(0, len(frame), 3):
                writer.write(frame[i:i + 3])
                await writer.drain()
                await asyncio.sleep(0.002)
            return True
        frames = []
        for _ in range(self.burst):
            kind = rng.randrange(8)
            if kind == 0:  # garbage
                frame = rng.randbytes(rng.randint(1, 300))
            elif kind == 1:  # a length that lies (longer or shorter than what follows)
                body = rng.randbytes(rng.randint(0, 20))
                frame = struct.pack(">HHHB", tid, 0, rng.choice([0, 1, 2, 255, 65535, len(body) + 50]), unit) + body
            elif kind == 2:  # a valid-looking answer for another transaction
                frame = self._read_reply((tid + rng.randint(1, 1000)) & 0xFFFF, unit, function, rng.randint(1, 60))
            elif kind == 3:  # for another unit
                frame = self._read_reply(tid, (unit + rng.randint(1, 200)) & 0xFF, function, rng.randint(1, 60))
            elif kind == 4:  # an exception response (codes 1-4, 10, 11 and undefined ones)
                code = rng.choice([1, 2, 3, 4, 5, 6, 10, 11, 0, 0x7F, 0xFF])
                frame = struct.pack(">HHHBBB", tid, 0, 3, unit, (function | 0x80) & 0xFF, code)
            elif kind == 5:  # a byte count that does not match the registers that follow
                registers = rng.randint(0, 30)
                frame = struct.pack(">HHHBBB", tid, 0, 3 + 2 * registers, unit, function,
                                    rng.choice([0, 1, 255, 2 * registers + 2])) + rng.randbytes(2 * registers)
            elif kind == 6:  # another protocol id, another function
                frame = struct.pack(">HHHBB", tid, rng.randint(1, 65535), 2, unit, rng.randint(0, 255))
            else:  # an empty or truncated header
                frame = struct.pack(">HHHB", tid, 0, 6, unit)[:rng.randint(0, 7)]
            frames.append(frame)
        writer.write(b"".join(frames))
        self.frames += len(frames)
        await writer.drain()
        return rng.random() >= 0.1  # and sometimes the connection is simply dropped

    def _read_reply(self, tid: int, unit: int, function: int, registers: int) -> bytes:
        data = self.rng.randbytes(2 * registers)
        return struct.pack(">HHHBBB", tid, 0, 3 + len(data), unit, function, len(data)) + data
