"""The point table: one typed, timestamped value and quality per device point.

Drivers write into it, device by device, in batches; sinks (the OPC UA address space, the
historian, the alarms, the CMCS feed, the MQTT publisher, the metrics exporter) are told once per
batch which points changed. It is the only place telemetry passes through between a device and
what shows it.

The sink contract (`Sink`, below): `attach` gives a sink the current state once (its birth),
`changes` the batches that follow, `device_quality` each change of a device's overall quality
(Good <-> Uncertain/Bad: a death or a rebirth), `detach` the end. The table calls them inline,
from the driver's task, so each must return at once: a sink that has slow work (a socket, a disk)
buffers the batch and does the work on its own task. Two helpers do that buffering:
`CoalescingBuffer` (keeps the latest value per point when the consumer falls behind, counted)
and `LosslessBuffer` (keeps every batch in order; past its bound it spills or reports
back-pressure, never drops silently). A sink that raises is logged once and counted; it never
stops the poll loop or the other sinks.

Quality follows OPC UA's meaning (the gateway maps it onto StatusCodes):
- GOOD: read from the device within the scan period;
- UNCERTAIN_LAST_USABLE: the device stopped answering; this is the last value it gave;
- BAD_COMM: it has not answered for longer than the stale time;
- BAD_WAITING: no value has been read since start-up.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Literal

log = logging.getLogger(__name__)


class Quality(IntEnum):
    GOOD = 0
    UNCERTAIN_LAST_USABLE = 1
    BAD_COMM = 2
    BAD_WAITING = 3

    @property
    def is_good(self) -> bool:
        return self is Quality.GOOD


_QUALITIES = tuple(Quality)  # by value: Quality values are 0..3


Value = float | int | bool | str | None


@dataclass(slots=True)
class PointValue:
    value: Value
    quality: Quality
    source_ts: float  # epoch seconds: when the device was read (or the quality changed)


@dataclass(slots=True, frozen=True)
class Change:
    device: str
    point: str
    value: Value
    quality: Quality
    source_ts: float


# ---- the sink contract -------------------------------------------------------------------------------
SinkKind = Literal["coalescing", "lossless"]


@dataclass(slots=True, frozen=True)
class Birth:
    """The state a sink receives when it attaches: every point of every device, and each device's quality."""

    values: dict[str, dict[str, PointValue]]  # device -> point -> (copy of) its value
    device_quality: dict[str, Quality]
    ts: float

    def changes(self) -> list[Change]:
        """The birth as one batch of changes (for sinks that treat it like any other batch)."""
        return [Change(device, point, pv.value, pv.quality, pv.source_ts)
                for device, points in self.values.items() for point, pv in points.items()]


class Sink:
    """Base of every consumer of the point table. Override what you need; each call must return at once.

    `kind` says what happens when the sink falls behind: "coalescing" sinks may keep only the
    latest value per point (the address space, metrics); "lossless" sinks never lose a change
    (historian, MQTT publisher): they apply back-pressure or spill to disk, and report it in
    `stats()` (shown in Diagnostics).
    """

    name: ClassVar[str] = "sink"
    kind: ClassVar[SinkKind] = "coalescing"

    def attach(self, birth: Birth) -> None:
        """The current state, once, before any batch."""

    def changes(self, batch: list[Change]) -> None:
        """Points whose value or quality changed, in the order they changed."""

    def device_quality(self, device: str, quality: Quality, ts: float) -> None:
        """The device's overall (worst) quality changed; the points' own changes come in `changes` too."""

    def detach(self) -> None:
        """No more calls follow."""

    def stats(self) -> dict[str, int | float]:
        """Counters for Diagnostics: e.g. coalesced, queued, spilled, dropped."""
        return {}


class CallableSink(Sink):
    """A plain function of a batch, as a (lossless, inline) sink; it receives the birth as one batch if asked."""

    kind = "lossless"

    def __init__(self, fn: Callable[[list[Change]], None], name: str = "", birth: bool = False) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", "callable")  # type: ignore[misc]
        self.wants_birth = birth

    def attach(self, birth: Birth) -> None:
        if self.wants_birth:
            batch = birth.changes()
            if batch:
                self.fn(batch)

    def changes(self, batch: list[Change]) -> None:
        self.fn(batch)


