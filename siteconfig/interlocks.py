"""The interlock rules of docs/interface.md's "Method results", as pure functions of point values.

The command service applies them to Good values from the point table before it writes to a
device; the CMCS policy applies the very same functions to what it observes, so it never
proposes an action the command service would refuse; the mission benchmark applies them to the
plant's snapshot. Results are StatusCode names ("Good", "BadInvalidState", ...), so this module
needs neither OPC UA nor Modbus.
"""

from __future__ import annotations

from dataclasses import dataclass

from siteconfig.model import AtsState, StorageMode

# ITIC steady-state band: a source outside it is "out of tolerance" (docs/domain.md)
TOLERANCE_LOW_PU, TOLERANCE_HIGH_PU = 0.90, 1.10
MAX_BRIDGE_DURATION_S = 3600.0


@dataclass(frozen=True)
class Verdict:
    status: str  # "Good" or a Bad StatusCode name
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "Good"


GOOD = Verdict("Good")


def selection(value) -> int | None:
    """An integer SourceSelection value, or None when it is not an integer at all."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return v if v == value else None


def check_switch(unit: dict, target, *, source: dict, pdb: dict, storage: dict | None, nominal_voltage_v: float,
                 derating: float, since_last_transfer_s: float, dwell_time_s: float) -> Verdict:
    """May `unit` (its point values) be switched to `target` (1|2)?

    `source`, `pdb`: point values of the target source and of the unit's PDB segment on the
    target feed; `storage`: the unit's DES values or None. Order as in the command service."""
    t = selection(target)
    if t is None:
        return Verdict("BadInvalidArgument", f"Target {target!r} is not a SourceSelection")
    if t not in (1, 2):
        return Verdict("BadOutOfRange", f"Target {t} is not SourceA (1) or SourceB (2)")
    if unit["State"] in (AtsState.FAULT, AtsState.OFFLINE):
        return Verdict("BadInvalidState", f"unit is {AtsState(unit['State']).name}")
    name = "SourceA" if t == 1 else "SourceB"
    if not source["Available"]:
        return Verdict("BadInvalidState", f"{name} unavailable")
    volts = unit["SourceAVoltage" if t == 1 else "SourceBVoltage"]
    pu = volts / nominal_voltage_v
    if not (TOLERANCE_LOW_PU <= pu <= TOLERANCE_HIGH_PU):
        return Verdict("BadInvalidState", f"{name} at the unit is {volts:.0f} V ({pu:.0%} of nominal), out of tolerance")
    if unit["ActiveSource"] == t:
        return GOOD  # already there: nothing to do
    if since_last_transfer_s < dwell_time_s:
        return Verdict("BadTooManyOperations",
                       f"last transfer {since_last_transfer_s:.1f} s ago, dwell time {dwell_time_s:g} s")
    draw_kw = unit["LoadPower"] - (storage["ActivePower"] if storage else 0.0)
    limit_kw = derating * source["RatedPower"]
    if source["ActivePower"] + draw_kw > limit_kw:
        return Verdict("BadRequestNotAllowed", f"{name} would carry {source['ActivePower'] + draw_kw:.1f} kW, over "
                                               f"{derating:.0%} of its {source['RatedPower']:.0f} kW rating")
    limit_a = derating * pdb["RatedCurrent"]
    if pdb["Current"] + unit["LoadCurrent"] > limit_a:
        return Verdict("BadRequestNotAllowed", f"segment would carry {pdb['Current'] + unit['LoadCurrent']:.1f} A, "
                                               f"over {derating:.0%} of its {pdb['RatedCurrent']:.0f} A rating")
    return GOOD


def check_preferred(unit: dict, source) -> Verdict:
    s = selection(source)
    if s is None:
        return Verdict("BadInvalidArgument", f"Source {source!r} is not a SourceSelection")
    if s not in (1, 2):
        return Verdict("BadOutOfRange", f"Source {s} is not SourceA (1) or SourceB (2)")
    if unit["State"] in (AtsState.FAULT, AtsState.OFFLINE):
        return Verdict("BadInvalidState", f"unit is {AtsState(unit['State']).name}")
    return GOOD


def check_start_bridging(storage: dict, power_kw, duration_s, *, rated_power_kw: float) -> Verdict:
    try:
        power, duration = float(power_kw), float(duration_s)
    except (TypeError, ValueError):
        return Verdict("BadInvalidArgument", "Power and Duration must be numbers")
    if not (0.0 < duration <= MAX_BRIDGE_DURATION_S):
        return Verdict("BadOutOfRange", f"Duration {duration:g} s outside (0, {MAX_BRIDGE_DURATION_S:g}]")
    if not (0.0 < power <= rated_power_kw):
        return Verdict("BadOutOfRange", f"Power {power:g} kW outside (0, {rated_power_kw:g}]")
    if storage["Mode"] == StorageMode.FAULT:
        return Verdict("BadInvalidState", "storage is in Fault")
    if power > storage["MaxDischargePower"]:
        return Verdict("BadInvalidState", f"storage can give {storage['MaxDischargePower']:.1f} kW now, {power:g} asked")
    return GOOD
