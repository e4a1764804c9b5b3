"""Audit events (OPC UA Part 5 6.4.x, Part 9 5.10): every record of the audit log, as an event.

`AuditLog.write` calls its listeners with each record it appends (gateway/commands.py); this
module turns a record into an event notified through the Server object:

| record `method`                | EventType                                   | SourceName (spec)       |
|--------------------------------|---------------------------------------------|-------------------------|
| a method of the site's objects | AuditUpdateMethodEventType (i=2127)         | "Attribute/Call"        |
| "Write"                        | AuditWriteUpdateEventType (i=2100)          | "Attribute/Write"       |
| "Acknowledge"                  | AuditConditionAcknowledgeEventType (i=8944) | "Method/Acknowledge"    |
| "AddComment"                   | AuditConditionCommentEventType (i=2829)     | "Method/AddComment"     |
| "Enable" / "Disable"           | AuditConditionEnableEventType (i=2803)      | "Method/Enable|Disable" |

Fields: ActionTimeStamp, Status (Boolean: the call's StatusCode was Good), ServerId (the server's
ApplicationUri), ClientUserId (record `user`), plus MethodId / InputArguments / StatusCodeId /
OutputArguments for calls and AttributeId / OldValue / NewValue for writes.

Record keys read (all optional except `method`): `user`, `method`, `object` (device name as in
`SiteModel.device_nodes`), `arguments` (dict, in the method's argument order), `outputs` (list),
`status` (StatusCode name, e.g. "Good", "BadTooManyOperations"); for writes `node` (NodeId string)
or `object` + `point` (BrowseName of the variable) or `object` = "<device>.<point>", `value` or `arguments["Value"]`, `old_value`;
for condition methods `condition` (ConditionId string) and `event_id` (hex).

The listener is synchronous and may be called from any thread: it only queues the record; one
task on the server's loop builds and sends the events in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua
from asyncua.common import event_objects
from asyncua.common.events import Event

from information_model.instantiate import SiteModel

log = logging.getLogger(__name__)

_V = ua.VariantType
SERVER_NODE = ua.NodeId(ua.ObjectIds.Server)
SEVERITY_AUDIT_GOOD = 100  # Part 9 ranges: 1-200 "Low"; an audit record is information
SEVERITY_AUDIT_REFUSED = 300  # a refused control action is worth a look (201-400 "Medium Low")

# Condition methods (Part 9) -> (event class, MethodId)
_CONDITION_METHODS = {
    "Acknowledge": (event_objects.AuditConditionAcknowledgeEvent, ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
    "AddComment": (event_objects.AuditConditionCommentEvent, ua.ObjectIds.ConditionType_AddComment),
    "Enable": (event_objects.AuditConditionEnableEvent, ua.ObjectIds.ConditionType_Enable),
    "Disable": (event_objects.AuditConditionEnableEvent, ua.ObjectIds.ConditionType_Disable),
}


def _status(name: Any) -> ua.StatusCode:
    if isinstance(name, ua.StatusCode):
        return name
    if isinstance(name, int):
        return ua.StatusCode(name)
    code = getattr(ua.StatusCodes, str(name or "Good"), None)
    return ua.StatusCode(code if code is not None else ua.StatusCodes.Bad)


def _variant(value: Any, vtype: ua.VariantType | None = None) -> ua.Variant:
    """A Variant for an argument value, in the method's declared type where known."""
    if isinstance(value, ua.Variant):
        return value
    if value is None:
        return ua.Variant()
    try:
        if vtype in (_V.Double, _V.Float):
            return ua.Variant(float(value), vtype)
        if vtype == _V.Boolean:
            return ua.Variant(bool(value), vtype)
        if vtype is not None and vtype in _INTEGER_VARIANTS:
            return ua.Variant(int(value), vtype)
        if vtype == _V.String:
            return ua.Variant(str(value), vtype)
    except (TypeError, ValueError):
        pass
    if isinstance(value, bool):
        return ua.Variant(value, _V.Boolean)
    if isinstance(value, int):
        return ua.Variant(int(value), _V.Int64)
    if isinstance(value, float):
        return ua.Variant(value, _V.Double)
    return ua.Variant(str(value), _V.String)