class CoalescingBuffer:
    """Latest change per point until the consumer takes them; counts changes overwritten unseen."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], Change] = {}
        self.coalesced = 0
        self.taken = 0

    def put(self, batch: Iterable[Change]) -> None:
        pending = self._pending
        before = len(pending)
        n = 0
        for c in batch:
            pending[(c.device, c.point)] = c
            n += 1
        self.coalesced += n - (len(pending) - before)

    def take(self) -> dict[tuple[str, str], Change]:
        pending, self._pending = self._pending, {}
        self.taken += len(pending)
        return pending

    def __len__(self) -> int:
        return len(self._pending)


@dataclass
class LosslessBuffer:
    """Every batch, in order, up to `max_changes` in memory; past it `spill(batch)` takes the batch
    (e.g. to disk) or, without a spill, the buffer reports back-pressure (`overflowing`) and still
    keeps the batch: a lossless sink never drops silently."""

    max_changes: int = 200_000
    spill: Callable[[list[Change]], None] | None = None
    _batches: deque = field(default_factory=deque)
    queued: int = 0  # changes in memory
    spilled: int = 0
    high_water: int = 0

    def put(self, batch: list[Change]) -> None:
        if self.queued + len(batch) > self.max_changes and self.spill is not None:
            self.spill(batch)
            self.spilled += len(batch)
            return
        self._batches.append(batch)
        self.queued += len(batch)
        self.high_water = max(self.high_water, self.queued)

    @property
    def overflowing(self) -> bool:
        return self.queued > self.max_changes

    def take(self, max_changes: int | None = None) -> list[Change]:
        """The oldest batches, whole, up to about `max_changes` changes (all when None)."""
        out: list[Change] = []
        while self._batches and (max_changes is None or not out or len(out) + len(self._batches[0]) <= max_changes):
            batch = self._batches.popleft()
            self.queued -= len(batch)
            out.extend(batch)
        return out

    def __len__(self) -> int:
        return self.queued


# Kept for the code that registers a bare function; new code subclasses Sink.
SinkFn = Callable[[list[Change]], None]


class PointTable:
    """Typed, timestamped values per (device, point); change-only fan-out to sinks."""

    def __init__(self) -> None:
        self._devices: dict[str, dict[str, PointValue]] = {}
        self._deadbands: dict[tuple[str, str], float] = {}
        self._sinks: list[Sink] = []
        self._fn_sinks: dict[SinkFn, Sink] = {}  # add_sink(function) -> its wrapper
        self._device_quality: dict[str, Quality] = {}
        self.sink_errors: dict[str, int] = {}  # sink name -> exceptions caught

    # ---- definition -------------------------------------------------------------------------
    def define(self, device: str, points: Iterable[str], deadbands: dict[str, float] | None = None) -> None:
        """Declare a device's points; they start as BAD_WAITING with no value."""
        now = time.time()
        self._devices[device] = {p: PointValue(None, Quality.BAD_WAITING, now) for p in points}
        self._device_quality[device] = Quality.BAD_WAITING
        for point, band in (deadbands or {}).items():
            if band > 0:
                self._deadbands[(device, point)] = band

    def remove(self, device: str) -> None:
        """Forget a device and its points (a site reload removed it); its driver stopped polling it first.
        Sinks are not told point by point: the reload tells each what it removed."""
        self._devices.pop(device, None)
        self._device_quality.pop(device, None)
        for key in [k for k in self._deadbands if k[0] == device]:
            del self._deadbands[key]

    # ---- sinks ----------------------------------------------------------------------------------------
    def birth(self) -> Birth:
        """The current state of every point (copies), as a sink receives it when it attaches."""
        return Birth({d: {p: PointValue(pv.value, pv.quality, pv.source_ts) for p, pv in points.items()}
                      for d, points in self._devices.items()}, dict(self._device_quality), time.time())

    def attach(self, sink: Sink) -> None:
        """Give `sink` the current state (its birth), then every batch that follows."""
        self._call(sink, "attach", self.birth())
        self._sinks.append(sink)

    def detach(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)
            self._call(sink, "detach")

    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def add_sink(self, sink: SinkFn | Sink) -> None:
        """A function of each batch (no birth), or a Sink (attached with its birth)."""
        if isinstance(sink, Sink):
            self.attach(sink)
            return
        wrapper = CallableSink(sink)
        self._fn_sinks[sink] = wrapper
        self._sinks.append(wrapper)

    def remove_sink(self, sink: SinkFn | Sink) -> None:
        self.detach(self._fn_sinks.pop(sink, sink))  # type: ignore[arg-type]

    def _call(self, sink: Sink, method: str, *args) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception:  # noqa: BLE001 - one broken sink must not stop the poll loop or the others
            self._sink_failed(sink, method)

    def _sink_failed(self, sink: Sink, method: str) -> None:
        """Called inside an except block: log the first failure of a sink with its traceback, count the rest."""
        name = sink.name
        count = self.sink_errors.get(name, 0) + 1
        self.sink_errors[name] = count
        if count == 1:
            log.exception("sink %s failed in %s (further failures are counted, not logged)", name, method)

    # ---- reads --------------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return list(self._devices)

    def points(self, device: str) -> list[str]:
        return list(self._devices[device])

    def get(self, device: str, point: str) -> PointValue:
        return self._devices[device][point]

    def value(self, device: str, point: str) -> Value:
        """The value if it is Good, else None: what interlocks may act on."""
        pv = self._devices[device][point]
        return pv.value if pv.quality is Quality.GOOD else None

    def device_quality(self, device: str) -> Quality:
        """The worst quality among the device's points."""
        return max((pv.quality for pv in self._devices[device].values()), default=Quality.BAD_WAITING)

    # ---- writes (drivers) -----------------------------------------------------------------------
    def update_device(self, device: str, values: dict[str, Value], source_ts: float | None = None) -> int:
        """Good values just read from a device; notifies sinks of what changed. Returns that count."""
        ts = time.time() if source_ts is None else source_ts
        table = self._devices[device]
        changes: list[Change] = []
        deadbands = self._deadbands
        for point, value in values.items():
            pv = table.get(point)
            if pv is None:
                continue  # a diagnostic or a point this gateway does not publish
            if pv.quality is Quality.GOOD and pv.value == value:
                continue
            if pv.quality is Quality.GOOD and deadbands and (device, point) in deadbands:
                old = pv.value
                if isinstance(value, float) and isinstance(old, float) and abs(value - old) < deadbands[(device, point)]:
                    continue
            pv.value, pv.quality, pv.source_ts = value, Quality.GOOD, ts
            changes.append(Change(device, point, value, Quality.GOOD, ts))
        if changes:
            self._notify(changes)
        return len(changes)

    def set_quality(self, device: str, quality: Quality, source_ts: float | None = None) -> int:
        """Mark every point of a device (keeping its last value); notifies sinks of what changed."""
        ts = time.time() if source_ts is None else source_ts
        changes = []
        for point, pv in self._devices[device].items():
            if pv.quality is quality or (pv.quality is Quality.BAD_WAITING and pv.value is None):
                continue
            pv.quality, pv.source_ts = quality, ts
            changes.append(Change(device, point, pv.value, quality, ts))
        if changes:
            self._notify(changes)
        return len(changes)

    def apply(self, device: str, items: list[tuple]) -> int:
        """Changes another table made (a driver worker's: drivers/worker.py), as (point, value, quality
        as int, source_ts): taken as they are, deadbands were applied there; sinks are notified as by
        update_device / set_quality. A device no longer defined here is skipped, and so is an item that
        equals what this table holds (value and quality): a worker that kept only the latest value per
        point while the gateway was behind sends one that may have come back to where it was (A, B, A),
        which is no change here (no second history row, the SourceTimestamp of the last change kept)."""
        table = self._devices.get(device)
        if table is None:
            return 0
        changes: list[Change] = []
        qualities = _QUALITIES
        for point, value, q, ts in items:
            pv = table.get(point)
            if pv is None:
                continue
            quality = qualities[q]
            if pv.quality is quality and pv.value == value:
                continue
            pv.value, pv.quality, pv.source_ts = value, quality, ts
            changes.append(Change(device, point, value, quality, ts))
        if changes:
            self._notify(changes)
        return len(changes)

    def _notify(self, changes: list[Change]) -> None:
        for sink in self._sinks:
            try:
                sink.changes(changes)
            except Exception:  # noqa: BLE001 - as in _call, inlined: this is the per-batch path
                self._sink_failed(sink, "changes")
        device = changes[0].device
        quality = self.device_quality(device)
        if quality is not self._device_quality.get(device):
            self._device_quality[device] = quality
            for sink in self._sinks:
                self._call(sink, "device_quality", device, quality, changes[-1].source_ts)

