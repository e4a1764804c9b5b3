"""The command service: the only path from a request to a device.

Every interlock of docs/interface.md's "Method results" table is checked here, from Good values in
the point table only, before anything is written; a refused command changes nothing. An
accepted command is written to the device, confirmed by reading the device back, and every
call, accepted or not, is written to the audit log.

Order of the checks (the first that fails decides the StatusCode):
  1. the caller's role                                  BadUserAccessDenied
  2. arguments (enumeration, range)                     BadOutOfRange / BadInvalidArgument
  3. the device answers and its data is fresh           BadCommunicationError
  4. the unit's state (Fault, Offline) and the target   BadInvalidState
     source (unavailable, out of tolerance)
  5. anti-flapping dwell time since the last transfer   BadTooManyOperations
  6. derating: the target feed would pass 80 % rating   BadRequestNotAllowed
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncua import ua

from drivers.base import (DeviceRefused, DeviceRejectedArgument, DeviceUnreachable,
                          DeviceError)
from drivers.pointtable import Birth, Change, PointTable, Quality, Sink
from gateway.security import REQUIRED_ROLE, ROLE_RANK, AccessPolicy  # noqa: F401  (ROLE_RANK: re-exported)
from siteconfig.interlocks import Verdict, check_preferred, check_start_bridging, check_switch, selection
from siteconfig.model import AtsState, Site, StorageMode

log = logging.getLogger(__name__)

SC = ua.StatusCodes
CONFIRM_TIMEOUT_S = 1.0

# Which role may call what: gateway.security REQUIRED_ROLE (docs/interface.md section 4), checked by
# AccessPolicy.may_call; the security layer supplies the caller's role.


@dataclass
class CommandOutcome:
    status: int  # an OPC UA StatusCode value
    outputs: list = field(default_factory=list)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SC.Good

    @property
    def status_name(self) -> str:
        return ua.StatusCode(self.status).name


class AuditLog:
    """Append-only audit trail: one JSON line per control action, flushed and fsynced at once."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self.listeners: list[Callable[[dict], None]] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        now = time.time()  # one reading: seconds and milliseconds of the same instant
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
                  **record}
        if self.path is not None:
            line = json.dumps(record, sort_keys=False, default=str)
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for listener in self.listeners:
            listener(record)


class TransferWatch(Sink):
    """The command service's point-table sink: each unit's TransferCount, for the dwell time."""

    name = "transfer-watch"
    kind = "lossless"  # inline and cheap: it sees every batch, in order

    def __init__(self, commands: CommandService) -> None:
        self.commands = commands

    def attach(self, birth: Birth) -> None:
        """The counts the table holds already are the baseline (not transfers)."""
        self.commands._watch_transfers(birth.changes())

    def changes(self, batch: list[Change]) -> None:
        self.commands._watch_transfers(batch)


