"""An IEEE 802.1Qbv-style gate control list and the user-space transmit scheduler that enforces it.

This kernel has no taprio/etf/mqprio, so the time-aware shaper is ours: one thread per egress
interface holds a queue per traffic class and opens their gates in turn, cycle after cycle:

    |<-------------------------------- cycle_us ----------------------------------->|
    | command (PCP 6) | telemetry (PCP 5) | best effort (PCP 0)         | guard band |
    0             offset+length                                    cycle - guard

* Clock: CLOCK_MONOTONIC for every wait. The cycle is anchored at `base_time_ns` on CLOCK_TAI
  (what taprio and 802.1AS use; here both ends share one host clock, on site gPTP would
  discipline it), converted to monotonic once at start.
* Wake-up: time.sleep() until ~SPIN_NS before a gate event (CPython 3.11 sleeps with
  clock_nanosleep(CLOCK_MONOTONIC) and releases the GIL), then a busy-wait on
  time.monotonic_ns() for the rest. A command enqueued while the command gate is open leaves at
  once, sent by the enqueuing thread itself under the scheduler's lock (no wake-up, no GIL
  hand-over: both measured too slow for a 200 us window).
  With `realtime_priority` the thread runs SCHED_FIFO (no timer slack, preempts normal tasks).
* Link: veth has no rate. The link rate is emulated by a byte budget per gate window: a frame
  starts only if its transmission time at `link_rate_mbps` (preamble, IFG and FCS counted) ends
  before its gate closes. Best effort closes one guard band (the time of a maximum-size frame)
  before the next window, as 802.1Qbv guard bands do, so no best-effort frame can be "on the wire"
  when the command gate opens.
* Schedule off: one FIFO for every class, served back to back at the link rate, no gates; a
  full FIFO drops the newest frame (tail drop), like a qdisc without priorities.

Queues are bounded (QUEUE_LIMIT_FRAMES, the Linux default txqueuelen); a full queue drops the
new frame and counts it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COMMAND = "command"
TELEMETRY = "telemetry"
BEST_EFFORT = "best_effort"
TRAFFIC_CLASSES = (COMMAND, TELEMETRY, BEST_EFFORT)

ETHERNET_OVERHEAD_BYTES = 8 + 12 + 4  # preamble+SFD, inter-frame gap, FCS (IEEE 802.3 clause 4)
MAX_FRAME_BYTES = 1518  # tagged frame without FCS (IEEE 802.3 1522 with FCS)
QUEUE_LIMIT_FRAMES = 1000  # Linux default txqueuelen
SPIN_NS = 150_000  # busy-wait this long before a gate event (time.sleep overshoots by ~60-100 us)
WAKE_SAMPLES = 200_000  # wake-up errors kept for the statistics (a ring)


@dataclass(frozen=True)
class Window:
    """One traffic class's gate: open from offset_us for length_us in every cycle."""

    traffic_class: str
    pcp: int
    offset_us: float
    length_us: float


@dataclass(frozen=True)
class GateControlList:
    cycle_us: float
    windows: tuple[Window, ...]
    link_rate_mbps: float = 100.0
    base_time_ns: int = 0  # CLOCK_TAI; cycles start at base_time + k * cycle
    best_effort_pcp: int = 0

    @classmethod
    def from_config(cls, cfg) -> "GateControlList":
        """The list a `gateway.tsn` block (siteconfig.model.TsnConfig) describes."""
        return cls(cfg.cycle_us, tuple(Window(w.traffic_class, w.pcp, w.offset_us, w.length_us) for w in cfg.windows),
                   link_rate_mbps=cfg.link_rate_mbps, base_time_ns=cfg.base_time_ns,
                   best_effort_pcp=cfg.best_effort_pcp)

    def frame_time_ns(self, frame_bytes: int) -> int:
        """Time on the wire of a frame of `frame_bytes` (no FCS) at the link rate, overheads included."""
        return int((frame_bytes + ETHERNET_OVERHEAD_BYTES) * 8 * 1000 / self.link_rate_mbps)

    @property
    def guard_band_ns(self) -> int:
        """The time of a maximum-size frame: best effort starts nothing later than this before a window."""
        return self.frame_time_ns(MAX_FRAME_BYTES)

    @property
    def cycle_ns(self) -> int:
        return int(self.cycle_us * 1000)

    def pcp_of(self, traffic_class: str) -> int:
        for w in self.windows:
            if w.traffic_class == traffic_class:
                return w.pcp
        return self.best_effort_pcp

    def problems(self) -> list[str]:
        """What makes this list unusable (empty: it is sound)."""
        out = []
        if self.cycle_us <= 0:
            out.append("cycle_us must be > 0")
        if self.link_rate_mbps <= 0:
            out.append("link_rate_mbps must be > 0")
        spans = sorted((w.offset_us, w.offset_us + w.length_us, w.traffic_class) for w in self.windows)
        for (s0, e0, c0), (s1, _e1, c1) in zip(spans, spans[1:]):
            if s1 < e0:
                out.append(f"windows {c0} and {c1} overlap")
        for w in self.windows:
            if w.offset_us < 0 or w.length_us <= 0 or w.offset_us + w.length_us > self.cycle_us:
                out.append(f"window {w.traffic_class} is not inside the {self.cycle_us:g} us cycle")
            if self.link_rate_mbps > 0 and w.length_us * 1000 < self.frame_time_ns(MAX_FRAME_BYTES):
                out.append(f"window {w.traffic_class} ({w.length_us:g} us) is shorter than one maximum-size "
                           f"frame at {self.link_rate_mbps:g} Mbit/s")
        return out

    def entries(self) -> list[tuple[int, int, str]]:
        """The gate events of one cycle: (start ns, end ns, open class), best effort in the gaps
        (shortened by the guard band before each window)."""
        cycle = self.cycle_ns
        wins = sorted((int(w.offset_us * 1000), int((w.offset_us + w.length_us) * 1000), w.traffic_class)
                      for w in self.windows)
        out: list[tuple[int, int, str]] = []
        t = 0
        for k, (start, end, cls) in enumerate(wins):
            gap_end = start - self.guard_band_ns
            if gap_end > t:
                out.append((t, gap_end, BEST_EFFORT))
            out.append((start, end, cls))
            t = end
        first_start = wins[0][0] + cycle if wins else cycle
        gap_end = min(cycle, first_start - self.guard_band_ns)
        if gap_end > t:
            out.append((t, gap_end, BEST_EFFORT))
        return out