_INTEGER_VARIANTS = {_V.SByte, _V.Byte, _V.Int16, _V.UInt16, _V.Int32, _V.UInt32, _V.Int64, _V.UInt64}


def set_field(ev: Event, name: str, value: Any, vtype: ua.VariantType) -> None:
    """Set an event field with an explicit VariantType (asyncua's generated classes type some
    fields by DataType NodeId, e.g. UtcTime, which a Variant cannot carry)."""
    ev.add_property(name, value, vtype)


async def trigger(server: Server, event: Event, notifier: ua.NodeId = SERVER_NODE) -> None:
    """Queue `event` for every event MonitoredItem on `notifier` (its where clause applies)."""
    event.emitting_node = notifier
    for sub in list(server.iserver.subscription_service.subscriptions.values()):
        await sub.monitored_item_srv.trigger_event(event)


class AuditEventEmitter:
    """AuditLog listener that notifies each record as an audit event on the Server object."""

    def __init__(self, server: Server, model: SiteModel, server_uri: str = ""):
        self.server = server
        self.model = model
        self.server_uri = server_uri
        self.emitted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._queue: asyncio.Queue[dict] | None = None
        self._task: asyncio.Task | None = None
        self._audit = None

    def start(self, audit_log) -> None:
        """Listen to `audit_log` (gateway.commands.AuditLog); call on the server's loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="audit events")
        self._audit = audit_log
        audit_log.listeners.append(self.on_record)

    async def stop(self) -> None:
        if self._audit is not None and self.on_record in self._audit.listeners:
            self._audit.listeners.remove(self.on_record)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def drain(self) -> None:
        """Wait until every record queued so far has been notified."""
        if self._queue is not None:
            await self._queue.join()

    # ---- the listener ------------------------------------------------------------------------
    def on_record(self, record: dict) -> None:
        if self._queue is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._queue.put_nowait(record)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, record)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            record = await self._queue.get()
            try:
                event = self.build(record)
                if event is not None:
                    await trigger(self.server, event)
                    self.emitted += 1
            except Exception:  # noqa: BLE001 - one odd record must not stop the audit events
                log.exception("audit event for %r failed", record)
            finally:
                self._queue.task_done()

    # ---- records -> events -----------------------------------------------------------------
    def build(self, record: dict) -> Event | None:
        method = record.get("method")
        if not method:
            return None
        if method == "Write":
            return self._write_event(record)
        if method in _CONDITION_METHODS and record.get("condition"):
            return self._condition_event(record)
        return self._method_event(record)

    def _common(self, ev: Event, record: dict, source: ua.NodeId, source_name: str, message: str) -> None:
        now = datetime.now(timezone.utc)
        status = _status(record.get("status"))
        set_field(ev, "EventId", uuid.uuid4().bytes, _V.ByteString)
        set_field(ev, "SourceNode", source, _V.NodeId)
        set_field(ev, "SourceName", source_name, _V.String)
        set_field(ev, "Time", now, _V.DateTime)
        set_field(ev, "ReceiveTime", now, _V.DateTime)
        set_field(ev, "Message", ua.LocalizedText(message), _V.LocalizedText)
        set_field(ev, "Severity", SEVERITY_AUDIT_GOOD if status.is_good() else SEVERITY_AUDIT_REFUSED, _V.UInt16)
        set_field(ev, "ActionTimeStamp", now, _V.DateTime)
        set_field(ev, "Status", status.is_good(), _V.Boolean)
        set_field(ev, "ServerId", self.server_uri, _V.String)
        set_field(ev, "ClientAuditEntryId", str(record.get("audit_entry_id") or ""), _V.String)
        set_field(ev, "ClientUserId", str(record.get("user") or ""), _V.String)

    def _method_event(self, record: dict) -> Event:
        method, device = record["method"], record.get("object")
        info = self.model.methods.get((device, method)) if device is not None else None
        source = self.model.device_nodes.get(device, ua.NodeId()) if device is not None else ua.NodeId()
        args = record.get("arguments") or {}
        types = {a.name: a.variant_type for a in info.inputs} if info is not None else {}
        order = [a.name for a in info.inputs] if info is not None else list(args)
        inputs = [_variant(args[name], types.get(name)) for name in order if name in args]
        inputs += [_variant(v) for k, v in args.items() if k not in order]
        out_types = [a.variant_type for a in info.outputs] if info is not None else []
        outputs = [_variant(v, out_types[i] if i < len(out_types) else None)
                   for i, v in enumerate(record.get("outputs") or [])]
        status = _status(record.get("status"))
        ev = event_objects.AuditUpdateMethodEvent()
        self._common(ev, record, source, "Attribute/Call",
                     f"{method} on {device} by {record.get('user') or '?'}: {status.name}")
        set_field(ev, "MethodId", info.method_id if info is not None else ua.NodeId(), _V.NodeId)
        set_field(ev, "InputArguments", inputs, _V.Variant)
        set_field(ev, "StatusCodeId", status, _V.StatusCode)
        set_field(ev, "OutputArguments", outputs, _V.Variant)
        return ev

    def _condition_event(self, record: dict) -> Event:
        method = record["method"]
        cls, method_id = _CONDITION_METHODS[method]
        condition = ua.NodeId.from_string(record["condition"])
        args = record.get("arguments") or {}
        status = _status(record.get("status"))
        ev = cls()
        self._common(ev, record, condition, f"Method/{method}",
                     f"{method} of {record.get('object', condition.to_string())} by {record.get('user') or '?'}: "
                     f"{status.name}")
        inputs = []
        event_id = bytes.fromhex(record["event_id"]) if record.get("event_id") else None
        if event_id is not None:
            inputs.append(ua.Variant(event_id, _V.ByteString))
        if "Comment" in args:
            inputs.append(ua.Variant(ua.LocalizedText(str(args["Comment"])), _V.LocalizedText))
        set_field(ev, "MethodId", ua.NodeId(method_id), _V.NodeId)
        set_field(ev, "InputArguments", inputs, _V.Variant)
        set_field(ev, "StatusCodeId", status, _V.StatusCode)
        if method in ("Acknowledge", "AddComment"):
            set_field(ev, "ConditionEventId", event_id, _V.ByteString)
            set_field(ev, "Comment", ua.LocalizedText(str(args.get("Comment", ""))), _V.LocalizedText)
        return ev

    def _write_event(self, record: dict) -> Event:
        node = None
        if record.get("node"):
            try:
                node = ua.NodeId.from_string(str(record["node"]))
            except Exception:  # noqa: BLE001 - an unparsable id is still audited, without a node
                node = None
        device, point = record.get("object"), record.get("point")
        if point is None and isinstance(device, str) and "." in device:
            device, point = device.rsplit(".", 1)  # gateway.server writes "Cmcs.RiskThreshold"
        if node is None and device is not None and point:
            node = self.model.points.get((device, point))
        vtype = self.model.point_types.get(node) if node is not None else None
        args = record.get("arguments") or {}
        new = record.get("value", args.get("Value"))
        status = _status(record.get("status"))
        ev = event_objects.AuditWriteUpdateEvent()
        what = f"{device}.{point}" if point else (node.to_string() if node is not None else "?")
        self._common(ev, record, node or ua.NodeId(), "Attribute/Write",
                     f"Write {what} = {new!r} by {record.get('user') or '?'}: {status.name}")
        set_field(ev, "AttributeId", int(ua.AttributeIds.Value), _V.UInt32)
        set_field(ev, "IndexRange", "", _V.String)
        old_v, new_v = _variant(record.get("old_value"), vtype), _variant(new, vtype)
        set_field(ev, "OldValue", old_v.Value, old_v.VariantType)
        set_field(ev, "NewValue", new_v.Value, new_v.VariantType)
        return ev
