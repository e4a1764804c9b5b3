"""Interlocks by property: over plant states and command sequences, every unsafe command is refused
with its exact docs/interface.md status ("Method results") and changes nothing.

The oracle below is written from docs/interface.md and docs/domain.md (ITIC band 0.90-1.10 pu, the site's
derating and dwell time), not from siteconfig/interlocks.py, so the two can disagree. A command is
sent to the real CommandService (gateway/commands.py) over a real PointTable; the only stand-in is
the device connection, which records what reaches it (the property is that nothing does when the
command is unsafe). tests/unit/test_interlock_properties.py runs it with hypothesis; `cmcs bench
robustness` runs more examples and reports unsafe_commands_refused_pct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import strategies as st

from drivers.pointtable import PointTable, Quality
from gateway.commands import AuditLog, CommandService
from siteconfig.model import AtsState, Site, StorageMode
from siteconfig.points import POINTS

ITIC_LOW_PU, ITIC_HIGH_PU = 0.90, 1.10  # docs/domain.md: steady-state tolerance of the IT load


class RecordingDevices:
    """The device side: records every command; a read-back shows the commanded state (so a Good
    command confirms at once)."""

    def __init__(self, table: PointTable):
        self.table = table
        self.commands: list[tuple[str, str, dict]] = []

    def connection(self, device: str) -> "RecordingDevices":
        return self

    async def write_command(self, device: str, command: str, **args) -> None:
        self.commands.append((device, command, args))

    async def read_now(self, device: str) -> dict:
        values = {p: self.table.get(device, p).value for p in self.table.points(device)}
        for dev, command, args in self.commands:
            if dev == device and command == "SwitchSource":
                values["ActiveSource"] = args["Target"]
            if dev == device and command == "SetPreferredSource":
                values["PreferredSource"] = args["Source"]
            if dev == device and command == "StartBridging":
                values["Mode"] = StorageMode.BRIDGING
            if dev == device and command == "StopBridging":
                values["Mode"] = StorageMode.STANDBY
        return values


@dataclass
class Tally:
    unsafe: int = 0
    refused_exactly: int = 0
    safe: int = 0
    mismatches: list = field(default_factory=list)

    @property
    def refused_pct(self) -> float:
        return 100.0 * self.refused_exactly / self.unsafe if self.unsafe else 100.0


def plant_state(site: Site):
    """A strategy for the values of one unit, its sources, its PDB segments and its DES (all Good,
    or one device not Good), and the seconds since its last transfer."""
    unit = site.units[0]
    v = site.nominal_voltage_v
    volts = st.one_of(st.floats(0.0, 1.3 * v), st.sampled_from([0.0, 0.89 * v, 0.9 * v, 1.1 * v, 1.11 * v, v]))
    rated_kw = max(s.rated_power_kw for s in site.sources)
    return st.fixed_dictionaries({
        "unit": st.fixed_dictionaries({
            "State": st.sampled_from(list(AtsState)), "ActiveSource": st.sampled_from([1, 2]),
            "SourceAVoltage": volts, "SourceBVoltage": volts,
            "LoadPower": st.floats(0.0, 0.5 * rated_kw), "LoadCurrent": st.floats(0.0, 400.0)}),
        "sources": st.tuples(*[st.fixed_dictionaries({
            "Available": st.booleans(), "ActivePower": st.floats(0.0, 1.1 * rated_kw),
            "RatedPower": st.just(rated_kw)}) for _ in range(2)]),
        "pdbs": st.tuples(*[st.fixed_dictionaries({
            "Current": st.floats(0.0, 1000.0), "RatedCurrent": st.sampled_from([400.0, 800.0])}) for _ in range(2)]),
        "des_power": st.floats(-50.0, 50.0) if unit.storage else st.just(0.0),
        "since_transfer_s": st.one_of(st.floats(0.0, 2 * site.gateway.dwell_time_s), st.just(math.inf)),
        "not_good": st.sampled_from([None, None, None, "unit", "source", "pdb"]),
    })


def targets():
    return st.one_of(st.sampled_from([0, 1, 2, 3, -1, 255]), st.integers(-5, 10), st.floats(0.5, 2.5),
                     st.sampled_from(["1", None]))


def expected_switch(site: Site, state: dict, target) -> str | None:
    """The docs/interface.md status of SwitchSource(target) in `state`; None when the command is safe."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target != int(target):
        return "BadInvalidArgument"
    t = int(target)
    if t not in (1, 2):
        return "BadOutOfRange"
    if state["not_good"] == "unit":
        return "BadCommunicationError"
    if state["not_good"] in ("source", "pdb"):
        return "BadInvalidState"  # the target's data is not fresh: no transfer on stale data
    unit, source, pdb = state["unit"], state["sources"][t - 1], state["pdbs"][t - 1]
    if unit["State"] in (AtsState.FAULT, AtsState.OFFLINE):
        return "BadInvalidState"
    pu = unit["SourceAVoltage" if t == 1 else "SourceBVoltage"] / site.nominal_voltage_v
    if not source["Available"] or not (ITIC_LOW_PU <= pu <= ITIC_HIGH_PU):
        return "BadInvalidState"
    if unit["ActiveSource"] == t:
        return None  # already there: nothing to do, nothing sent
    if state["since_transfer_s"] < site.gateway.dwell_time_s:
        return "BadTooManyOperations"
    derating = site.gateway.derating
    if source["ActivePower"] + unit["LoadPower"] - state["des_power"] > derating * source["RatedPower"] \
            or pdb["Current"] + unit["LoadCurrent"] > derating * pdb["RatedCurrent"]:
        return "BadRequestNotAllowed"
    return None


