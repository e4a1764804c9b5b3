"""The periodic one-line summary in the log: what a headless gateway is doing, for whoever reads the journal.

One INFO line every `gateway.log_summary_s` (default 60 s; 0 turns it off), always shown (this
logger is at INFO even when the rest of the log is at WARNING):

    summary: devices 23/24 up (down: MATS-01-03); OPC UA sessions 2 (345 monitored items);
    CMCS Advisory, cycle 41 ms, 12 cycles; alarms active 1; commands 3 (1 refused)
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from drivers.pointtable import Quality
from gateway.metrics import address_space_value, alarms_active, opcua_monitored_items, opcua_sessions
from gateway.limits import LOG_BUDGET

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.summary")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)

MAX_NAMED_DOWN = 5  # the line stays one line on a site with hundreds of devices down


class LogSummary:
    """Counts commands (from the audit log) and logs `line()` every `interval_s`."""

    def __init__(self, gateway: Gateway, interval_s: float) -> None:
        self.gateway = gateway
        self.interval_s = interval_s
        self.commands = 0
        self.refused = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.gateway.audit.listeners.append(self._on_audit)
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="log summary")

    async def stop(self) -> None:
        if self._on_audit in self.gateway.audit.listeners:
            self.gateway.audit.listeners.remove(self._on_audit)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def _on_audit(self, record: dict) -> None:
        self.commands += 1
        if record.get("status") != "Good":
            self.refused += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                log.info("%s", self.line())
            except Exception:  # noqa: BLE001 - a summary must never stop the gateway
                log.exception("summary failed")

    def line(self) -> str:
        """The summary as one line (without the logger's prefix)."""
        gw = self.gateway
        table = gw.table
        devices = table.devices()
        down = [d for d in devices if table.device_quality(d) is not Quality.GOOD]
        named = ", ".join(down[:MAX_NAMED_DOWN]) + (f" +{len(down) - MAX_NAMED_DOWN}" if len(down) > MAX_NAMED_DOWN else "")
        parts = [f"devices {len(devices) - len(down)}/{len(devices)} up" + (f" (down: {named})" if down else "")]
        server = gw.server
        iserver = server.server.iserver
        parts.append(f"OPC UA sessions {opcua_sessions(iserver)} ({opcua_monitored_items(iserver)} monitored items)")
        cmcs = f"CMCS {server.cmcs_mode.name.title()}"
        cycle_node = server.model.points.get(("Cmcs", "CycleTime")) if server.model else None
        cycle_ms = address_space_value(iserver, cycle_node) if cycle_node is not None else None
        if gw.live is not None:
            cmcs += f", cycle {getattr(gw.live, 'last_cycle_ms', 0.0):.0f} ms, {getattr(gw.live, 'cycles', 0)} cycles"
        elif cycle_ms:
            cmcs += f", cycle {float(cycle_ms):.0f} ms (external agent)"
        else:
            cmcs += ", no cycle yet"
        parts.append(cmcs)
        parts.append(f"alarms active {alarms_active(server.alarms)}")
        parts.append(f"commands {self.commands} ({self.refused} refused)")
        if LOG_BUDGET.suppressed:  # said here too: a flood that stops is never followed by the record that tells
            parts.append(f"asyncua log records suppressed {LOG_BUDGET.suppressed:,}")
        return "summary: " + "; ".join(parts)

