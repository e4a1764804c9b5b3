"""The alarm engine: rules evaluated on point-table changes, with delays, raising Part 9 conditions.

It is a sink of the point table (drivers/pointtable.py): its birth seeds every watched value,
each batch re-evaluates the rules whose inputs changed (one dict lookup per change for the ~14
watched point names), and a rule's new level is taken only after its on-delay (a higher level)
or off-delay (a lower one), checked every TICK_S. The CMCS raises and clears the PredictedFailure
alarm (`raise_predicted_failure()` / `clear_predicted_failure()`) and the LossOfRedundancy alarm
of a micro-ATS (`raise_loss_of_redundancy()` / `clear_loss_of_redundancy()`), on the server's event loop.
The rules are gateway/alarms/rules.py; the conditions, their events and methods
gateway/alarms/conditions.py. The gateway's wiring (gateway/app.py `Gateway.sinks`) attaches it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua

from drivers.pointtable import Birth, Change, Quality, Sink
from gateway.alarms.conditions import Condition, ConditionSet, loss_of_redundancy_severity
from gateway.alarms.rules import DELAYS_S, site_rules
from gateway.audit_events import AuditEventEmitter
from information_model.instantiate import SiteModel
from siteconfig.model import Site

log = logging.getLogger(__name__)

_V = ua.VariantType
_OID = ua.ObjectIds

TICK_S = 0.5  # how often pending on/off-delays are checked


class AlarmEngine(ConditionSet, Sink):
    """Conditions from point-table values and from the CMCS; Part 9 methods; events."""

    name = "alarms"
    kind = "lossless"  # every batch is evaluated inline, in order: it never falls behind

    def __init__(self, server: Server, model: SiteModel, site: Site, *, audit=None,
                 caller: Callable[[], tuple[str, str]] | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(server, model, audit=audit, caller=caller)
        self.site = site
        self.clock = clock
        self._values: dict[tuple[str, str], Any] = {}
        self._watch: dict[str, dict[str, list[Condition]]] = {}  # point -> device -> conditions it triggers
        self._pending: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task] = []
        self.audit_events: AuditEventEmitter | None = None
        self.evaluations = 0
        self._stopped = False

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Conditions of every rule, the Part 9 methods, audit events; then attach it to the point table."""
        self.start_conditions()
        self._add_rules(site_rules(self.site, self.model.device_kinds))
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

    def _add_rules(self, rules) -> None:
        for rule in rules:
            cond = self._condition(rule.device, rule.type_name)
            cond.rule = rule
            if rule.input_point is not None:
                cond.input_node = self.model.points.get((rule.device, rule.input_point), ua.NodeId())
            for device, point in rule.inputs:
                self._watch.setdefault(point, {}).setdefault(device, []).append(cond)
            for device, point in rule.passive:
                self._watch.setdefault(point, {}).setdefault(device, [])

    # ---- a site reload (gateway/reload.py) ---------------------------------------------------------
    def add_devices(self, site: Site, devices: set[str]) -> None:
        """The rules of devices a reload added (already in the address space and the point table);
        their values come with the first polls."""
        self.site = site
        self._add_rules([r for r in site_rules(site, self.model.device_kinds) if r.device in devices])

    async def remove_devices(self, site: Site, devices: set[str]) -> None:
        """Forget the conditions of devices a reload removes, before their nodes are deleted: one
        that is active or unacknowledged is sent once more, inactive and acknowledged (Retain
        false), so that alarm lists drop it."""
        self.site = site
        gone = [cond for key, cond in self.conditions.items() if key[0] in devices]
        for cond in gone:
            if cond.retain:
                cond.active, cond.acked, cond.level = False, True, 0
                cond.message = f"{cond.device} removed from the site"
                self._publish(cond)
        await self.drain()  # the events (and their condition nodes' values) are out before the nodes go
        for cond in gone:
            key = (cond.device, cond.type_name)
            del self.conditions[key]
            self.by_node.pop(cond.node_id, None)
            self._pending.discard(key)
            self._notifier_linked.discard(cond.source_node)
        for by_device in self._watch.values():
            for device in devices:
                by_device.pop(device, None)
        for key in [k for k in self._values if k[0] in devices]:
            del self._values[key]

    async def stop(self) -> None:
        self._stopped = True
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
    def attach(self, birth: Birth) -> None:
        """The birth: every watched value the table holds, then every rule evaluated once."""
        for point, by_device in self._watch.items():
            for device in by_device:
                pv = birth.values.get(device, {}).get(point)
                if pv is not None:
                    self._values[(device, point)] = pv.value if pv.quality is Quality.GOOD else None
        now = self.clock()
        for cond in list(self.conditions.values()):
            if cond.rule is not None:
                self._evaluate(cond, now)

    def changes(self, batch: list[Change]) -> None:
        """One dict lookup per change for the ~14 watched point names; others are skipped."""
        if self._stopped:
            return
        watch = self._watch
        dirty: set[int] | None = None
        conds: list[Condition] = []
        for c in batch:
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

    on_changes = changes  # the name it had as a bare function sink

    def stats(self) -> dict[str, int | float]:
        return {"queued": self._queue.qsize() if self._queue is not None else 0, "evaluations": self.evaluations,
                "events": self.events_emitted}

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

    # ---- the CMCS's loss-of-redundancy warnings -----------------------------------------------
    def raise_loss_of_redundancy(self, unit: str, path_at_risk: str, ride_through_s: float, path_gone: bool,
                                 message: str | None = None) -> ua.NodeId:
        """Raise (or update) the LossOfRedundancy alarm of the micro-ATS `unit`, whose second path
        `path_at_risk` (a PDB segment or source) is at risk or gone (`path_gone`); `ride_through_s`
        is how long its DES can carry it alone. Returns its ConditionId. Severity:
        `loss_of_redundancy_severity` (a new level needs a new acknowledgement). Call on the server's event loop."""
        if self.model.device_kinds.get(unit) != "ats":
            raise KeyError(f"no micro-ATS {unit!r} in the address space")
        if not float(ride_through_s) >= 0.0:
            raise ValueError(f"ride_through_s must be >= 0, got {ride_through_s}")
        cond = self._condition(unit, "LossOfRedundancyAlarmType")
        ride = float(ride_through_s)
        severity = loss_of_redundancy_severity(bool(path_gone), ride)
        level = 1 + (severity > 400) + (severity > 600) + (severity > 800)  # Part 9 severity ranges
        carry = f"its DES can carry it {ride / 60.0:.0f} min" if ride > 0 else "no DES can carry it"
        text = message or (f"{unit}: second path {path_at_risk} {'gone' if path_gone else 'at risk'}; "
                           f"one more failure drops the load; {carry}")
        extra = {"RideThroughTime": (ride, _V.Double), "PathAtRisk": (str(path_at_risk), _V.String)}
        if cond.active and cond.extra == extra and cond.severity == severity and cond.message == text:
            return cond.node_id
        cond.extra = extra
        if cond.input_node.is_null():
            cond.input_node = self.model.points.get((unit, "ActiveSource"), ua.NodeId())
        if not cond.active or level != cond.level:
            self._set_level(cond, level, severity, text)
        else:  # same level, new figures (the ride-through moved): an update, no new acknowledgement
            cond.message = text
            if severity != cond.severity:
                cond.last_severity, cond.severity, cond.severity_ts = cond.severity, severity, datetime.now(timezone.utc)
            self._publish(cond)
        return cond.node_id

    def clear_loss_of_redundancy(self, unit: str) -> None:
        """Return the LossOfRedundancy alarm of `unit` to normal (it stays until acknowledged)."""
        cond = self.conditions.get((unit, "LossOfRedundancyAlarmType"))
        if cond is not None and cond.active:
            self._set_level(cond, 0, cond.severity, f"{unit}: both paths available again")


async def attach(gateway_server) -> AlarmEngine:
    """Start alarms and audit events on a GatewayServer whose address space is built.

    Uses `gateway_server.server` (asyncua Server), `.model` (SiteModel), `.site` and
    `.commands.audit` (AuditLog: its records become audit events; Acknowledge & co. are written
    to it). Returns the engine, a point-table sink the gateway's wiring attaches
    (gateway/app.py `Gateway.sinks`); the caller stops it with `await engine.stop()` before
    stopping the server.
    """
    if gateway_server.model is None:
        raise RuntimeError("attach alarms after the site's address space is built")
    commands = getattr(gateway_server, "commands", None)
    engine = AlarmEngine(gateway_server.server, gateway_server.model, gateway_server.site,
                         audit=getattr(commands, "audit", None))
    await engine.start()
    return engine