class Bench:
    """One site's CommandService over a PointTable, reset to a given state per example."""

    def __init__(self, site: Site, audit_path=None):
        self.site = site
        self.unit = unit = site.units[0]
        self.sources = {int(s.selection): s.name for s in site.sources}
        self.pdbs = {int(p.feed): p.name for p in site.pdbs if p.aisle == unit.aisle}
        self.kinds = {name: kind for name, kind, _ in site.devices()}
        # the devices the command depends on (the rest of the site plays no part in the verdict)
        self.involved = [unit.name, *self.sources.values(), *self.pdbs.values()] + \
            ([unit.storage.name] if unit.storage is not None else [])
        self.table = PointTable()
        for name in self.involved:
            self.table.define(name, [p.name for p in POINTS[self.kinds[name]]])
        self.devices = RecordingDevices(self.table)
        self.now = 1_000_000.0
        self.service = CommandService(site, self.table, self.devices, AuditLog(audit_path), clock=lambda: self.now)

    def _put(self, device: str, values: dict) -> None:
        full = {p.name: 0 for p in POINTS[self.kinds[device]]}  # every point has a value (Good needs all)
        full.update(values)
        self.table.update_device(device, full)

    def load(self, state: dict, carry_dwell: bool = False) -> None:
        unit = self.unit
        self.devices.commands.clear()
        u = dict(state["unit"])
        u.update(PreferredSource=u["ActiveSource"], TransferCount=0)
        self._put(unit.name, u)
        for i, values in enumerate(state["sources"], start=1):
            self._put(self.sources[i], values)
        for i, values in enumerate(state["pdbs"], start=1):
            self._put(self.pdbs[i], values)
        if unit.storage is not None:
            self._put(unit.storage.name, {"ActivePower": state["des_power"], "Mode": StorageMode.STANDBY,
                                          "MaxDischargePower": unit.storage.max_power_kw})
        for name in self.involved:
            self.table.set_quality(name, Quality.GOOD)
        not_good = state["not_good"]
        if not_good == "unit":
            self.table.set_quality(unit.name, Quality.BAD_COMM)
        elif not_good is not None:  # the target's source (or segment) data is not Good, whichever the target
            first = self.sources[1] if not_good == "source" else self.pdbs[1]
            for device in (first, self.sources[2]):
                self.table.set_quality(device, Quality.BAD_COMM)
        if not carry_dwell:
            since = state["since_transfer_s"]
            self.service._last_transfer[unit.name] = self.now - since if math.isfinite(since) else -1e18

    async def switch(self, state: dict, target, tally: Tally, carry_dwell: bool = False) -> None:
        """Load `state`, send SwitchSource(target), check it against the oracle; counts into `tally`.
        `carry_dwell`: part of a sequence: the time since the last transfer is the service's own
        (a Good switch earlier in the sequence starts the dwell time), `state`'s is ignored."""
        self.load(state, carry_dwell)
        if carry_dwell:
            state = {**state, "since_transfer_s": self.now - self.service._last_transfer.get(self.unit.name, -1e18)}
        expected = expected_switch(self.site, state, target)
        outcome = await self.service.switch_source(self.unit.name, target, user="property", role="Operator")
        sent = list(self.devices.commands)
        if expected is None:
            tally.safe += 1
            return
        tally.unsafe += 1
        if outcome.status_name == expected and not sent:
            tally.refused_exactly += 1
        else:
            tally.mismatches.append({"state": repr(state), "target": target, "expected": expected,
                                     "got": outcome.status_name, "sent": sent})