class CommandService:
    """Interlocks, device write, confirmation, audit."""

    def __init__(self, site: Site, table: PointTable, driver, audit: AuditLog,
                 clock: Callable[[], float] = time.monotonic):
        self.site = site
        self.table = table
        self.driver = driver  # has .connection(device) -> object with write_command / read_now
        self.audit = audit
        self.clock = clock
        self._last_transfer: dict[str, float] = {}
        self._transfer_count: dict[str, int] = {}
        self._unit_locks: dict[str, asyncio.Lock] = {}
        self.set_site(site)
        # a point-table sink the gateway's wiring attaches (gateway/app.py Gateway.sinks)
        self.transfer_watch = TransferWatch(self)

    def set_site(self, site: Site) -> None:
        """The site whose units and storages it commands (at start, and after a site reload: a unit
        no longer in it is refused with BadNodeIdUnknown; its dwell-time state is forgotten)."""
        self.site = site
        self.dwell_time_s = site.gateway.dwell_time_s
        self.derating = site.gateway.derating
        self.units = {u.name: u for u in site.units}
        self.storages = {u.storage.name: u for u in site.units if u.storage is not None}
        self.pdb_of = {(p.aisle, int(p.feed)): p.name for p in site.pdbs}
        self.source_of = {int(s.selection): s for s in site.sources}
        self.v_nominal = site.nominal_voltage_v
        known = set(self.units) | set(self.storages)
        for state in (self._last_transfer, self._transfer_count):
            for device in [d for d in state if d not in known]:
                del state[device]

    async def quiesce(self, devices: list[str]) -> None:
        """Wait until no command on these devices is in progress (before a reload removes them)."""
        for device in devices:
            lock = self._unit_locks.pop(device, None)
            if lock is not None:
                async with lock:
                    pass

    # ---- automatic transfers count for the dwell time too ----------------------------------------
    def _watch_transfers(self, changes: list[Change]) -> None:
        """A unit's TransferCount moved (an automatic transfer, or one commanded elsewhere): its
        dwell time starts again. The first Good count of a unit is only its baseline."""
        for c in changes:
            if c.point == "TransferCount" and c.quality is Quality.GOOD and c.device in self.units:
                previous = self._transfer_count.get(c.device)
                self._transfer_count[c.device] = c.value
                if previous is not None and c.value != previous:
                    self._last_transfer[c.device] = self.clock()

    # ---- public API ---------------------------------------------------------------------------------
    async def switch_source(self, unit: str, target, user: str = "-", role: str = "Admin") -> CommandOutcome:
        return await self._run("SwitchSource", unit, {"Target": target}, user, role, self._switch_source)

    async def set_preferred_source(self, unit: str, source, user: str = "-", role: str = "Admin") -> CommandOutcome:
        return await self._run("SetPreferredSource", unit, {"Source": source}, user, role, self._set_preferred)

    async def start_bridging(self, storage: str, power_kw, duration_s, user: str = "-",
                             role: str = "Admin") -> CommandOutcome:
        return await self._run("StartBridging", storage, {"Power": power_kw, "Duration": duration_s}, user, role,
                               self._start_bridging)

    async def stop_bridging(self, storage: str, user: str = "-", role: str = "Admin") -> CommandOutcome:
        return await self._run("StopBridging", storage, {}, user, role, self._stop_bridging)

    # ---- the common frame: role, per-unit serialisation, audit ------------------------------------------
    async def _run(self, method: str, device: str, args: dict, user: str, role: str, body) -> CommandOutcome:
        started = time.perf_counter()
        if not AccessPolicy.may_call(role, method):
            outcome = CommandOutcome(SC.BadUserAccessDenied, reason=f"role {role} may not call {method}")
        else:
            lock = self._unit_locks.setdefault(device, asyncio.Lock())
            async with lock:  # two calls on one unit never interleave their checks and writes
                try:
                    outcome = await body(device, **args)
                except DeviceUnreachable as exc:
                    outcome = CommandOutcome(SC.BadCommunicationError, reason=str(exc))
                except DeviceRefused as exc:
                    outcome = CommandOutcome(SC.BadInvalidState, reason=f"device refused: {exc}")
                except DeviceRejectedArgument as exc:
                    outcome = CommandOutcome(SC.BadOutOfRange, reason=str(exc))
                except DeviceError as exc:
                    outcome = CommandOutcome(SC.BadCommunicationError, reason=str(exc))
        self.audit.write({
            "user": user, "role": role, "method": method, "object": device, "arguments": args,
            "status": ua.StatusCode(outcome.status).name, "reason": outcome.reason,
            "outputs": outcome.outputs, "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        })
        if not outcome.ok:
            log.info("%s %s%s refused: %s (%s)", method, device, args, ua.StatusCode(outcome.status).name,
                     outcome.reason)
        return outcome

    # ---- checks from Good values -------------------------------------------------------------------------
    def _fresh(self, device: str) -> dict | None:
        """The device's values if every one is Good, else None."""
        if self.table.device_quality(device) is not Quality.GOOD:
            return None
        return {p: self.table.get(device, p).value for p in self.table.points(device)}

    @staticmethod
    def _refused(verdict: Verdict) -> CommandOutcome:
        return CommandOutcome(getattr(SC, verdict.status), reason=verdict.reason)

    # ---- bodies -------------------------------------------------------------------------------------------
    async def _switch_source(self, unit: str, Target) -> CommandOutcome:
        if unit not in self.units:
            return CommandOutcome(SC.BadNodeIdUnknown, reason=f"no micro-ATS {unit}")
        target = selection(Target)
        if target not in (1, 2):  # argument errors come before anything else
            return self._refused(check_preferred({"State": AtsState.NORMAL}, Target))
        values = self._fresh(unit)
        if values is None:
            return CommandOutcome(SC.BadCommunicationError, reason=f"{unit} not reachable (data not Good)")
        cfg = self.units[unit]
        source_name = self.source_of[target].name
        pdb_name = self.pdb_of[(cfg.aisle, target)]
        source, pdb = self._fresh(source_name), self._fresh(pdb_name)
        if source is None or pdb is None:
            return CommandOutcome(SC.BadInvalidState, reason=f"{source_name if source is None else pdb_name} data not Good")
        storage = self._fresh(cfg.storage.name) if cfg.storage else None
        verdict = check_switch(values, target, source=source, pdb=pdb, storage=storage,
                               nominal_voltage_v=self.v_nominal, derating=self.derating,
                               since_last_transfer_s=self.clock() - self._last_transfer.get(unit, -1e18),
                               dwell_time_s=self.dwell_time_s)
        if not verdict.ok:
            return self._refused(verdict)
        if values["ActiveSource"] == target:
            return CommandOutcome(SC.Good, [0.0], reason="already on the target source")
        conn = self.driver.connection(unit)
        await conn.write_command(unit, "SwitchSource", Target=target)
        self._last_transfer[unit] = self.clock()
        confirmed = await self._confirm(unit, lambda v: v["ActiveSource"] == target)
        if confirmed is None:
            return CommandOutcome(SC.BadTimeout, reason=f"{unit} did not confirm ActiveSource={target}")
        self._transfer_count[unit] = confirmed.get("TransferCount", self._transfer_count.get(unit))
        # the register is a float32: round away its 1e-7 noise (4.2 ms arrives as 4.19999981)
        transfer_ms = round(float(confirmed.get("CommandReturn") or confirmed.get("LastTransferTime") or 0.0), 3)
        return CommandOutcome(SC.Good, [transfer_ms])

    async def _set_preferred(self, unit: str, Source) -> CommandOutcome:
        if unit not in self.units:
            return CommandOutcome(SC.BadNodeIdUnknown, reason=f"no micro-ATS {unit}")
        if selection(Source) not in (1, 2):
            return self._refused(check_preferred({"State": AtsState.NORMAL}, Source))
        values = self._fresh(unit)
        if values is None:
            return CommandOutcome(SC.BadCommunicationError, reason=f"{unit} not reachable (data not Good)")
        verdict = check_preferred(values, Source)
        if not verdict.ok:
            return self._refused(verdict)
        source = selection(Source)
        await self.driver.connection(unit).write_command(unit, "SetPreferredSource", Source=source)
        if await self._confirm(unit, lambda v: v["PreferredSource"] == source) is None:
            return CommandOutcome(SC.BadTimeout, reason=f"{unit} did not confirm PreferredSource={source}")
        return CommandOutcome(SC.Good)

    async def _start_bridging(self, storage: str, Power, Duration) -> CommandOutcome:
        if storage not in self.storages:
            return CommandOutcome(SC.BadNodeIdUnknown, reason=f"no DES unit {storage}")
        rated = self.storages[storage].storage.max_power_kw
        # argument errors first: checked against a healthy, full storage
        verdict = check_start_bridging({"Mode": StorageMode.STANDBY, "MaxDischargePower": rated}, Power, Duration,
                                       rated_power_kw=rated)
        if not verdict.ok:
            return self._refused(verdict)
        values = self._fresh(storage)
        if values is None:
            return CommandOutcome(SC.BadCommunicationError, reason=f"{storage} not reachable (data not Good)")
        verdict = check_start_bridging(values, Power, Duration, rated_power_kw=rated)
        if not verdict.ok:
            return self._refused(verdict)
        await self.driver.connection(storage).write_command(storage, "StartBridging", Power=float(Power),
                                                            Duration=float(Duration))
        if await self._confirm(storage, lambda v: v["Mode"] == StorageMode.BRIDGING) is None:
            return CommandOutcome(SC.BadTimeout, reason=f"{storage} did not confirm Bridging")
        return CommandOutcome(SC.Good)

    async def _stop_bridging(self, storage: str) -> CommandOutcome:
        if storage not in self.storages:
            return CommandOutcome(SC.BadNodeIdUnknown, reason=f"no DES unit {storage}")
        if self._fresh(storage) is None:
            return CommandOutcome(SC.BadCommunicationError, reason=f"{storage} not reachable (data not Good)")
        await self.driver.connection(storage).write_command(storage, "StopBridging")
        if await self._confirm(storage, lambda v: v["Mode"] != StorageMode.BRIDGING) is None:
            return CommandOutcome(SC.BadTimeout, reason=f"{storage} still Bridging")
        return CommandOutcome(SC.Good)

    async def _confirm(self, device: str, done) -> dict | None:
        """Read the device back until `done(values)` holds, or give up after CONFIRM_TIMEOUT_S."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        conn = self.driver.connection(device)
        while True:
            values = await conn.read_now(device)
            if done(values):
                return values
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
