"""`cmcs status`: a live terminal view of a running gateway, as an OPC UA client (docs/interface.md section 2).

    cmcs status --endpoint opc.tcp://gw1:4840/cmcs --user olga          # password asked on the terminal
    cmcs status --certificate me.der --private-key me.pem              # X509 user token

It talks OPC UA only, like any SCADA client: it finds the site's objects by browsing and by their
TypeDefinition, subscribes to their values and to events on the Server object (alarms through
ConditionRefresh, audit events for commands, the CMCS's advice), and reads Diagnostics every two
seconds. Keys: Up/Down (or k/j) select an alarm, `a` acknowledges it, `0`/`1`/`2` set the CMCS mode
Manual/Advisory/Automatic, `q` quits. What the server refuses (a Viewer acknowledging, an
Operator setting the mode) is shown on the bottom line with its StatusCode, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from asyncua import Client, Node, ua
from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from siteconfig.errors import CliError
from cmcs.identity import SECURITY_POLICIES, client_identity

log = logging.getLogger(__name__)

TYPES_URI = "urn:cmcs-gateway:UA:PowerDistribution"
SITE_URI_PREFIX = "urn:cmcs-gateway:site:"
DERATED_LOADING_PCT = 80.0  # NEC 210.20(A): continuous load at most 80 % of rating (docs/domain.md)
SOURCE_LETTER = {0: "-", 1: "A", 2: "B"}
ATS_STATES = ("Normal", "Transferring", "Bridging", "Fault", "Offline")
STORAGE_MODES = ("Standby", "Charging", "Bridging", "Smoothing", "Fault")
CMCS_MODES = ("Manual", "Advisory", "Automatic")
SOURCE_VARS = ("Voltage", "ActivePower", "RatedPower", "Available", "RiskScore")
PDB_VARS = ("Feed", "Current", "RatedCurrent", "Loading", "RiskScore")
UNIT_VARS = ("ActiveSource", "PreferredSource", "State", "RiskScore", "LoadPower")
STORAGE_VARS = ("StateOfCharge", "Mode")
CMCS_VARS = ("Mode", "RiskThreshold", "CycleTime", "ModelVersion", "ActiveMitigations")
HEALTH_VARS = ("Connected", "PollDuration", "Overruns", "LastError")
RECENT_EVENTS = 8
AISLE_WIDTH = 58  # columns one aisle's table needs to show every column in full


@dataclass
class Alarm:
    condition: ua.NodeId
    source: str
    name: str
    severity: int
    message: str
    active: bool
    acked: bool
    event_id: bytes
    time: object = None


@dataclass
class SiteView:
    """What the screen shows, kept up to date by the subscriptions (plain data: render() reads it)."""

    site: str = ""
    sources: dict[str, dict] = field(default_factory=dict)
    pdbs: dict[str, dict] = field(default_factory=dict)  # name -> {"aisle": .., vars}
    units: dict[str, dict] = field(default_factory=dict)  # name -> {"aisle": .., vars, "Storage.<var>"}
    aisles: list[str] = field(default_factory=list)
    cmcs: dict = field(default_factory=dict)
    health: dict[str, dict] = field(default_factory=dict)
    alarms: dict[str, Alarm] = field(default_factory=dict)  # ConditionId string -> alarm
    events: deque = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    selected: int = 0
    line: str = ""
    connected: bool = False
    user: str = ""

    def alarm_list(self) -> list[Alarm]:
        return sorted(self.alarms.values(), key=lambda a: (-a.active, a.acked, -a.severity, a.source))


# ---- rendering ---------------------------------------------------------------------------------------
def _num(value, fmt: str = "{:.0f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _bar(pct: float | None, width: int = 20) -> Text:
    """Loading against the 80 % derated limit: a bar with the limit marked '|'."""
    text = Text()
    if pct is None:
        return Text("-" * width, style="dim")
    filled = max(0, min(width, round(width * pct / 100.0)))
    limit = round(width * DERATED_LOADING_PCT / 100.0)
    style = "red" if pct >= DERATED_LOADING_PCT else "yellow" if pct >= 0.8 * DERATED_LOADING_PCT else "green"
    for i in range(width):
        if i == limit:
            text.append("|", style="bold")
        elif i < filled:
            text.append("#", style=style)
        else:
            text.append(".", style="dim")
    return text


def render(view: SiteView, width: int = 120) -> Layout:
    """The whole screen from the current view, laid out for a terminal `width` columns wide."""
    layout = Layout()
    wide = width >= 140
    alarm_rows = min(max(len(view.alarms), 1), 12) + 3  # the alarm list is never squeezed out
    parts = [Layout(name="top", size=max(7, 2 + 2 * len(view.sources))), Layout(name="aisles", ratio=1)]
    if wide:
        parts.append(Layout(name="bottom", size=max(alarm_rows, RECENT_EVENTS + 2)))
    else:  # a narrow terminal: the alarms get the whole width, commands and health share a row
        parts += [Layout(name="alarms", size=alarm_rows), Layout(name="more", size=RECENT_EVENTS // 2 + 2)]
    parts.append(Layout(name="line", size=1))
    layout.split_column(*parts)
    layout["top"].split_row(Layout(_feeds(view, bar_width=20 if width >= 120 else 10), name="feeds", ratio=3),
                            Layout(_cmcs(view), name="cmcs", size=30 if width >= 120 else 24))
    layout["aisles"].update(_aisles(view, per_row=max(1, (width - 4) // AISLE_WIDTH)))
    if wide:
        layout["bottom"].split_row(Layout(_alarms(view), ratio=3), Layout(_events(view), ratio=3),
                                   Layout(_health(view), ratio=2))
    else:
        layout["alarms"].update(_alarms(view))
        layout["more"].split_row(Layout(_events(view), ratio=3), Layout(_health(view), ratio=2))
    state = "connected" if view.connected else "reconnecting"
    keys = "keys: up/down select alarm, a acknowledge, 0/1/2 CMCS Manual/Advisory/Automatic, q quit"
    layout["line"].update(Text(f"[{state} as {view.user}] {view.line or keys}", overflow="ellipsis", no_wrap=True))
    return layout


def _feeds(view: SiteView, bar_width: int = 20) -> Panel:
    table = Table.grid(padding=(0, 1), expand=True)
    for ratio, min_width in ((None, 6), (None, 7), (None, bar_width), (1, None), (None, 9)):
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=ratio, min_width=min_width)
    for i, (name, v) in enumerate(sorted(view.sources.items())):
        letter = "AB"[i] if i < 2 else str(i)
        power, rated = v.get("ActivePower"), v.get("RatedPower")
        pct = 100.0 * power / rated if power is not None and rated else None
        available = v.get("Available")
        table.add_row(Text(f"Feed {letter}", style="bold"), name, _bar(pct, bar_width),
                      f"{_num(pct)} % of {_num(rated)} kW ({_num(power)} kW, {_num(v.get('Voltage'))} V)",
                      Text("available" if available else "LOST" if available is not None else "?",
                           style="green" if available else "bold red"))
        by_pdb = [(p, pv) for p, pv in sorted(view.pdbs.items()) if pv.get("Feed") == i + 1]
        worst = max(by_pdb, key=lambda item: item[1].get("Loading") or 0.0, default=None)
        if worst is not None:
            table.add_row("", "busiest PDB", _bar(worst[1].get("Loading"), bar_width),
                          f"{_num(worst[1].get('Loading'))} % {worst[0]} ({_num(worst[1].get('Current'))} A of "
                          f"{_num(worst[1].get('RatedCurrent'))} A)", "")
    return Panel(table, title=f"Feeds - loading against {DERATED_LOADING_PCT:.0f} % ({view.site})")


def _cmcs(view: SiteView) -> Panel:
    v = view.cmcs
    mode = v.get("Mode")
    rows = [f"Mode       {CMCS_MODES[mode] if isinstance(mode, int) and 0 <= mode < 3 else '-'}",
            f"Threshold  {_num(v.get('RiskThreshold'), '{:.2f}')}",
            f"Cycle      {_num(v.get('CycleTime'), '{:.0f}')} ms",
            f"Mitigating {_num(v.get('ActiveMitigations'))}",
            f"Model      {v.get('ModelVersion') or '-'}"]
    return Panel("\n".join(rows), title="CMCS")


def _aisles(view: SiteView, per_row: int = 2):
    alarms_by_source: dict[str, list[Alarm]] = {}
    for a in view.alarms.values():
        if a.active or not a.acked:
            alarms_by_source.setdefault(a.source, []).append(a)
    tables = []
    for aisle in view.aisles:
        table = Table(title=aisle, expand=True, pad_edge=False, show_edge=False, box=None)
        for col in ("Unit", "Src", "State", "Risk", "kW", "SoC %", "Alarms"):
            table.add_column(col, no_wrap=True, overflow="ellipsis")
        for name, v in sorted(view.units.items()):
            if v.get("aisle") != aisle:
                continue
            state = v.get("State")
            state_text = ATS_STATES[state] if isinstance(state, int) and 0 <= state < len(ATS_STATES) else "-"
            active = SOURCE_LETTER.get(v.get("ActiveSource"), "?")
            preferred = SOURCE_LETTER.get(v.get("PreferredSource"), "?")
            risk = v.get("RiskScore")
            alarms = alarms_by_source.get(name, []) + alarms_by_source.get(v.get("storage_name", ""), [])
            table.add_row(name, active + ("" if active == preferred else f"({preferred})"),
                          Text(state_text, style="red" if state_text in ("Fault", "Offline") else ""),
                          Text(_num(risk, "{:.2f}"), style="red" if risk is not None and risk >= 0.5 else ""),
                          _num(v.get("LoadPower"), "{:.1f}"), _num(v.get("Storage.StateOfCharge")),
                          Text(", ".join(a.name for a in alarms), style="bold red" if alarms else ""))
        tables.append(table)
    grid = Table.grid(expand=True, padding=(0, 1))
    columns = max(1, min(per_row, len(tables)))
    for _ in range(columns):
        grid.add_column(ratio=1)
    for i in range(0, len(tables), columns):
        row = tables[i:i + columns]
        grid.add_row(*row, *([""] * (columns - len(row))))
    return Panel(grid, title="Aisles - micro-ATS units (Src: active, (preferred) when different)")


def _alarms(view: SiteView) -> Panel:
    table = Table(expand=True, show_edge=False, pad_edge=False, box=None)
    for col, ratio in (("", None), ("Source", None), ("Alarm", None), ("Sev", None), ("State", None), ("Message", 1)):
        table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=ratio)
    alarms = view.alarm_list()
    for i, a in enumerate(alarms):
        state = ("active" if a.active else "cleared") + ("" if a.acked else ", unacked")
        table.add_row(">" if i == view.selected else "", a.source, a.name, str(a.severity),
                      Text(state, style="bold red" if a.active and not a.acked else "yellow" if a.active else ""),
                      a.message)
    return Panel(table if alarms else Text("no active or unacknowledged alarm", style="green"),
                 title=f"Alarms ({sum(a.active for a in alarms)} active)")


def _events(view: SiteView) -> Panel:
    lines = [Text(f"{t} {text}", overflow="ellipsis", no_wrap=True, style=style) for t, text, style in view.events]
    return Panel(Group(*lines) if lines else Text("none yet", style="dim"), title="Recent commands and CMCS advice")


def _health(view: SiteView) -> Panel:
    up = sum(1 for v in view.health.values() if v.get("Connected"))
    table = Table(expand=True, show_edge=False, pad_edge=False, box=None)
    for col, ratio in (("Connection", 1), ("Up", None), ("Poll ms", None), ("Overruns", None)):
        table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=ratio)
    rows = sorted(view.health.items(), key=lambda item: (bool(item[1].get("Connected")), -(item[1].get("Overruns") or 0)))
    for name, v in rows[:8]:
        table.add_row(name, Text("yes" if v.get("Connected") else "NO", style="" if v.get("Connected") else "bold red"),
                      _num(v.get("PollDuration"), "{:.1f}"), _num(v.get("Overruns")))
    return Panel(table, title=f"Device health: {up}/{len(view.health)} connections up")


# ---- the OPC UA side ---------------------------------------------------------------------------------------
# Event fields shown (OPC UA Part 5 BaseEventType / AuditEventType, Part 9 condition types).
EVENT_FIELDS = ("EventId", "EventType", "SourceName", "Time", "Message", "Severity", "ConditionName", "Retain",
                "ActiveState/Id", "AckedState/Id", "ClientUserId", "ActionTimeStamp", "Status")


def event_filter() -> ua.EventFilter:
    """Select clauses for EVENT_FIELDS and the ConditionId (the `NodeId` of an event from a condition)."""
    evfilter = ua.EventFilter()
    for path in EVENT_FIELDS:
        op = ua.SimpleAttributeOperand()
        op.TypeDefinitionId = ua.NodeId(ua.ObjectIds.BaseEventType)
        op.BrowsePath = [ua.QualifiedName(part, 0) for part in path.split("/")]
        op.AttributeId = ua.AttributeIds.Value
        evfilter.SelectClauses.append(op)
    condition_id = ua.SimpleAttributeOperand()
    condition_id.TypeDefinitionId = ua.NodeId(ua.ObjectIds.ConditionType)
    condition_id.AttributeId = ua.AttributeIds.NodeId
    evfilter.SelectClauses.append(condition_id)
    return evfilter


class _Handler:
    def __init__(self, status: StatusClient) -> None:
        self.status = status

    def datachange_notification(self, node: Node, val, data) -> None:
        target = self.status.targets.get(node.nodeid)
        if target is not None:
            store, key = target
            store[key] = val.Value if isinstance(val, ua.LocalizedText) else val

    def event_notification(self, event) -> None:
        self.status.on_event(event)

    def status_change_notification(self, status) -> None:
        self.status.view.connected = False


@dataclass
class StatusOptions:
    endpoint: str
    certificate: Path | None = None
    private_key: Path | None = None
    username: str | None = None
    password: str | None = None
    security_policy: str = "Basic256Sha256"
    security_mode: str = "SignAndEncrypt"
    application_uri: str = "urn:cmcs-gateway:status"


class StatusClient:
    """Browse, subscribe and act over OPC UA; the screen reads `view`."""

    def __init__(self, options: StatusOptions) -> None:
        self.options = options
        self.view = SiteView(user=options.username or ("certificate" if options.certificate else "anonymous"))
        self.targets: dict[ua.NodeId, tuple[dict, str]] = {}
        self.health_nodes: list[tuple[dict, str, Node]] = []
        self.client: Client | None = None
        self.cmcs_node: Node | None = None
        self.types_ns = 0
        self._type_names: dict[ua.NodeId, str] = {}

    async def _connect(self) -> Client:
        o = self.options
        client = Client(o.endpoint, timeout=10)
        client.application_uri = o.application_uri
        client.name = client.description = "cmcs status"
        if o.security_policy != "None":
            await client.set_security(SECURITY_POLICIES[o.security_policy], str(o.certificate), str(o.private_key),
                                      mode=getattr(ua.MessageSecurityMode, o.security_mode))
        if o.username:
            client.set_user(o.username)
            client.set_password(o.password or "")
        elif o.certificate is not None and o.private_key is not None:
            await client.load_client_certificate(str(o.certificate))
            await client.load_private_key(Path(o.private_key))
        await client.connect()
        return client

    async def _children(self, node_id: ua.NodeId) -> list[ua.ReferenceDescription]:
        """Forward hierarchical references of a node: BrowseName, NodeClass and TypeDefinition in one Browse."""
        return await self.client.get_node(node_id).get_references(refs=ua.ObjectIds.HierarchicalReferences,
                                                                  direction=ua.BrowseDirection.Forward)

    async def _type_name(self, ref: ua.ReferenceDescription) -> str:
        typedef = ua.NodeId(ref.TypeDefinition.Identifier, ref.TypeDefinition.NamespaceIndex)
        if typedef not in self._type_names:
            self._type_names[typedef] = (await self.client.get_node(typedef).read_browse_name()).Name
        return self._type_names[typedef]

    async def _bind(self, refs: list[ua.ReferenceDescription], names: tuple[str, ...], store: dict,
                    prefix: str = "") -> list[Node]:
        """The variables `names` among `refs`, to be subscribed into `store`."""
        nodes = []
        for ref in refs:
            if ref.BrowseName.Name in names and ref.NodeClass == ua.NodeClass.Variable:
                self.targets[ref.NodeId] = (store, prefix + ref.BrowseName.Name)
                nodes.append(self.client.get_node(ref.NodeId))
        return nodes

    async def discover(self) -> list[Node]:
        """Find the site's instances by TypeDefinition; return the variables to subscribe to."""
        client, view = self.client, self.view
        namespaces = await client.get_namespace_array()
        site_uri = next((u for u in namespaces if u.startswith(SITE_URI_PREFIX)), None)
        if site_uri is None or TYPES_URI not in namespaces:
            raise CliError(f"{self.options.endpoint} is not a cmcs-gateway (no {SITE_URI_PREFIX}... namespace)")
        ns, self.types_ns = namespaces.index(site_uri), namespaces.index(TYPES_URI)
        view.site = site_uri[len(SITE_URI_PREFIX):]
        site = await client.nodes.objects.get_child(f"{ns}:{view.site}")
        nodes: list[Node] = []
        await self._walk(site.nodeid, nodes, aisle=None, depth=0)
        return nodes

    async def _walk(self, folder: ua.NodeId, nodes: list[Node], aisle: str | None, depth: int,
                    folder_name: str = "") -> None:
        """Instances by TypeDefinition, under the site's folders (Sources, Aisles/<aisle>, Diagnostics)."""
        view = self.view
        for ref in await self._children(folder):
            if ref.NodeClass != ua.NodeClass.Object:
                continue
            name = ref.BrowseName.Name
            kind = await self._type_name(ref)
            if kind in ("PowerSourceType", "DistributionBusType", "MicroAtsType", "CmcsType"):
                refs = await self._children(ref.NodeId)
                if kind == "PowerSourceType":
                    nodes += await self._bind(refs, SOURCE_VARS, view.sources.setdefault(name, {}))
                elif kind == "DistributionBusType":
                    nodes += await self._bind(refs, PDB_VARS, view.pdbs.setdefault(name, {"aisle": aisle}))
                elif kind == "CmcsType":
                    self.cmcs_node = self.client.get_node(ref.NodeId)
                    nodes += await self._bind(refs, CMCS_VARS, view.cmcs)
                else:
                    store = view.units.setdefault(name, {"aisle": aisle})
                    nodes += await self._bind(refs, UNIT_VARS, store)
                    for part in refs:
                        if part.NodeClass == ua.NodeClass.Object and await self._type_name(part) == "EnergyStorageType":
                            nodes += await self._bind(await self._children(part.NodeId), STORAGE_VARS, store,
                                                      prefix="Storage.")
            elif folder_name == "Diagnostics":
                store = view.health.setdefault(name, {})
                for var in await self._children(ref.NodeId):
                    if var.BrowseName.Name in HEALTH_VARS:
                        self.health_nodes.append((store, var.BrowseName.Name, self.client.get_node(var.NodeId)))
            elif kind == "FolderType" and depth < 3:
                is_aisle = folder_name == "Aisles"
                if is_aisle and name not in view.aisles:
                    view.aisles.append(name)
                await self._walk(ref.NodeId, nodes, aisle=name if is_aisle else aisle, depth=depth + 1,
                                 folder_name=name)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, discover, subscribe; on a lost connection try again every 2 s."""
        while not stop.is_set():
            try:
                t0 = time.monotonic()
                self.client = await self._connect()
                log.debug("connected in %.2f s", time.monotonic() - t0)
                try:
                    await self._session(stop)
                finally:
                    try:
                        await self.client.disconnect()
                    except Exception:  # noqa: BLE001 - it is gone already
                        pass
            except CliError:
                raise
            except ua.UaStatusCodeError as exc:
                name = ua.StatusCode(exc.code).name
                if name in LOGIN_REFUSALS:  # trying again would be refused again: say why and stop
                    raise CliError(f"{self.options.endpoint} refused this client: {name} ({LOGIN_REFUSALS[name]})") \
                        from None
                self._lost(exc)
                await _wait(stop, 2.0)
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError) as exc:
                self._lost(exc)
                await _wait(stop, 2.0)

    def _lost(self, exc: BaseException) -> None:
        self.view.connected = False
        self.view.line = f"cannot reach {self.options.endpoint}: {_reason(exc)}; trying again"

    async def _session(self, stop: asyncio.Event) -> None:
        self.targets.clear()
        self.health_nodes.clear()
        t0 = time.monotonic()
        nodes = await self.discover()
        log.debug("discovered %d variables in %.2f s", len(nodes), time.monotonic() - t0)
        handler = _Handler(self)
        sub = await self.client.create_subscription(500, handler)
        for i in range(0, len(nodes), 500):
            await sub.subscribe_data_change(nodes[i:i + 500])
        # every event (no where clause), with the fields this view shows: asyncua's own filter
        # builder browses the whole event type tree first, hundreds of round trips
        await sub.subscribe_events(self.client.nodes.server, evfilter=event_filter())
        self.view.line = ""
        try:  # the alarms already active (Part 9 ConditionRefresh)
            await self.client.get_node(ua.ObjectIds.ConditionType).call_method(
                ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                ua.Variant(sub.subscription_id, ua.VariantType.UInt32))
        except ua.UaStatusCodeError as exc:
            self.view.line = f"ConditionRefresh refused ({ua.StatusCode(exc.code).name}): only new alarms are shown"
        self.view.connected = True
        log.debug("subscribed in %.2f s", time.monotonic() - t0)
        while not stop.is_set():
            if self.health_nodes:
                values = await self.client.read_values([n for _, _, n in self.health_nodes])
                for (store, key, _), value in zip(self.health_nodes, values, strict=False):
                    store[key] = value
            await self.client.check_connection()
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except asyncio.TimeoutError:
                pass

    def on_event(self, ev) -> None:
        view = self.view
        event_type = getattr(ev, "EventType", None)
        if event_type in (ua.NodeId(ua.ObjectIds.RefreshStartEventType), ua.NodeId(ua.ObjectIds.RefreshEndEventType)):
            return
        message = getattr(ev, "Message", None)
        text = message.Text if isinstance(message, ua.LocalizedText) else str(message or "")
        when = getattr(ev, "Time", None)
        stamp = when.strftime("%H:%M:%S") if hasattr(when, "strftime") else time.strftime("%H:%M:%S")
        condition_name = getattr(ev, "ConditionName", None)
        condition = getattr(ev, "NodeId", None)
        if condition_name and isinstance(condition, ua.NodeId):
            key = condition.to_string()
            if getattr(ev, "Retain", True) is False:
                view.alarms.pop(key, None)
                return
            view.alarms[key] = Alarm(condition, str(getattr(ev, "SourceName", "")), str(condition_name),
                                     int(getattr(ev, "Severity", 0) or 0), text,
                                     bool(getattr(ev, "ActiveState/Id", False)), bool(getattr(ev, "AckedState/Id", False)),
                                     getattr(ev, "EventId", b""), when)
            return
        if text.startswith("CMCS advises"):
            view.events.appendleft((stamp, text, "cyan"))
        elif getattr(ev, "ClientUserId", None) is not None or getattr(ev, "ActionTimeStamp", None) is not None:
            ok = getattr(ev, "Status", True)
            view.events.appendleft((stamp, text, "" if ok else "yellow"))

    # ---- actions (keys) -------------------------------------------------------------------------------------
    async def acknowledge_selected(self) -> str:
        alarms = self.view.alarm_list()
        if not alarms:
            return "no alarm to acknowledge"
        alarm = alarms[min(self.view.selected, len(alarms) - 1)]
        if alarm.acked:
            return f"{alarm.source} {alarm.name} is already acknowledged"
        try:
            await self.client.get_node(alarm.condition).call_method(
                ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                ua.Variant(alarm.event_id, ua.VariantType.ByteString),
                ua.Variant(ua.LocalizedText(f"acknowledged in cmcs status by {self.view.user}"),
                           ua.VariantType.LocalizedText))
        except ua.UaStatusCodeError as exc:
            return f"Acknowledge {alarm.source} {alarm.name} refused: {_status_explained(exc.code)}"
        return f"acknowledged {alarm.source} {alarm.name}"

    async def set_mode(self, mode: int) -> str:
        if self.cmcs_node is None:
            return "no CMCS object on this server"
        try:
            await self.cmcs_node.call_method(f"{self.types_ns}:SetMode", ua.Variant(mode, ua.VariantType.Int32))
        except ua.UaStatusCodeError as exc:
            return f"SetMode({CMCS_MODES[mode]}) refused: {_status_explained(exc.code)}"
        return f"CMCS mode set to {CMCS_MODES[mode]}"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


LOGIN_REFUSALS = {
    "BadUserAccessDenied": "wrong user name or password, or this user may not log in",
    "BadIdentityTokenInvalid": "wrong user name or password",
    "BadIdentityTokenRejected": "this kind of login is switched off on the gateway",
    "BadCertificateUntrusted": "the gateway does not trust this client's certificate yet: on the gateway, "
                               "cmcs certs list, then cmcs certs trust <thumbprint>",
    "BadSecurityChecksFailed": "the gateway does not trust this client's certificate (cmcs certs trust on the "
                               "gateway) or the security policy is not offered",
    "BadSecurityPolicyRejected": "the gateway does not offer this --security policy",
    "BadCertificateUriInvalid": "--application-uri is not the certificate's SubjectAltName URI",
}


def _status_explained(code: int) -> str:
    name = ua.StatusCode(code).name
    why = {"BadUserAccessDenied": "your role may not do this",
           "BadInvalidState": "not possible in the current state (see Cmcs.ModelVersion for SetMode)",
           "BadEventIdUnknown": "the alarm changed meanwhile; try again",
           "BadConditionBranchAlreadyAcked": "already acknowledged"}.get(name)
    return f"{name} ({why})" if why else name


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# ---- the terminal -----------------------------------------------------------------------------------------
async def run_dashboard(status: StatusClient, console: Console, refresh_s: float = 1.0) -> None:
    """The screen and the keys until `q` or a signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    keys: asyncio.Queue[str] = asyncio.Queue()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = None
    if fd is not None:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        loop.add_reader(fd, lambda: keys.put_nowait(os.read(fd, 32).decode(errors="ignore")))
    client_task = asyncio.create_task(status.run(stop), name="opcua")
    view = status.view
    try:
        with Live(render(view, console.width), console=console, screen=True, auto_refresh=False) as live:
            while not stop.is_set():
                if client_task.done():
                    client_task.result()  # a CliError (not a gateway) ends the view with its line
                    break
                try:
                    data = await asyncio.wait_for(keys.get(), refresh_s)
                except asyncio.TimeoutError:
                    data = ""
                for key in _keys(data):
                    if key == "q":
                        stop.set()
                    elif key in ("up", "k"):
                        view.selected = max(0, view.selected - 1)
                    elif key in ("down", "j"):
                        view.selected = min(max(0, len(view.alarms) - 1), view.selected + 1)
                    elif key == "a" and view.connected:
                        view.line = await status.acknowledge_selected()
                    elif key in ("0", "1", "2") and view.connected:
                        view.line = await status.set_mode(int(key))
                view.selected = min(view.selected, max(0, len(view.alarms) - 1))
                live.update(render(view, console.width), refresh=True)
    finally:
        stop.set()
        if fd is not None:
            import termios

            loop.remove_reader(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        try:
            await asyncio.wait_for(client_task, 5)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - leaving anyway
            if isinstance(exc, CliError):
                raise


def _keys(data: str) -> list[str]:
    out = []
    i = 0
    while i < len(data):
        if data.startswith("\x1b[A", i):
            out.append("up")
            i += 3
        elif data.startswith("\x1b[B", i):
            out.append("down")
            i += 3
        else:
            out.append(data[i])
            i += 1
    return out


def options_from_args(args) -> StatusOptions:
    """The identity options of `cmcs agent`, checked by the same function (cmcs.identity.client_identity)."""
    identity = client_identity(args, default_uri="urn:cmcs-gateway:status")
    return StatusOptions(endpoint=args.endpoint, certificate=args.certificate, private_key=args.private_key,
                         username=args.user, password=identity.password, security_policy=identity.policy,
                         security_mode=identity.mode, application_uri=identity.application_uri)


def cli_status(args) -> int:
    options = options_from_args(args)
    if not sys.stdout.isatty():
        raise CliError("cmcs status is a terminal view: run it in a terminal")
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its warnings would tear the screen
    status = StatusClient(options)
    try:
        asyncio.run(run_dashboard(status, Console()))
    except KeyboardInterrupt:
        pass
    return 0
