"""Alarms & Conditions (OPC UA Part 9) raised from the point table, plus the CMCS's predictions.

One condition per (source object, alarm type), reused across activations: its ConditionId (the
NodeId of a condition object, a component of the source with a HasCondition reference from it)
is stable; every state change is a new event with a new EventId. The condition object and its
Mandatory InstanceDeclarations (EventId .. ActiveState/Id, AckedState/Id, Retain, EnabledState/Id,
Quality, LastSeverity, Comment, ClientUserId, InputNode, ...) are created the first time the
condition is raised, so a 1,000-unit site pays only for the alarms it actually has; their values
follow every event.

Events are notified through the Server object, the site's root folder and the source object
(Server -HasNotifier-> site -HasNotifier-> device), so a client subscribed to events on any of
them gets them.

Rules (thresholds with their sources at the constants below; hysteresis on each threshold and an
on-delay before a higher level is taken, an off-delay before a lower one):
  SourceLoss        source: Available false.  PDB segment: Energized false.  Micro-ATS: the
                    SourceA/BVoltage at the unit outside the ITIC steady-state band for 10 s.
                    A PDB's alarm is not raised while its feed source's is active, nor a unit's
                    for a side whose source or aisle PDB segment has one (one alarm per cause).
  OverTemperature   PDB: hottest joint vs. the coolest phase (NETA "similar components") and vs.
                    ambient (NETA "ambient air"); micro-ATS contacts vs. the aisle's ambient;
                    DES cells against absolute Li-ion limits.
  Overload          PDB and source Loading above the derated limit (80 %) and above 100 %.
  PredictedFailure  `raise_predicted_failure()` / `clear_predicted_failure()` (the CMCS).

What asyncua 2.1 lacks and this module provides: condition instances and their state;
Acknowledge / AddComment / Enable / Disable (i=9111, 9029, 9027, 9028) bound to the type's
methods, called with the ConditionId as ObjectId; ConditionRefresh / ConditionRefresh2 (i=3875,
12912) that check the subscription belongs to the caller's session, bracket the retained
conditions with RefreshStart/RefreshEnd events sent to every event MonitoredItem of the
subscription regardless of its filter (Part 9 4.5), and apply each item's filter to the
conditions; an event filter evaluator with OfType meaning "this type or a subtype", multi-element
browse paths (ActiveState/Id) and the ConditionId operand.

Wiring (gateway/server.py, GatewayServer; no import cycle: this module imports gateway.server
and gateway.commands only inside functions):

    from gateway.alarms import attach as attach_alarms      # top of the file

    # __init__
    self.alarms = None                                       # gateway.alarms.AlarmEngine once started
    # start(), right after `await server.start()` (needs self.model, self.table, self.commands.audit)
    self.alarms = await attach_alarms(self)
    # stop(), first thing
    if self.alarms is not None:
        await self.alarms.stop()

The CMCS (in-process) then calls `gateway_server.alarms.raise_predicted_failure(...)` /
`clear_predicted_failure(...)` on the server's event loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua
from asyncua.common import event_objects
from asyncua.common.events import Event
from asyncua.server import monitored_item_service as _mis
from asyncua.server.address_space import AddressSpace

from drivers.pointtable import Change, PointTable, Quality
from gateway.audit_events import AuditEventEmitter, set_field
from information_model import spec
from information_model.instantiate import SiteModel, write_values
from siteconfig.model import Site

log = logging.getLogger(__name__)

_V = ua.VariantType
_OID = ua.ObjectIds
SC = ua.StatusCodes

# ---- thresholds (sources in the comments; DOMAIN.md collects them) ------------------------------
# NETA ATS/MTS Table 100.18, thermographic survey. dT between similar components under similar
# loading: 1-3 K possible, 4-15 K probable deficiency, > 15 K major discrepancy. The three phases
# of a bus segment are such components (DOMAIN.md: "one phase hotter than the others suggests a
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
TICK_S = 0.5  # how often pending on/off-delays are checked

ALARM_TYPES = {t.name: t for t in spec.ALARM_TYPES}
CONDITION_NAMES = {"SourceLossAlarmType": "SourceLoss", "OverTemperatureAlarmType": "OverTemperature",
                   "OverloadAlarmType": "Overload", "PredictedFailureAlarmType": "PredictedFailure"}
CONDITION_CLASSES = {  # Part 9 5.9 condition classes
    "SourceLossAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "OverTemperatureAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "OverloadAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "PredictedFailureAlarmType": (_OID.MaintenanceConditionClassType, "MaintenanceConditionClassType"),
}
# Who may call what (INTERFACE.md section 4 names no role for alarms: acknowledging and commenting
# is the operator's job (ISA-18.2), switching an alarm off the engineer's).
REQUIRED_ROLE = {"Acknowledge": "Operator", "AddComment": "Operator", "Enable": "Engineer", "Disable": "Engineer"}

SERVER_NODE = ua.NodeId(_OID.Server)
_HAS_COMPONENT = ua.NodeId(_OID.HasComponent)
_HAS_PROPERTY = ua.NodeId(_OID.HasProperty)
_HAS_SUBTYPE = ua.NodeId(_OID.HasSubtype)
_HAS_TYPEDEF = ua.NodeId(_OID.HasTypeDefinition)
_HAS_MODELLING_RULE = ua.NodeId(_OID.HasModellingRule)
_MANDATORY = ua.NodeId(_OID.ModellingRule_Mandatory)
_BASE_EVENT_TYPE = ua.NodeId(_OID.BaseEventType)


# =====================================================================================
# Rules: measure -> level, with hysteresis
# =====================================================================================


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


class Rule:
    """Inputs that trigger an evaluation, passive inputs that are only read, and the evaluation."""

    type_name: str = ""
    delays: str = "temperature"
    input_point: str | None = None  # the variable reported as InputNode

    def __init__(self, device: str):
        self.device = device
        self.inputs: tuple[tuple[str, str], ...] = ()
        self.passive: tuple[tuple[str, str], ...] = ()

    def evaluate(self, v: Lookup, level: int, engine: AlarmEngine) -> Verdict | None:
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


# =====================================================================================
# Conditions
# =====================================================================================


@dataclass
class Condition:
    """The state of one condition instance (Part 9 AlarmConditionType, no branches)."""

    device: str
    type_name: str
    node_id: ua.NodeId
    type_id: ua.NodeId
    source_node: ua.NodeId
    notifiers: tuple[ua.NodeId, ...]
    rule: Rule | None = None
    input_node: ua.NodeId = field(default_factory=ua.NodeId)
    level: int = 0
    active: bool = False
    acked: bool = True
    enabled: bool = True
    severity: int = 1
    last_severity: int = 1
    message: str = ""
    comment: str = ""
    client_user: str = ""
    active_ts: datetime | None = None
    acked_ts: datetime | None = None
    severity_ts: datetime | None = None
    comment_ts: datetime | None = None
    extra: dict[str, tuple[Any, ua.VariantType]] = field(default_factory=dict)
    pending_since: float | None = None
    pending_up: bool = False
    ackable: set[bytes] = field(default_factory=set)  # EventIds of the unacknowledged state
    recent: deque[bytes] = field(default_factory=lambda: deque(maxlen=64))  # EventIds emitted lately
    last_event: Event | None = None  # what ConditionRefresh re-sends
    children: dict[str, ua.NodeId] | None = None  # field path -> variable, once the nodes exist

    @property
    def name(self) -> str:
        return CONDITION_NAMES.get(self.type_name, self.type_name)

    @property
    def retain(self) -> bool:
        return self.enabled and (self.active or not self.acked)

    @property
    def source_name(self) -> str:
        return self.device


@dataclass(frozen=True)
class _Decl:
    path: str  # "ActiveState/Id"
    browse_name: ua.QualifiedName
    node_class: ua.NodeClass
    reftype: ua.NodeId
    typedef: ua.NodeId
    datatype: ua.NodeId
    value_rank: int
    node_id: ua.NodeId  # of the declaration (methods are referenced, not copied)


def _mandatory_declarations(aspace: AddressSpace, type_id: ua.NodeId) -> list[_Decl]:
    """The Mandatory InstanceDeclarations of an event type and its supertypes (nearest wins)."""
    chain, tid = [], type_id
    while tid is not None:
        chain.append(tid)
        if tid == _BASE_EVENT_TYPE:
            break
        tid = next((r.NodeId for r in aspace[tid].references if not r.IsForward and r.ReferenceTypeId == _HAS_SUBTYPE),
                   None)
    out: dict[str, _Decl] = {}

    def walk(parent: ua.NodeId, prefix: str) -> None:
        for r in aspace[parent].references:
            if not r.IsForward or r.ReferenceTypeId not in (_HAS_COMPONENT, _HAS_PROPERTY):
                continue
            nd = aspace[r.NodeId]
            rules = [x.NodeId for x in nd.references if x.IsForward and x.ReferenceTypeId == _HAS_MODELLING_RULE]
            if _MANDATORY not in rules:
                continue
            path = f"{prefix}{r.BrowseName.Name}"
            if path in out:
                continue
            node_class = ua.NodeClass(nd.attributes[ua.AttributeIds.NodeClass].value.Value.Value)
            typedef = next((x.NodeId for x in nd.references if x.IsForward and x.ReferenceTypeId == _HAS_TYPEDEF),
                           ua.NodeId())
            datatype, rank = ua.NodeId(), -1
            if node_class == ua.NodeClass.Variable:
                datatype = nd.attributes[ua.AttributeIds.DataType].value.Value.Value
                rank_av = nd.attributes.get(ua.AttributeIds.ValueRank)
                rank = rank_av.value.Value.Value if rank_av is not None else -1
            out[path] = _Decl(path, r.BrowseName, node_class, r.ReferenceTypeId, typedef, datatype, rank, r.NodeId)
            if node_class == ua.NodeClass.Variable:
                walk(r.NodeId, path + "/")

    for tid in chain:
        walk(tid, "")
    return list(out.values())


# =====================================================================================
# The event filter, as Part 4 7.7 defines it
# =====================================================================================

_SUBTYPE_CACHE: dict[tuple[ua.NodeId, ua.NodeId], bool] = {}


def is_subtype(aspace: AddressSpace, type_id: Any, of: Any) -> bool:
    """type_id is `of` or one of its subtypes."""
    if not isinstance(type_id, ua.NodeId) or not isinstance(of, ua.NodeId):
        return False
    key = (type_id, of)
    hit = _SUBTYPE_CACHE.get(key)
    if hit is None:
        hit, tid, seen = False, type_id, set()
        while tid is not None and tid not in seen:
            if tid == of:
                hit = True
                break
            seen.add(tid)
            nd = aspace.get(tid)
            if nd is None:
                break
            tid = next((r.NodeId for r in nd.references if not r.IsForward and r.ReferenceTypeId == _HAS_SUBTYPE), None)
        _SUBTYPE_CACHE[key] = hit
    return hit


class SpecWhereClauseEvaluator(_mis.WhereClauseEvaluator):
    """asyncua's evaluator compares OfType exactly, reads only the first element of a browse path
    and cannot select the ConditionId: a client filtering OfType(ConditionType), or on
    ActiveState/Id, would never get our alarms."""

    def _eval_el(self, index: int, event: Any) -> Any:
        el = self.elements[index]
        if el.FilterOperator == ua.FilterOperator.OfType:
            return is_subtype(self._aspace, getattr(event, "EventType", None), self._eval_op(el.FilterOperands[0], event))
        return super()._eval_el(index, event)

    def _eval_op(self, op: Any, event: Any) -> Any:
        if isinstance(op, ua.SimpleAttributeOperand):
            if op.BrowsePath:
                return getattr(event, "/".join(q.Name for q in op.BrowsePath), None)
            if op.AttributeId == ua.AttributeIds.NodeId:
                return getattr(event, "NodeId", None)  # the ConditionId
        return super()._eval_op(op, event)


def install_event_filter() -> None:
    """Make new event MonitoredItems use SpecWhereClauseEvaluator (idempotent)."""
    if _mis.WhereClauseEvaluator is not SpecWhereClauseEvaluator:
        _mis.WhereClauseEvaluator = SpecWhereClauseEvaluator


# =====================================================================================
# The engine
# =====================================================================================


def _lt(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, "en")


class AlarmEngine:
    """Conditions from point-table values and from the CMCS; Part 9 methods; events."""

    def __init__(self, server: Server, model: SiteModel, site: Site, table: PointTable | None = None, *,
                 audit=None, caller: Callable[[], tuple[str, str]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.server = server
        self.iserver = server.iserver
        self.aspace: AddressSpace = server.iserver.aspace
        self.model = model
        self.site = site
        self.table = table
        self.audit = audit  # gateway.commands.AuditLog: condition method calls are written there too
        self._caller = caller
        self.clock = clock
        self.conditions: dict[tuple[str, str], Condition] = {}
        self.by_node: dict[ua.NodeId, Condition] = {}
        self._values: dict[tuple[str, str], Any] = {}
        self._watch: dict[str, dict[str, list[Condition]]] = {}  # point -> device -> conditions it triggers
        self._pending: set[tuple[str, str]] = set()
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._refreshing: set[int] = set()
        self._sink_added = False
        self.audit_events: AuditEventEmitter | None = None
        self.events_emitted = 0
        self.evaluations = 0
        self._notifier_linked: set[ua.NodeId] = set()
        self._stopped = False
        self.type_ids: dict[str, ua.NodeId] = {}
        # called with the Condition each time its state is published (raise, clear, acknowledge..):
        # e.g. the Sparkplug edge node (gateway/sparkplug); must return at once
        self.listeners: list[Callable[[Condition], None]] = []

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        install_event_filter()
        self._queue = asyncio.Queue()
        self.type_ids = {name: self.model.type_ids.get(name) or ua.NodeId(t.nodeid, self.model.types_ns_index)
                         for name, t in ALARM_TYPES.items()}
        self._decls = {name: _mandatory_declarations(self.aspace, tid) for name, tid in self.type_ids.items()}
        self._bind_methods()
        self._add_reference(SERVER_NODE, ua.NodeId(_OID.HasNotifier), self.model.site_node)
        for rule in site_rules(self.site, self.model.device_kinds):
            cond = self._condition(rule.device, rule.type_name)
            cond.rule = rule
            if rule.input_point is not None:
                cond.input_node = self.model.points.get((rule.device, rule.input_point), ua.NodeId())
            for device, point in rule.inputs:
                self._watch.setdefault(point, {}).setdefault(device, []).append(cond)
            for device, point in rule.passive:
                self._watch.setdefault(point, {}).setdefault(device, [])
        server_uri = ""
        try:
            uris = await self.server.get_node(ua.NodeId(_OID.Server_ServerArray)).read_value()
            server_uri = uris[0] if uris else ""
        except Exception:  # noqa: BLE001 - ServerId is informative only
            log.debug("no ServerArray to read the ServerId from", exc_info=True)
        self.audit_events = AuditEventEmitter(self.server, self.model, server_uri)
        if self.audit is not None:
            self.audit_events.start(self.audit)
        self._tasks = [asyncio.create_task(self._emitter(), name="alarm events"),
                       asyncio.create_task(self._ticker(), name="alarm delays")]
        if self.table is not None:
            self._seed_from_table()
            self.table.add_sink(self.on_changes)
            self._sink_added = True

    async def stop(self) -> None:
        self._stopped = True
        if self._sink_added:
            self.table.remove_sink(self.on_changes)
        if self.audit_events is not None:
            await self.audit_events.stop()
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def drain(self) -> None:
        """Wait until every state change so far has been notified (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()
        if self.audit_events is not None:
            await self.audit_events.drain()

    # ---- point-table sink --------------------------------------------------------------------
    def on_changes(self, changes: list[Change]) -> None:
        """Sink: one dict lookup per change for the ~14 watched point names; others are skipped."""
        if self._stopped:
            return
        watch = self._watch
        dirty: set[int] | None = None
        conds: list[Condition] = []
        for c in changes:
            by_device = watch.get(c.point)
            if by_device is None:
                continue
            triggered = by_device.get(c.device)
            if triggered is None:
                continue
            self._values[(c.device, c.point)] = c.value if c.quality is Quality.GOOD else None
            for cond in triggered:
                if dirty is None:
                    dirty = set()
                if id(cond) not in dirty:
                    dirty.add(id(cond))
                    conds.append(cond)
        if conds:
            now = self.clock()
            for cond in conds:
                self._evaluate(cond, now)

    def _seed_from_table(self) -> None:
        table = self.table
        points = {device: set(table.points(device)) for device in table.devices()}
        for point, by_device in self._watch.items():
            for device in by_device:
                if point in points.get(device, ()):
                    pv = table.get(device, point)
                    self._values[(device, point)] = pv.value if pv.quality is Quality.GOOD else None
        now = self.clock()
        for cond in list(self.conditions.values()):
            if cond.rule is not None:
                self._evaluate(cond, now)

    def _value(self, device: str, point: str) -> Any:
        return self._values.get((device, point))

    def is_raised(self, device: str, type_name: str) -> bool:
        """The condition is active or about to be (its on-delay is running)."""
        cond = self.conditions.get((device, type_name))
        return cond is not None and (cond.active or (cond.pending_since is not None and cond.pending_up))

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, cond: Condition, now: float) -> None:
        self.evaluations += 1
        verdict = cond.rule.evaluate(self._value, cond.level, self)  # type: ignore[union-attr]
        key = (cond.device, cond.type_name)
        if verdict is None or verdict.level == cond.level:
            cond.pending_since = None
            self._pending.discard(key)
            return
        up = verdict.level > cond.level
        on_delay, off_delay = DELAYS_S[cond.rule.delays]  # type: ignore[union-attr]
        if cond.pending_since is None or cond.pending_up != up:
            cond.pending_since, cond.pending_up = now, up
            self._pending.add(key)
        if now - cond.pending_since >= (on_delay if up else off_delay):
            cond.pending_since = None
            self._pending.discard(key)
            self._set_level(cond, verdict.level, verdict.severity, verdict.message)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self._pending:
                now = self.clock()
                for key in list(self._pending):
                    cond = self.conditions.get(key)
                    if cond is not None and cond.rule is not None:
                        try:
                            self._evaluate(cond, now)
                        except Exception:  # noqa: BLE001 - one bad rule must not stop the others
                            log.exception("evaluating %s %s failed", *key)

    def _set_level(self, cond: Condition, level: int, severity: int, message: str) -> None:
        now = datetime.now(timezone.utc)
        previous = cond.level
        cond.level = level
        cond.message = message
        if level > 0:
            if previous == 0 or level > previous:
                if previous == 0:
                    cond.active, cond.active_ts = True, now
                # a new alarm, or an escalation, needs an acknowledgement of its own
                if cond.acked:
                    cond.acked, cond.acked_ts = False, now
                cond.ackable.clear()
            if severity != cond.severity:
                cond.last_severity, cond.severity, cond.severity_ts = cond.severity, severity, now
        else:
            cond.active, cond.active_ts = False, now
        self._publish(cond)

    # ---- the CMCS's predictions --------------------------------------------------------------
    def raise_predicted_failure(self, device: str, component: str, lead_time_s: float, risk: float,
                                message: str | None = None) -> ua.NodeId:
        """Raise (or update) the PredictedFailure alarm of `device`; returns its ConditionId.
        Severity grows with `risk` (0..1): 200 + 700 * risk. Call on the server's event loop."""
        if device not in self.model.device_nodes:
            raise KeyError(f"no device {device!r} in the address space")
        if not 0.0 <= float(risk) <= 1.0:
            raise ValueError(f"risk must be within 0..1, got {risk}")
        if not float(lead_time_s) >= 0.0:
            raise ValueError(f"lead_time_s must be >= 0, got {lead_time_s}")
        cond = self._condition(device, "PredictedFailureAlarmType")
        severity = int(round(200 + 700 * float(risk)))
        level = 1 + (severity > 400) + (severity > 600) + (severity > 800)  # Part 9 severity ranges
        text = message or (f"{device}: {component} predicted to fail in {float(lead_time_s) / 60.0:.0f} min "
                           f"(risk {float(risk):.0%})")
        extra = {"PredictedComponent": (str(component), _V.String), "LeadTime": (float(lead_time_s), _V.Double)}
        if cond.active and cond.extra == extra and cond.severity == severity and cond.message == text:
            return cond.node_id
        cond.extra = extra
        if cond.input_node.is_null():
            cond.input_node = self.model.points.get((device, "RiskScore"), ua.NodeId())
        if not cond.active or level != cond.level:
            self._set_level(cond, level, severity, text)
        else:  # same level, new figures: an update the operator has seen the like of
            cond.message = text
            if severity != cond.severity:
                cond.last_severity, cond.severity, cond.severity_ts = cond.severity, severity, datetime.now(timezone.utc)
            self._publish(cond)
        return cond.node_id

    def clear_predicted_failure(self, device: str) -> None:
        """Return the PredictedFailure alarm of `device` to normal (it stays until acknowledged)."""
        cond = self.conditions.get((device, "PredictedFailureAlarmType"))
        if cond is not None and cond.active:
            self._set_level(cond, 0, cond.severity, f"{device}: failure no longer predicted")

    # ---- condition instances -----------------------------------------------------------------
    def _condition(self, device: str, type_name: str) -> Condition:
        key = (device, type_name)
        cond = self.conditions.get(key)
        if cond is None:
            ns = self.model.ns_index
            source = self.model.device_nodes[device]
            cond = Condition(device, type_name, ua.NodeId(f"{device}.{CONDITION_NAMES[type_name]}Alarm", ns),
                             self.type_ids[type_name], source, (SERVER_NODE, self.model.site_node, source))
            self.conditions[key] = cond
            self.by_node[cond.node_id] = cond
        return cond

    def _add_reference(self, source: ua.NodeId, reftype: ua.NodeId, target: ua.NodeId, both: bool = True) -> None:
        items = [ua.AddReferencesItem(SourceNodeId=source, ReferenceTypeId=reftype, IsForward=True,
                                      TargetNodeId=target, TargetNodeClass=ua.NodeClass.Unspecified)]
        if both:
            items.append(ua.AddReferencesItem(SourceNodeId=target, ReferenceTypeId=reftype, IsForward=False,
                                              TargetNodeId=source, TargetNodeClass=ua.NodeClass.Unspecified))
        for status in self.iserver.node_mgt_service.add_references(items):
            if not status.is_good():
                log.warning("reference %s -> %s: %s", source.to_string(), target.to_string(), status.name)

    def _create_nodes(self, cond: Condition) -> None:
        """The condition object and its Mandatory children (AddNodes is synchronous in asyncua)."""
        attrs = ua.ObjectAttributes()
        bname = f"{cond.name}Alarm"
        attrs.DisplayName = _lt(bname)
        attrs.Description = _lt(spec_description(cond.type_name))
        attrs.EventNotifier = 0
        attrs.WriteMask = attrs.UserWriteMask = 0
        items = [ua.AddNodesItem(ParentNodeId=cond.source_node, ReferenceTypeId=_HAS_COMPONENT,
                                 RequestedNewNodeId=cond.node_id, BrowseName=ua.QualifiedName(bname, self.model.ns_index),
                                 NodeClass=ua.NodeClass.Object, NodeAttributes=attrs, TypeDefinition=cond.type_id)]
        children: dict[str, ua.NodeId] = {}
        methods: list[ua.NodeId] = []
        for d in self._decls[cond.type_name]:
            parent_path, _, _ = d.path.rpartition("/")
            parent = children[parent_path] if parent_path else cond.node_id
            if d.node_class == ua.NodeClass.Method:
                if not parent_path:
                    methods.append(d.node_id)
                continue
            if d.node_class != ua.NodeClass.Variable:
                continue
            nid = ua.NodeId(f"{cond.node_id.Identifier}.{d.path.replace('/', '.')}", self.model.ns_index)
            va = ua.VariableAttributes()
            va.DisplayName = _lt(d.browse_name.Name)
            va.DataType = d.datatype
            va.ValueRank = d.value_rank
            va.Value = ua.Variant()
            va.AccessLevel = va.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
            va.WriteMask = va.UserWriteMask = 0
            va.Historizing = False
            items.append(ua.AddNodesItem(ParentNodeId=parent, ReferenceTypeId=d.reftype, RequestedNewNodeId=nid,
                                         BrowseName=d.browse_name, NodeClass=ua.NodeClass.Variable,
                                         NodeAttributes=va, TypeDefinition=d.typedef))
            children[d.path] = nid
        for result in self.iserver.node_mgt_service.add_nodes(items):
            if not result.StatusCode.is_good():
                log.warning("condition node for %s %s: %s", cond.device, cond.type_name, result.StatusCode.name)
        # Part 9 5.5.1: the source HasCondition the condition; its methods are the type's (called
        # with the ConditionId as ObjectId), referenced, not copied.
        self._add_reference(cond.source_node, ua.NodeId(_OID.HasCondition), cond.node_id)
        for method in methods:
            self._add_reference(cond.node_id, _HAS_COMPONENT, method, both=False)
        if cond.source_node not in self._notifier_linked:
            self._notifier_linked.add(cond.source_node)
            if cond.source_node != self.model.site_node:
                self._add_reference(self.model.site_node, ua.NodeId(_OID.HasNotifier), cond.source_node)
        cond.children = children

    # ---- events ------------------------------------------------------------------------------
    def _publish(self, cond: Condition, done: asyncio.Future | None = None, force: bool = False) -> Event:
        """Build the event of the condition's present state (new EventId) and queue it. A disabled
        condition is silent (Part 9 5.5.4) except for the event of the Disable/Enable itself."""
        if cond.children is None:
            self._create_nodes(cond)
        ev = self._event(cond)
        event_id = ev.EventId
        cond.recent.append(event_id)
        if not cond.acked:
            cond.ackable.add(event_id)
        if cond.enabled or force:
            assert self._queue is not None, "AlarmEngine.start() first"
            self._queue.put_nowait((cond, ev, done))
            for listener in self.listeners:
                try:
                    listener(cond)
                except Exception:  # noqa: BLE001 - a listener must not stop the alarms
                    log.exception("alarm listener %r failed", listener)
        elif done is not None:
            done.set_result(None)
        return ev

    def _event(self, cond: Condition) -> Event:
        now = datetime.now(timezone.utc)
        ev = event_objects.AlarmCondition()
        class_id, class_name = CONDITION_CLASSES[cond.type_name]
        fields: list[tuple[str, Any, ua.VariantType]] = [
            ("EventId", uuid.uuid4().bytes, _V.ByteString),
            ("EventType", cond.type_id, _V.NodeId),
            ("SourceNode", cond.source_node, _V.NodeId),
            ("SourceName", cond.source_name, _V.String),
            ("Time", now, _V.DateTime),
            ("ReceiveTime", now, _V.DateTime),
            ("Message", _lt(cond.message), _V.LocalizedText),
            ("Severity", cond.severity, _V.UInt16),
            ("ConditionClassId", ua.NodeId(class_id), _V.NodeId),
            ("ConditionClassName", _lt(class_name.removesuffix("Type")), _V.LocalizedText),
            ("ConditionName", cond.name, _V.String),
            ("BranchId", ua.NodeId(), _V.NodeId),
            ("Retain", cond.retain, _V.Boolean),
            ("EnabledState", _lt("Enabled" if cond.enabled else "Disabled"), _V.LocalizedText),
            ("EnabledState/Id", cond.enabled, _V.Boolean),
            ("Quality", ua.StatusCode(SC.Good), _V.StatusCode),
            ("Quality/SourceTimestamp", now, _V.DateTime),
            ("LastSeverity", cond.last_severity, _V.UInt16),
            ("LastSeverity/SourceTimestamp", cond.severity_ts or now, _V.DateTime),
            ("Comment", _lt(cond.comment), _V.LocalizedText),
            ("Comment/SourceTimestamp", cond.comment_ts or now, _V.DateTime),
            ("ClientUserId", cond.client_user, _V.String),
            ("AckedState", _lt("Acknowledged" if cond.acked else "Unacknowledged"), _V.LocalizedText),
            ("AckedState/Id", cond.acked, _V.Boolean),
            ("AckedState/TransitionTime", cond.acked_ts or now, _V.DateTime),
            ("ActiveState", _lt("Active" if cond.active else "Inactive"), _V.LocalizedText),
            ("ActiveState/Id", cond.active, _V.Boolean),
            ("ActiveState/EffectiveDisplayName", _lt("Active" if cond.active else "Inactive"), _V.LocalizedText),
            ("ActiveState/TransitionTime", cond.active_ts or now, _V.DateTime),
            ("InputNode", cond.input_node, _V.NodeId),
            ("SuppressedOrShelved", False, _V.Boolean),
            ("NodeId", cond.node_id, _V.NodeId),  # the ConditionId (Part 9 5.5.2)
        ]
        for name, (value, vtype) in cond.extra.items():
            fields.append((name, value, vtype))
        for name, value, vtype in fields:
            set_field(ev, name, value, vtype)
        return ev

    async def _emitter(self) -> None:
        assert self._queue is not None
        while True:
            cond, ev, done = await self._queue.get()
            try:
                if cond.children:
                    await write_values(self.server, self._node_values(cond, ev), skip_unchanged=True)
                cond.last_event = ev
                for notifier in cond.notifiers:
                    copy_ = copy.copy(ev)
                    copy_.emitting_node = notifier
                    for sub in list(self.iserver.subscription_service.subscriptions.values()):
                        await sub.monitored_item_srv.trigger_event(copy_)
                self.events_emitted += 1
            except Exception:  # noqa: BLE001 - the next state change must still go out
                log.exception("notifying %s %s failed", cond.device, cond.type_name)
            finally:
                if done is not None and not done.done():
                    done.set_result(None)
                self._queue.task_done()

    @staticmethod
    def _node_values(cond: Condition, ev: Event) -> list[tuple[ua.NodeId, ua.DataValue]]:
        now = ev.Time
        out = []
        for path, nid in (cond.children or {}).items():
            value = getattr(ev, path, None)
            variant = ua.Variant() if value is None else ua.Variant(value, ev.data_types[path])
            out.append((nid, ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now)))
        return out

    # ---- Part 9 methods ----------------------------------------------------------------------
    def _bind_methods(self) -> None:
        add = self.iserver.isession.add_method_callback
        add(ua.NodeId(_OID.AcknowledgeableConditionType_Acknowledge), self._acknowledge)
        add(ua.NodeId(_OID.ConditionType_AddComment), self._add_comment)
        add(ua.NodeId(_OID.ConditionType_Enable), self._enable)
        add(ua.NodeId(_OID.ConditionType_Disable), self._disable)
        add(ua.NodeId(_OID.ConditionType_ConditionRefresh), self._condition_refresh)
        add(ua.NodeId(_OID.ConditionType_ConditionRefresh2), self._condition_refresh2)

    def caller(self) -> tuple[str, str]:
        """(user, role) of the session calling now (gateway.server's resolver unless given one)."""
        if self._caller is not None:
            return self._caller()
        from gateway import server as gateway_server  # not at import: server.py imports this module

        return gateway_server.caller()

    def _audit(self, method: str, cond: Condition | None, object_id: ua.NodeId, user: str, role: str,
               status: int, arguments: dict, event_id: bytes | None) -> None:
        if self.audit is None:
            return
        self.audit.write({"user": user, "role": role, "method": method,
                          "object": cond.node_id.Identifier if cond else object_id.to_string(),
                          "condition": (cond.node_id if cond else object_id).to_string(),
                          "arguments": arguments, "event_id": event_id.hex() if event_id else None,
                          "status": ua.StatusCode(status).name})

    async def _condition_call(self, method: str, object_id: ua.NodeId, args: tuple, body) -> Any:
        """Common frame: find the condition, check the role and the EventId, audit, run `body`."""
        user, role = self.caller()
        cond = self.by_node.get(object_id)
        event_id, comment = None, None
        if method in ("Acknowledge", "AddComment"):
            if len(args) < 2:
                status = SC.BadArgumentsMissing
                self._audit(method, cond, object_id, user, role, status, {}, None)
                return ua.StatusCode(status)
            if len(args) > 2:
                self._audit(method, cond, object_id, user, role, SC.BadTooManyArguments, {}, None)
                return ua.StatusCode(SC.BadTooManyArguments)
            raw_id, raw_comment = args[0].Value, args[1].Value
            event_id = bytes(raw_id) if isinstance(raw_id, bytes | bytearray) else None
            comment = raw_comment.Text if isinstance(raw_comment, ua.LocalizedText) else (
                raw_comment if isinstance(raw_comment, str) or raw_comment is None else None)
            if event_id is None or (raw_comment is not None and comment is None):
                self._audit(method, cond, object_id, user, role, SC.BadTypeMismatch, {}, None)
                return ua.StatusCode(SC.BadTypeMismatch)
        from gateway.commands import ROLE_RANK

        arguments = {"Comment": comment or ""} if event_id is not None else {}
        if cond is None:
            status = SC.BadMethodInvalid if object_id in self.aspace else SC.BadNodeIdUnknown
        elif ROLE_RANK.get(role, -1) < ROLE_RANK[REQUIRED_ROLE[method]]:
            status = SC.BadUserAccessDenied
        else:
            status = body(cond, event_id, comment or "", user)
        self._audit(method, cond, object_id, user, role, status, arguments, event_id)
        if status != SC.Good:
            return ua.StatusCode(status)
        done = asyncio.get_running_loop().create_future()
        self._publish(cond, done, force=True)
        await done  # the event is queued for the subscriptions when the call returns
        return []

    async def _acknowledge(self, object_id: ua.NodeId, *args: ua.Variant):
        def body(cond: Condition, event_id: bytes, comment: str, user: str) -> int:
            if not cond.enabled:
                return SC.BadConditionDisabled
            if event_id not in cond.recent:
                return SC.BadEventIdUnknown
            if cond.acked:
                return SC.BadConditionBranchAlreadyAcked
            if event_id not in cond.ackable:
                return SC.BadEventIdUnknown  # an earlier episode's event: not the state to acknowledge
            now = datetime.now(timezone.utc)
            cond.acked, cond.acked_ts = True, now
            cond.comment, cond.comment_ts, cond.client_user = comment, now, user
            cond.ackable.clear()
            return SC.Good

        return await self._condition_call("Acknowledge", object_id, args, body)

    async def _add_comment(self, object_id: ua.NodeId, *args: ua.Variant):
        def body(cond: Condition, event_id: bytes, comment: str, user: str) -> int:
            if not cond.enabled:
                return SC.BadConditionDisabled
            if event_id not in cond.recent:
                return SC.BadEventIdUnknown
            cond.comment, cond.comment_ts, cond.client_user = comment, datetime.now(timezone.utc), user
            return SC.Good

        return await self._condition_call("AddComment", object_id, args, body)

    async def _enable(self, object_id: ua.NodeId, *args: ua.Variant):
        def body(cond: Condition, _event_id, _comment, user: str) -> int:
            if cond.enabled:
                return SC.BadConditionAlreadyEnabled
            cond.enabled, cond.client_user = True, user
            return SC.Good

        return await self._condition_call("Enable", object_id, args, body)

    async def _disable(self, object_id: ua.NodeId, *args: ua.Variant):
        def body(cond: Condition, _event_id, _comment, user: str) -> int:
            if not cond.enabled:
                return SC.BadConditionAlreadyDisabled
            cond.enabled, cond.client_user = False, user
            return SC.Good

        return await self._condition_call("Disable", object_id, args, body)

    async def _condition_refresh(self, _object_id: ua.NodeId, *args: ua.Variant):
        if not args:
            return ua.StatusCode(SC.BadArgumentsMissing)
        return await self._refresh(args[0], None)

    async def _condition_refresh2(self, _object_id: ua.NodeId, *args: ua.Variant):
        if len(args) < 2:
            return ua.StatusCode(SC.BadArgumentsMissing)
        return await self._refresh(args[0], args[1])

    async def _refresh(self, sub_arg: ua.Variant, mid_arg: ua.Variant | None):
        """Part 9 5.5.7/5.5.8: RefreshStart, every retained condition that passes the item's
        filter, RefreshEnd; the bracket to every event item of the subscription, unfiltered."""
        try:
            sub_id = int(sub_arg.Value)
            mid = int(mid_arg.Value) if mid_arg is not None else None
        except (TypeError, ValueError):
            return ua.StatusCode(SC.BadTypeMismatch)
        sub = self.iserver.subscription_service.subscriptions.get(sub_id)
        if sub is None:
            return ua.StatusCode(SC.BadSubscriptionIdInvalid)
        from gateway.server import CURRENT_SESSION  # not at import: server.py imports this module

        session = CURRENT_SESSION.get()
        if session is not None and sub.session_id != session.session_id:
            return ua.StatusCode(SC.BadSubscriptionIdInvalid)  # "part of the Session that is invoking"
        mis = sub.monitored_item_srv
        items = {m: node for node, mids in mis._monitored_events.items() for m in mids if m in mis._monitored_items}
        if mid is not None:
            if mid not in mis._monitored_items:
                return ua.StatusCode(SC.BadMonitoredItemIdInvalid)
            items = {mid: items[mid]} if mid in items else {}
        if not items:
            return ua.StatusCode(SC.BadNothingToDo)
        if sub_id in self._refreshing:
            return ua.StatusCode(SC.BadRefreshInProgress)
        self._refreshing.add(sub_id)
        try:
            start, end = self._system_event(event_objects.RefreshStartEvent), self._system_event(
                event_objects.RefreshEndEvent)
            for m in items:
                await self._enqueue_unfiltered(mis, m, start)
            for cond in list(self.conditions.values()):
                ev = cond.last_event
                if ev is None or not ev.Retain:
                    continue
                for m, node in items.items():
                    if node in cond.notifiers:
                        copy_ = copy.copy(ev)
                        copy_.emitting_node = node
                        await mis._trigger_event(copy_, m)  # the item's where clause applies
            for m in items:
                await self._enqueue_unfiltered(mis, m, end)
        finally:
            self._refreshing.discard(sub_id)
        return []

    @staticmethod
    def _system_event(cls) -> Event:
        now = datetime.now(timezone.utc)
        ev = cls()
        for name, value, vtype in (("EventId", uuid.uuid4().bytes, _V.ByteString), ("SourceNode", SERVER_NODE, _V.NodeId),
                                   ("SourceName", "Server", _V.String), ("Time", now, _V.DateTime),
                                   ("ReceiveTime", now, _V.DateTime), ("Message", _lt(cls.__name__), _V.LocalizedText),
                                   ("Severity", 1, _V.UInt16)):
            set_field(ev, name, value, vtype)
        ev.emitting_node = SERVER_NODE
        return ev

    @staticmethod
    async def _enqueue_unfiltered(mis, mid: int, ev: Event) -> None:
        mdata = mis._monitored_items.get(mid)
        if mdata is None:
            return
        fields = ua.EventFieldList(ClientHandle=mdata.client_handle,
                                   EventFields=ev.to_event_fields(mdata.filter.SelectClauses))
        await mis.isub.enqueue_event(mid, fields, mdata.queue_size)

    # ---- introspection -----------------------------------------------------------------------
    def active_conditions(self) -> list[Condition]:
        return [c for c in self.conditions.values() if c.active]

    def condition_of(self, device: str, type_name: str) -> Condition | None:
        return self.conditions.get((device, type_name))


def spec_description(type_name: str) -> str:
    t = ALARM_TYPES.get(type_name)
    return t.description if t is not None else type_name


async def attach(gateway_server) -> AlarmEngine:
    """Start alarms and audit events on a GatewayServer whose address space is built.

    Uses `gateway_server.server` (asyncua Server), `.model` (SiteModel), `.site`, `.table`
    (point table: the engine becomes one of its sinks) and `.commands.audit` (AuditLog: its
    records become audit events; Acknowledge & co. are written to it). Returns the engine; the
    caller stops it with `await engine.stop()` before stopping the server.
    """
    if gateway_server.model is None:
        raise RuntimeError("attach alarms after the site's address space is built")
    commands = getattr(gateway_server, "commands", None)
    engine = AlarmEngine(gateway_server.server, gateway_server.model, gateway_server.site, gateway_server.table,
                         audit=getattr(commands, "audit", None))
    await engine.start()
    return engine
