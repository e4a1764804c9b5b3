"""The Part 9 condition machinery asyncua 2.1 lacks: condition instances, their events, their methods.

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

`ConditionSet` provides: Acknowledge / AddComment / Enable / Disable (i=9111, 9029, 9027, 9028)
bound to the type's methods, called with the ConditionId as ObjectId, role-checked through
gateway.security.AccessPolicy and audited; ConditionRefresh / ConditionRefresh2 (i=3875, 12912)
that check the subscription belongs to the caller's session, bracket the retained conditions
with RefreshStart/RefreshEnd events sent to every event MonitoredItem of the subscription
regardless of its filter (Part 9 4.5), and apply each item's filter to the conditions. The event
filter itself (OfType meaning "this type or a subtype", multi-element browse paths, the
ConditionId operand) is gateway.asyncua_hooks.SpecWhereClauseEvaluator. What raises and clears
the conditions is the engine (gateway/alarms/engine.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from asyncua import Server, ua
from asyncua.common import event_objects
from asyncua.common.events import Event
from asyncua.server.address_space import AddressSpace

from gateway.audit_events import set_field
from gateway.security import AccessPolicy
from gateway.session import CURRENT_SESSION
from gateway.session import caller as session_caller
from information_model import spec
from information_model.instantiate import SiteModel, write_values

if TYPE_CHECKING:
    from gateway.alarms.rules import Rule

log = logging.getLogger(__name__)

_V = ua.VariantType
_OID = ua.ObjectIds
SC = ua.StatusCodes

ALARM_TYPES = {t.name: t for t in spec.ALARM_TYPES}
CONDITION_NAMES = {"SourceLossAlarmType": "SourceLoss", "OverTemperatureAlarmType": "OverTemperature",
                   "OverloadAlarmType": "Overload", "PredictedFailureAlarmType": "PredictedFailure",
                   "LossOfRedundancyAlarmType": "LossOfRedundancy"}
CONDITION_CLASSES = {  # Part 9 5.9 condition classes
    "SourceLossAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "OverTemperatureAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "OverloadAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
    "PredictedFailureAlarmType": (_OID.MaintenanceConditionClassType, "MaintenanceConditionClassType"),
    # the state of the plant's paths, not of a device's health: IT acts on it (moves workloads)
    "LossOfRedundancyAlarmType": (_OID.ProcessConditionClassType, "ProcessConditionClassType"),
}
# LossOfRedundancy severities (Part 9 1-1000; same scale as gateway/alarms/rules.py): a second path at
# risk is a warning; gone, the next failure drops the load unless the DES carries it; gone with a
# ride-through too short for IT to move or shut down the workloads (issue 16: 15 min) is critical.
SEVERITY_REDUNDANCY_AT_RISK = 500
SEVERITY_REDUNDANCY_GONE = 700
SEVERITY_REDUNDANCY_GONE_SHORT = 900
RIDE_THROUGH_SHORT_S = 900.0
# Who may call what (docs/interface.md section 4 names no role for alarms: acknowledging and commenting
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


@dataclass
class Condition:
    """The state of one condition instance (Part 9 AlarmConditionType, no branches)."""

    device: str
    type_name: str
    node_id: ua.NodeId
    type_id: ua.NodeId
    source_node: ua.NodeId
    notifiers: tuple[ua.NodeId, ...]
    rule: Rule | None = None  # what raises it (None: raised by a call, e.g. the CMCS's prediction)
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

def loss_of_redundancy_severity(path_gone: bool, ride_through_s: float) -> int:
    """Severity of a LossOfRedundancy alarm: at risk < gone < gone with less than 15 min of ride-through."""
    if not path_gone:
        return SEVERITY_REDUNDANCY_AT_RISK
    return SEVERITY_REDUNDANCY_GONE_SHORT if ride_through_s < RIDE_THROUGH_SHORT_S else SEVERITY_REDUNDANCY_GONE


def _lt(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, "en")


def spec_description(type_name: str) -> str:
    t = ALARM_TYPES.get(type_name)
    return t.description if t is not None else type_name


class ConditionSet:
    """The condition instances of one server, their events and their Part 9 methods.

    `start_conditions()` binds the methods and links the notifiers; `_condition(device, type)`
    gets (or makes) a condition; `_publish(cond)` sends the event of its present state; the
    emitter task (`_emitter`) notifies the subscriptions, one event at a time, in order."""

    def __init__(self, server: Server, model: SiteModel, *, audit=None,
                 caller: Callable[[], tuple[str, str]] | None = None):
        self.server = server
        self.iserver = server.iserver
        self.aspace: AddressSpace = server.iserver.aspace
        self.model = model
        self.audit = audit  # gateway.commands.AuditLog: condition method calls are written there too
        self._caller = caller
        self.conditions: dict[tuple[str, str], Condition] = {}
        self.by_node: dict[ua.NodeId, Condition] = {}
        self._queue: asyncio.Queue | None = None
        self._refreshing: set[int] = set()
        self.events_emitted = 0
        self._notifier_linked: set[ua.NodeId] = set()
        self.type_ids: dict[str, ua.NodeId] = {}
        # called with the Condition each time its state is published (raise, clear, acknowledge..):
        # e.g. the Sparkplug edge node (gateway/sparkplug); must return at once
        self.listeners: list[Callable[[Condition], None]] = []

    def start_conditions(self) -> None:
        """The event queue, the alarm types' declarations, the Part 9 methods, Server -HasNotifier-> site."""
        self._queue = asyncio.Queue()
        self.type_ids = {name: self.model.type_ids.get(name) or ua.NodeId(t.nodeid, self.model.types_ns_index)
                         for name, t in ALARM_TYPES.items()}
        self._decls = {name: _mandatory_declarations(self.aspace, tid) for name, tid in self.type_ids.items()}
        self._bind_methods()
        self._add_reference(SERVER_NODE, ua.NodeId(_OID.HasNotifier), self.model.site_node)

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
        """(user, role) of the session calling now (gateway.session's unless given another)."""
        if self._caller is not None:
            return self._caller()
        return session_caller()

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
        arguments = {"Comment": comment or ""} if event_id is not None else {}
        if cond is None:
            status = SC.BadMethodInvalid if object_id in self.aspace else SC.BadNodeIdUnknown
        elif not AccessPolicy.allows(role, REQUIRED_ROLE[method]):
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