@dataclass
class SchedulerStats:
    cycles: int = 0
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAFFIC_CLASSES, 0))
    queue_drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRAFFIC_CLASSES, 0))
    late_gate_events: int = 0  # woke after the window it was to open had closed
    wake_error_ns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=WAKE_SAMPLES))
    cpu_s: float = 0.0  # the scheduler thread's CPU time
    send_errors: int = 0  # frames the socket refused


class TransmitScheduler:
    """Sends frames handed to enqueue() through `send`, by the gate control list (or FIFO when off).

    `flood` (bytes per cycle) makes the scheduler itself offer best-effort frames built by
    `flood_frame()` each cycle: the benchmark's load, bounded by the queue limit.
    """

    def __init__(self, send: Callable[[bytes], object], gcl: GateControlList, *, enabled: bool = True,
                 queue_limit_frames: int = QUEUE_LIMIT_FRAMES, realtime_priority: int | None = None,
                 flood_bytes_per_cycle: int = 0, flood_frame: bytes = b""):
        self.send, self.gcl, self.enabled = send, gcl, enabled
        self.queue_limit = queue_limit_frames
        self.realtime_priority = realtime_priority
        self.flood_bytes_per_cycle, self.flood_frame = flood_bytes_per_cycle, flood_frame
        self.queues: dict[str, collections.deque] = {c: collections.deque() for c in TRAFFIC_CLASSES}
        self.fifo: collections.deque = collections.deque()
        self.stats = SchedulerStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the link budget (link_free_ns) and the socket, shared with enqueue()
        self._command_gate_open_until_ns = 0  # while now < this, enqueue() may send a command itself
        self._thread: threading.Thread | None = None
        self._entries = gcl.entries()
        self._frame_ns_cache: dict[int, int] = {}
        self.link_free_ns = 0
        self.rt_error = ""
        self.cycle_origin_ns = 0  # CLOCK_MONOTONIC start of the first cycle (set when the thread starts)

    # ---- producers ----------------------------------------------------------------------------------
    def enqueue(self, traffic_class: str, frame: bytes, on_sent: Callable[[int], None] | None = None) -> bool:
        """Queue a frame of a class; False (and counted) if its queue is full. Thread-safe.

        A command enqueued while the command gate is open, with nothing queued ahead of it, is sent
        at once from the caller's thread (it fits the gate and the link budget, checked under the
        lock the transmit thread sends under): waking the transmit thread would cost a GIL hand-over,
        measured at 100-200 us when the caller keeps running Python, enough to miss the window.
        """
        q = self.queues[traffic_class] if self.enabled else self.fifo
        if traffic_class == COMMAND and self.enabled:
            with self._lock:  # held to the append: the transmit thread must not drain q between check and append
                now = time.monotonic_ns()
                start = max(self.link_free_ns, now)
                if not q and start + self._frame_ns(len(frame)) <= self._command_gate_open_until_ns:
                    self._send(frame)
                    self.link_free_ns = start + self._frame_ns(len(frame))
                    self.stats.sent[COMMAND] += 1
                    if on_sent is not None:
                        on_sent(time.monotonic_ns())
                    return True
                return self._append(q, traffic_class, frame, on_sent)
        return self._append(q, traffic_class, frame, on_sent)

    def _append(self, q: collections.deque, traffic_class: str, frame: bytes, on_sent) -> bool:
        if len(q) >= self.queue_limit:
            self.stats.queue_drops[traffic_class] += 1
            return False
        q.append((frame, traffic_class, on_sent))
        return True

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tsn-transmit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # ---- the loop -----------------------------------------------------------------------------------
    def _send(self, frame: bytes) -> bool:
        """Hand one frame to the socket; a refusal (full socket buffer, link gone) is counted, never raised
        (the transmit thread must outlive it)."""
        try:
            self.send(frame)
            return True
        except OSError:
            self.stats.send_errors += 1
            return False

    def _frame_ns(self, n: int) -> int:
        t = self._frame_ns_cache.get(n)
        if t is None:
            t = self._frame_ns_cache[n] = self.gcl.frame_time_ns(n)
        return t

    def _wait_until(self, target_ns: int) -> int:
        """Sleep, then spin, until target (CLOCK_MONOTONIC); returns how late it woke (ns)."""
        now = time.monotonic_ns()
        if target_ns - now > SPIN_NS:
            time.sleep((target_ns - now - SPIN_NS) / 1e9)
        while (now := time.monotonic_ns()) < target_ns:
            # sleep(0) releases the GIL: a pure-Python spin holds it up to SPIN_NS and the enqueuing
            # thread, stuck between its timestamp and enqueue(), then missed the open command gate (measured)
            time.sleep(0)
        return now - target_ns

    def _first_cycle_start(self) -> int:
        tai_minus_mono = time.clock_gettime_ns(time.CLOCK_TAI) - time.monotonic_ns()
        base_mono = self.gcl.base_time_ns - tai_minus_mono
        now = time.monotonic_ns() + 2 * self.gcl.cycle_ns
        cycle = self.gcl.cycle_ns
        self.cycle_origin_ns = base_mono + -(-(now - base_mono) // cycle) * cycle
        return self.cycle_origin_ns

    def _run(self) -> None:
        if self.realtime_priority:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.realtime_priority))
            except OSError as exc:
                self.rt_error = f"SCHED_FIFO not granted: {exc.strerror}"
        cpu0 = time.thread_time()
        try:
            if self.enabled:
                self._run_gated()
            else:
                self._run_fifo()
        finally:
            self.stats.cpu_s = time.thread_time() - cpu0

    def _offer_flood(self) -> None:
        if not self.flood_bytes_per_cycle:
            return
        q = self.queues[BEST_EFFORT] if self.enabled else self.fifo
        item = (self.flood_frame, BEST_EFFORT, None)
        for _ in range(max(1, self.flood_bytes_per_cycle // (len(self.flood_frame) + ETHERNET_OVERHEAD_BYTES))):
            if len(q) >= self.queue_limit:
                self.stats.queue_drops[BEST_EFFORT] += 1
            else:
                q.append(item)

    def _run_gated(self) -> None:
        cycle_ns = self.gcl.cycle_ns
        cycle_start = self._first_cycle_start()
        stats, wake_errors = self.stats, self.stats.wake_error_ns
        while not self._stop.is_set():
            self._offer_flood()
            for start, end, cls in self._entries:
                late = self._wait_until(cycle_start + start)
                wake_errors.append(late)
                gate_close = cycle_start + end
                if late >= end - start:
                    stats.late_gate_events += 1
                    continue
                self._serve(self.queues[cls], gate_close, command_gate=(cls == COMMAND))
            stats.cycles += 1
            cycle_start += cycle_ns
            now = time.monotonic_ns()
            if now > cycle_start + cycle_ns:  # fell a whole cycle behind: skip, keep the phase
                cycle_start += (now - cycle_start) // cycle_ns * cycle_ns

    def _serve(self, q: collections.deque, gate_close_ns: int, command_gate: bool) -> None:
        """Send from q while the gate is open and the next frame fits before it closes.

        For the command gate, enqueue() sends what arrives later in the window itself.
        """
        sent = self.stats.sent
        with self._lock:
            link_free = max(self.link_free_ns, time.monotonic_ns())
            while q:
                frame, cls, on_sent = q[0]
                t = self._frame_ns(len(frame))
                if link_free + t > gate_close_ns:
                    break
                q.popleft()
                self._send(frame)
                link_free += t
                sent[cls] += 1
                if on_sent is not None:
                    on_sent(time.monotonic_ns())
            self.link_free_ns = link_free
            if command_gate:
                self._command_gate_open_until_ns = gate_close_ns

    def _run_fifo(self) -> None:
        cycle_ns = self.gcl.cycle_ns
        next_cycle = self._first_cycle_start()
        q, sent, wake_errors = self.fifo, self.stats.sent, self.stats.wake_error_ns
        link_free = 0
        tick_ns = 100_000  # serve the FIFO at least every 100 us between cycle boundaries
        while not self._stop.is_set():
            now = time.monotonic_ns()
            if now >= next_cycle:
                wake_errors.append(now - next_cycle)
                self._offer_flood()
                self.stats.cycles += 1
                next_cycle += cycle_ns
                if now > next_cycle:
                    next_cycle += (now - next_cycle) // cycle_ns * cycle_ns + cycle_ns
            if not q:
                link_free = now
            while q and link_free <= now:
                frame, cls, on_sent = q.popleft()
                self._send(frame)
                link_free += self._frame_ns(len(frame))
                sent[cls] += 1
                if on_sent is not None:
                    on_sent(time.monotonic_ns())
            target = min(next_cycle, max(link_free, now + tick_ns) if q else now + tick_ns)
            self._wait_until(target)
