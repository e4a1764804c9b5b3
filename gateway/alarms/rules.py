"""Alarm rules: which measure of which device raises which alarm, at which level, and why.

A rule reads Good point-table values (a `Lookup`), and returns a `Verdict` (level 0 = normal,
a severity and a message) or None when an input is not Good (hold the present state). The
thresholds, with their sources, are the constants below (docs/domain.md collects them); the
hysteresis is per threshold, the on/off delays (`DELAYS_S`) are applied by the engine
(gateway/alarms/engine.py). Rules know nothing of OPC UA.

  SourceLoss        source: Available false.  PDB segment: Energized false.  Micro-ATS: the
                    SourceA/BVoltage at the unit outside the ITIC steady-state band for 10 s.
                    A PDB's alarm is not raised while its feed source's is active, nor a unit's
                    for a side whose source or aisle PDB segment has one (one alarm per cause).
  OverTemperature   PDB: hottest joint vs. the coolest phase (NETA "similar components") and vs.
                    ambient (NETA "ambient air"); micro-ATS contacts vs. the aisle's ambient;
                    DES cells against absolute Li-ion limits.
  Overload          PDB and source Loading above the derated limit (80 %) and above 100 %.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from siteconfig.model import Site

# ---- thresholds (sources in the comments; docs/domain.md collects them) ------------------------------
# NETA ATS/MTS Table 100.18, thermographic survey. dT between similar components under similar
# loading: 1-3 K possible, 4-15 K probable deficiency, > 15 K major discrepancy. The three phases
# of a bus segment are such components (docs/domain.md: "one phase hotter than the others suggests a
# loose joint"); a healthy simulated segment spreads <= 1.5 K.
NETA_SIMILAR_PROBABLE_K = 3.0
NETA_SIMILAR_MAJOR_K = 15.0
# Same table, dT over ambient air: 1-10 K possible, 11-20 K probable, 21-40 K "monitor until
# corrected", > 40 K major. Healthy joints and contacts run 3-6 K over ambient here, so the
# similar-components figures (4 K) applied to ambient would alarm on healthy equipment.
NETA_AMBIENT_PROBABLE_K = 10.0
NETA_AMBIENT_MONITOR_K = 20.0
NETA_AMBIENT_MAJOR_K = 40.0
TEMPERATURE_HYSTERESIS_K = 1.0  # NETA: surveys resolve 1 K; smaller swings are sensor noise
# Typical Li-ion cell datasheets: charge 0-45 degC, discharge up to 60 degC; BMS alarm ~55 degC.
CELL_WARNING_DEGC = 45.0
CELL_HIGH_DEGC = 55.0
CELL_HYSTERESIS_K = 2.0
# NEC 210.20(A): continuous load <= 80 % of rating (the site's `derating`); above 100 % the
# protection's inverse-time curve runs.
OVERLOAD_HIGH_PCT = 100.0
LOADING_HYSTERESIS_PCT = 2.0
# ITIC (CBEMA): >= 90 % indefinitely; 80 % only for 10 s. Outside 90-110 % for longer than that,
# the unit's input is unusable (commands.py refuses a transfer to it for the same band).
ITIC_LOW_PU, ITIC_HIGH_PU = 0.90, 1.10
ITIC_LONG_S = 10.0
VOLTAGE_HYSTERESIS_PU = 0.02

# Part 9 severity ranges: 801-1000 High, 601-800 Medium High, 401-600 Medium, 201-400 Medium Low.
SEVERITY_SOURCE_LOST = 900
SEVERITY_BUS_DEAD = 800
SEVERITY_UNIT_ONE_INPUT = 600  # redundancy lost, the load is still fed
SEVERITY_UNIT_BOTH_INPUTS = 900
SEVERITY_PROBABLE = 500
SEVERITY_MONITOR = 650
SEVERITY_MAJOR = 850
SEVERITY_OVERLOAD_WARNING = 500
SEVERITY_OVERLOAD_HIGH = 800
SEVERITY_CELL_WARNING = 500
SEVERITY_CELL_HIGH = 800

# (on-delay, off-delay) in seconds: short enough to be prompt, long enough to ride out one noisy
# sample or a transfer's dip.
DELAYS_S = {"source": (1.0, 5.0), "bus": (2.0, 5.0), "unit_input": (ITIC_LONG_S, 5.0),
            "temperature": (5.0, 5.0), "loading": (5.0, 5.0)}


@dataclass(frozen=True)
class Band:
    level: int
    enter: float  # the measure must exceed this to enter the band
    severity: int
    label: str


@dataclass(frozen=True)
class Verdict:
    level: int  # 0 = normal
    severity: int
    message: str


def band_of(measure: float, bands: tuple[Band, ...], current_level: int, hysteresis: float) -> Band | None:
    """The highest band `measure` is in. Entering a band needs measure > enter; staying in it,
    or in the one above it, only measure > enter - hysteresis."""
    best = None
    for b in bands:
        threshold = b.enter - hysteresis if b.level <= current_level else b.enter
        if measure > threshold and (best is None or b.level > best.level):
            best = b
    return best


Lookup = Callable[[str, str], Any]  # (device, point) -> the last Good value or None


class RaisedAlarms(Protocol):
    """What a rule may ask of the engine: is an upstream cause alarmed already?"""

    def is_raised(self, device: str, type_name: str) -> bool: ...


class Rule:
    """Inputs that trigger an evaluation, passive inputs that are only read, and the evaluation."""

    type_name: str = ""
    delays: str = "temperature"
    input_point: str | None = None  # the variable reported as InputNode

    def __init__(self, device: str):
        self.device = device
        self.inputs: tuple[tuple[str, str], ...] = ()
        self.passive: tuple[tuple[str, str], ...] = ()

    def evaluate(self, v: Lookup, level: int, engine: RaisedAlarms) -> Verdict | None:
        """None: an input is not Good, hold the present state."""
        raise NotImplementedError


class SourceAvailableRule(Rule):
    type_name, delays, input_point = "SourceLossAlarmType", "source", "Available"

    def __init__(self, source: str):
        super().__init__(source)
        self.inputs = ((source, "Available"),)

    def evaluate(self, v, level, engine):
        available = v(self.device, "Available")
        if available is None:
            return None
        if not available:
            return Verdict(1, SEVERITY_SOURCE_LOST, f"{self.device} lost: not available (voltage or frequency out "
                                                    f"of tolerance or breaker open)")
        return Verdict(0, SEVERITY_SOURCE_LOST, f"{self.device} available again")


class BusEnergizedRule(Rule):
    type_name, delays, input_point = "SourceLossAlarmType", "bus", "Energized"

    def __init__(self, pdb: str, feed_source: str):
        super().__init__(pdb)
        self.feed_source = feed_source
        self.inputs = ((pdb, "Energized"),)

    def evaluate(self, v, level, engine):
        energized = v(self.device, "Energized")
        if energized is None:
            return None
        if not energized and not engine.is_raised(self.feed_source, "SourceLossAlarmType"):
            return Verdict(1, SEVERITY_BUS_DEAD, f"{self.device} de-energized while {self.feed_source} is available "
                                                 f"(breaker trip or open joint)")
        return Verdict(0, SEVERITY_BUS_DEAD, f"{self.device} energized")


class UnitInputsRule(Rule):
    type_name, delays = "SourceLossAlarmType", "unit_input"

    def __init__(self, unit: str, upstream: dict[int, tuple[str, str | None]], nominal_v: float):
        super().__init__(unit)
        self.upstream = upstream  # side (1 = A, 2 = B) -> (source name, aisle PDB name)
        self.nominal_v = nominal_v
        self.inputs = ((unit, "SourceAVoltage"), (unit, "SourceBVoltage"))
        self.input_point = "SourceAVoltage"

    def evaluate(self, v, level, engine):
        hyst = VOLTAGE_HYSTERESIS_PU if level > 0 else 0.0
        low, high = ITIC_LOW_PU + hyst, ITIC_HIGH_PU - hyst
        bad = []
        for side, point in ((1, "SourceAVoltage"), (2, "SourceBVoltage")):
            volts = v(self.device, point)
            if volts is None:
                return None
            pu = volts / self.nominal_v
            if low <= pu <= high:
                continue
            source, pdb = self.upstream.get(side, (None, None))
            if (source and engine.is_raised(source, "SourceLossAlarmType")) or (
                    pdb and engine.is_raised(pdb, "SourceLossAlarmType")):
                continue  # the cause upstream has its own alarm
            bad.append(f"{'AB'[side - 1]} at {volts:.0f} V ({pu:.0%})")
        if not bad:
            return Verdict(0, SEVERITY_UNIT_ONE_INPUT, f"{self.device}: both inputs within tolerance")
        severity = SEVERITY_UNIT_BOTH_INPUTS if len(bad) == 2 else SEVERITY_UNIT_ONE_INPUT
        return Verdict(len(bad), severity, f"{self.device}: input {' and '.join(bad)} outside the ITIC "
                                           f"{ITIC_LOW_PU:.0%}-{ITIC_HIGH_PU:.0%} band for over {ITIC_LONG_S:g} s")


_NETA_SIMILAR = (
    Band(1, NETA_SIMILAR_PROBABLE_K, SEVERITY_PROBABLE, "probable deficiency, repair as time permits"),
    Band(3, NETA_SIMILAR_MAJOR_K, SEVERITY_MAJOR, "major discrepancy, repair immediately"),
)
_NETA_AMBIENT = (
    Band(1, NETA_AMBIENT_PROBABLE_K, SEVERITY_PROBABLE, "probable deficiency, repair as time permits"),
    Band(2, NETA_AMBIENT_MONITOR_K, SEVERITY_MONITOR, "monitor until corrected"),
    Band(3, NETA_AMBIENT_MAJOR_K, SEVERITY_MAJOR, "major discrepancy, repair immediately"),
)


class JointTemperatureRule(Rule):
    type_name, input_point = "OverTemperatureAlarmType", "JointTemperature"

    def __init__(self, pdb: str):
        super().__init__(pdb)
        self.inputs = ((pdb, "JointTemperature"), (pdb, "JointTemperatureL1"), (pdb, "JointTemperatureL2"),
                       (pdb, "JointTemperatureL3"))
        self.passive = ((pdb, "AmbientTemperature"),)

    def evaluate(self, v, level, engine):
        hottest, ambient = v(self.device, "JointTemperature"), v(self.device, "AmbientTemperature")
        phases = [v(self.device, f"JointTemperatureL{i}") for i in (1, 2, 3)]
        if hottest is None or ambient is None or None in phases:
            return None
        spread, rise = max(phases) - min(phases), hottest - ambient
        similar = band_of(spread, _NETA_SIMILAR, level, TEMPERATURE_HYSTERESIS_K)
        over_ambient = band_of(rise, _NETA_AMBIENT, level, TEMPERATURE_HYSTERESIS_K)
        band = max((b for b in (similar, over_ambient) if b is not None), key=lambda b: b.level, default=None)
        figures = f"hottest phase {spread:.1f} K above the coolest, joint {rise:.1f} K over ambient"
        if band is None:
            return Verdict(0, SEVERITY_PROBABLE, f"{self.device} joint temperature normal ({figures})")
        return Verdict(band.level, band.severity, f"{self.device} joint over-temperature: {figures} "
                                                  f"(NETA: {band.label})")


class ContactTemperatureRule(Rule):
    type_name, input_point = "OverTemperatureAlarmType", "ContactTemperature"

    def __init__(self, unit: str, ambient_from: tuple[str, ...]):
        super().__init__(unit)
        self.ambient_from = ambient_from  # the aisle's PDB segments (they measure its air)
        self.inputs = ((unit, "ContactTemperature"),)
        self.passive = tuple((p, "AmbientTemperature") for p in ambient_from)

    def evaluate(self, v, level, engine):
        contact = v(self.device, "ContactTemperature")
        ambient = next((a for a in (v(p, "AmbientTemperature") for p in self.ambient_from) if a is not None), None)
        if contact is None or ambient is None:
            return None
        rise = contact - ambient
        band = band_of(rise, _NETA_AMBIENT, level, TEMPERATURE_HYSTERESIS_K)
        if band is None:
            return Verdict(0, SEVERITY_PROBABLE, f"{self.device} contact temperature normal ({rise:.1f} K over ambient)")
        return Verdict(band.level, band.severity, f"{self.device} contact over-temperature: {rise:.1f} K over "
                                                  f"ambient (NETA: {band.label})")


_CELL_BANDS = (
    Band(1, CELL_WARNING_DEGC, SEVERITY_CELL_WARNING, f"above the {CELL_WARNING_DEGC:g} degC charging limit"),
    Band(2, CELL_HIGH_DEGC, SEVERITY_CELL_HIGH, f"above the {CELL_HIGH_DEGC:g} degC BMS alarm limit"),
)


class CellTemperatureRule(Rule):
    type_name, input_point = "OverTemperatureAlarmType", "CellTemperature"

    def __init__(self, des: str):
        super().__init__(des)
        self.inputs = ((des, "CellTemperature"),)

    def evaluate(self, v, level, engine):
        cell = v(self.device, "CellTemperature")
        if cell is None:
            return None
        band = band_of(cell, _CELL_BANDS, level, CELL_HYSTERESIS_K)
        if band is None:
            return Verdict(0, SEVERITY_CELL_WARNING, f"{self.device} cell temperature normal ({cell:.1f} degC)")
        return Verdict(band.level, band.severity, f"{self.device} cell temperature {cell:.1f} degC, {band.label}")


class LoadingRule(Rule):
    type_name, delays, input_point = "OverloadAlarmType", "loading", "Loading"

    def __init__(self, device: str, derated_pct: float):
        super().__init__(device)
        self.bands = (
            Band(1, derated_pct, SEVERITY_OVERLOAD_WARNING, f"above the {derated_pct:g} % derated limit (NEC 210.20(A))"),
            Band(2, OVERLOAD_HIGH_PCT, SEVERITY_OVERLOAD_HIGH, "above its rating"),
        )
        self.inputs = ((device, "Loading"),)

    def evaluate(self, v, level, engine):
        loading = v(self.device, "Loading")
        if loading is None:
            return None
        band = band_of(loading, self.bands, level, LOADING_HYSTERESIS_PCT)
        if band is None:
            return Verdict(0, SEVERITY_OVERLOAD_WARNING, f"{self.device} loading normal ({loading:.1f} %)")
        return Verdict(band.level, band.severity, f"{self.device} loaded {loading:.1f} %, {band.label}")


def site_rules(site: Site, kinds: dict[str, str]) -> list[Rule]:
    """The threshold rules for every device of `site` that the address space has."""
    rules: list[Rule] = []
    derated_pct = round(site.gateway.derating * 100.0, 3)
    source_of = {int(s.selection): s.name for s in site.sources}
    for s in site.sources:
        rules += [SourceAvailableRule(s.name), LoadingRule(s.name, derated_pct)]
    for aisle in site.aisles:
        pdb_of_side = {int(p.feed): p.name for p in aisle.pdbs}
        for p in aisle.pdbs:
            rules += [BusEnergizedRule(p.name, source_of.get(int(p.feed), "")), JointTemperatureRule(p.name),
                      LoadingRule(p.name, derated_pct)]
        ambient_from = tuple(p.name for p in aisle.pdbs)
        for u in aisle.units:
            upstream = {side: (source_of.get(side, ""), pdb_of_side.get(side)) for side in (1, 2)}
            rules += [UnitInputsRule(u.name, upstream, site.nominal_voltage_v)]
            if ambient_from:
                rules.append(ContactTemperatureRule(u.name, ambient_from))
            if u.storage is not None:
                rules.append(CellTemperatureRule(u.storage.name))
    return [r for r in rules if r.device in kinds]
