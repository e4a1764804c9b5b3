"""The point table: one typed, timestamped value and quality per device point.

Drivers write into it, device by device, in batches; sinks (the OPC UA address space, the
historian, the MQTT publisher) are told once per batch which points changed. It is the only
place telemetry passes through between a device and what shows it.

Quality follows OPC UA's meaning (the gateway maps it onto StatusCodes):
- GOOD: read from the device within the scan period;
- UNCERTAIN_LAST_USABLE: the device stopped answering; this is the last value it gave;
- BAD_COMM: it has not answered for longer than the stale time;
- BAD_WAITING: no value has been read since start-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum


class Quality(IntEnum):
    GOOD = 0
    UNCERTAIN_LAST_USABLE = 1
    BAD_COMM = 2
    BAD_WAITING = 3

    @property
    def is_good(self) -> bool:
        return self is Quality.GOOD


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


Sink = Callable[[list[Change]], None]


class PointTable:
    """Typed, timestamped values per (device, point); change-only fan-out to sinks."""

    def __init__(self) -> None:
        self._devices: dict[str, dict[str, PointValue]] = {}
        self._deadbands: dict[tuple[str, str], float] = {}
        self._sinks: list[Sink] = []

    # ---- definition -------------------------------------------------------------------------
    def define(self, device: str, points: Iterable[str], deadbands: dict[str, float] | None = None) -> None:
        """Declare a device's points; they start as BAD_WAITING with no value."""
        now = time.time()
        self._devices[device] = {p: PointValue(None, Quality.BAD_WAITING, now) for p in points}
        for point, band in (deadbands or {}).items():
            if band > 0:
                self._deadbands[(device, point)] = band

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

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

    def _notify(self, changes: list[Change]) -> None:
        for sink in self._sinks:
            sink(changes)
