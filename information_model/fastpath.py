"""The per-value path from a changed point to a subscribed client, without per-value overhead.

At 1,000 units (23,700 variables) every value a device read changes costs, in asyncua's own
path: a `Variant` (whose `__post_init__` re-checks what the caller already knows), a
`DataValue`, a `datetime` per timestamp, then per monitored item an awaited
`MonitoredItemService.datachange_callback` that builds a `MonitoredItemNotification` with a
throw-away default `DataValue`. Profiled with py-spy (docs/notes/asyncua.md, "Throughput"),
that was a third of the gateway's CPU. This module does the same work once per value:

- `point_datavalues`: DataValues of a batch of point changes, built field by field (the
  VariantType is the model's, so no guessing), one `datetime` per distinct source time;
- `notify`: the data-change notifications of a batch of written values, done synchronously
  for asyncua's own `MonitoredItemService` (the same checks: monitoring mode, trigger, deadband,
  queue size), one `_trigger_publish` per subscription per batch instead of per value; any other
  callback (a historian's, a test's) is awaited as before;
- `encode_datachange_notification`: the binary body of a DataChangeNotification (Part 6 5.2:
  the same bytes as asyncua's generic dataclass serializer, ~19 us per item here, in ~2 us):
  scalar numeric and Boolean values packed with one precompiled struct each, each distinct
  timestamp and StatusCode encoded once per notification batch. `install_fast_encoding`
  routes asyncua's `ua_binary.struct_to_binary` through it for that one class.

Everything here reads asyncua 2.1's attributes as `server/monitored_item_service.py` and
`server/internal_subscription.py` define them; `notify` checks the callback is that class's
unmodified method before taking the short way.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from asyncua import ua
from asyncua.server.monitored_item_service import MonitoredItemService
from asyncua.ua import ua_binary

_new = object.__new__
_Variant, _DataValue, _Notification = ua.Variant, ua.DataValue, ua.MonitoredItemNotification
_DOUBLE, _FLOAT, _BOOLEAN, _STRING = (ua.VariantType.Double, ua.VariantType.Float, ua.VariantType.Boolean,
                                      ua.VariantType.String)
_DISABLED = ua.MonitoringMode.Disabled
_STATUS_VALUE = ua.DataChangeTrigger.StatusValue
_ORIGINAL_DATACHANGE = MonitoredItemService.datachange_callback


def scalar_variant(value: Any, vtype: ua.VariantType) -> ua.Variant:
    """`ua.Variant(value, vtype)` for a non-null scalar whose Python type already fits `vtype`."""
    v = _new(_Variant)
    v.Value, v.VariantType, v.Dimensions, v.is_array = value, vtype, None, False
    return v


_NULL = ua.Variant()


def datavalue(variant: ua.Variant, status: ua.StatusCode, source_ts: datetime | None,
              server_ts: datetime | None) -> ua.DataValue:
    """`ua.DataValue(variant, StatusCode=..., SourceTimestamp=..., ServerTimestamp=...)`, field by field."""
    dv = _new(_DataValue)
    dv.Encoding, dv.Value, dv.StatusCode = 0, variant, status
    dv.SourceTimestamp, dv.ServerTimestamp, dv.SourcePicoseconds, dv.ServerPicoseconds = source_ts, server_ts, None, None
    return dv


def coerce(value: Any, vtype: ua.VariantType) -> Any:
    """The Python value a Variant of `vtype` holds (float for Double/Float, bool, str, else int)."""
    if vtype is _DOUBLE or vtype is _FLOAT:
        return value if type(value) is float else float(value)
    if vtype is _BOOLEAN:
        return value if type(value) is bool else bool(value)
    if vtype is _STRING:
        return value if type(value) is str else str(value)
    return value if type(value) is int else int(value)


def point_datavalues(changes: Iterable[Any], model: Any, nodes: Mapping[ua.NodeId, Any],
                     statuses: Mapping[Any, ua.StatusCode], server_ts: datetime) -> list[tuple]:
    """(NodeId, DataValue, Value AttributeValue) of each change (`.device .point .value .quality
    .source_ts`, epoch s) whose point is in the model (a SiteModel; `nodes`: the address space's
    `_nodes`), for `write_values`; the quality maps to its StatusCode through `statuses`."""
    out = []
    times: dict[float, datetime] = {}
    utc = timezone.utc
    fromts = datetime.fromtimestamp
    append = out.append
    slots = model.value_slots
    points, types = model.points, model.point_types
    value_attr = ua.AttributeIds.Value
    for c in changes:
        key = (c.device, c.point)
        slot = slots.get(key)
        if slot is None:
            nodeid = points.get(key)
            if nodeid is None:
                continue
            slot = slots[key] = (nodeid, types[nodeid], nodes[nodeid].attributes[value_attr])
        nodeid, vtype, attval = slot
        ts = c.source_ts
        source_dt = times.get(ts)
        if source_dt is None:
            source_dt = times[ts] = fromts(ts, utc)
        value = c.value
        variant = _NULL if value is None else scalar_variant(coerce(value, vtype), vtype)
        append((nodeid, datavalue(variant, statuses[c.quality], source_dt, server_ts), attval))
    return out


def _enqueue(srv: MonitoredItemService, handle: int, dv: ua.DataValue, triggered: set) -> bool:
    """`MonitoredItemService.datachange_callback(handle, dv)` without its awaits: True if handled."""
    mid = srv._monitored_datachange.get(handle)
    if mid is None:
        return False  # let asyncua's own method say what it says of an unknown handle
    mdata = srv._monitored_items[mid]
    if mdata.mode == _DISABLED:
        return True
    mvalue = mdata.mvalue
    mvalue.set_current_datavalue(dv)
    flt = mdata.filter
    if flt:
        passes = srv._is_data_changed(mvalue, flt.Trigger) and srv._is_deadband_exceeded(mvalue, flt)
    else:
        passes = srv._is_data_changed(mvalue, _STATUS_VALUE)
    if not passes:
        return True
    event = _new(_Notification)
    event.ClientHandle, event.Value = mdata.client_handle, dv
    isub = srv.isub
    queue = isub._triggered_datachanges
    items = queue.get(mid)
    if items is None:
        queue[mid] = [event]
        triggered.add(isub)
    else:
        size = mdata.queue_size
        if size != 0 and len(items) >= size:
            items.pop(0)
        items.append(event)
    return True


async def notify(pending: list[tuple[dict[int, Callable[..., Any]], ua.DataValue]], yield_every: int = 2000) -> int:
    """Deliver each written DataValue to its data-change callbacks; returns the notifications sent.

    asyncua's monitored items are served synchronously (see the module docstring); every other
    callback is awaited. The loop is yielded to every `yield_every` notifications."""
    sent = 0
    triggered: set = set()
    for callbacks, dv in pending:
        for handle, callback in list(callbacks.items()):
            if handle not in callbacks:  # its monitored item was deleted while we were awaiting (asyncua would
                continue  # raise KeyError and the rest of the batch would not be notified)
            if getattr(callback, "__func__", None) is _ORIGINAL_DATACHANGE and _enqueue(callback.__self__, handle,
                                                                                        dv, triggered):
                pass
            else:
                await callback(handle, dv)
            sent += 1
            if sent % yield_every == 0:
                for isub in triggered:
                    await isub._trigger_publish()
                triggered.clear()
                await asyncio.sleep(0)
    for isub in triggered:
        await isub._trigger_publish()
    return sent


# ---- encoding (OPC UA Part 6, 5.2 binary encoding) -------------------------------------------------
_VT = ua.VariantType
_SCALAR_STRUCT = {vt: struct.Struct(fmt) for vt, fmt in (
    (_VT.Boolean, "<?"), (_VT.SByte, "<b"), (_VT.Byte, "<B"), (_VT.Int16, "<h"), (_VT.UInt16, "<H"),
    (_VT.Int32, "<i"), (_VT.UInt32, "<I"), (_VT.Int64, "<q"), (_VT.UInt64, "<Q"), (_VT.Float, "<f"),
    (_VT.Double, "<d"))}
_SCALAR_PREFIX = {vt: bytes((vt.value,)) for vt in _SCALAR_STRUCT}
_pack_i32 = struct.Struct("<i").pack
_pack_u32 = struct.Struct("<I").pack
_pack_i64 = struct.Struct("<q").pack
# DataValue encoding mask bits (Part 6 5.2.2.17)
_HAS_VALUE, _HAS_STATUS, _HAS_SOURCE_TS, _HAS_SERVER_TS = 0x01, 0x02, 0x04, 0x08
_generic_datavalue = ua_binary.create_dataclass_serializer(ua.DataValue)
_generic_diagnostics = ua_binary.create_list_serializer(ua.DiagnosticInfo)
_encode_status = ua_binary.create_type_serializer(ua.StatusCode)
_variant_to_binary = ua_binary.variant_to_binary
_DCN = ua.DataChangeNotification


def _encode_datavalue(dv: ua.DataValue, times: dict, statuses: dict) -> bytes:
    if dv.SourcePicoseconds is not None or dv.ServerPicoseconds is not None:
        return _generic_datavalue(dv)
    mask = 0
    parts = [b""]
    v = dv.Value
    if v is not None:
        mask = _HAS_VALUE
        vt = v.VariantType
        packer = _SCALAR_STRUCT.get(vt)
        if packer is not None and not v.is_array and v.Dimensions is None and v.Value is not None:
            try:
                parts.append(_SCALAR_PREFIX[vt] + packer.pack(v.Value))
            except struct.error:  # a value that does not fit its type: asyncua's encoder says why
                parts.append(_variant_to_binary(v))
        else:
            parts.append(_variant_to_binary(v))
    sc = dv.StatusCode
    if sc is not None:
        mask |= _HAS_STATUS
        b = statuses.get(sc.value)
        if b is None:
            b = statuses[sc.value] = _encode_status(sc)
        parts.append(b)
    for bit, ts in ((_HAS_SOURCE_TS, dv.SourceTimestamp), (_HAS_SERVER_TS, dv.ServerTimestamp)):
        if ts is not None:
            mask |= bit
            b = times.get(ts)
            if b is None:
                b = times[ts] = _pack_i64(ua.datetime_to_win_epoch(ts))
            parts.append(b)
    parts[0] = bytes((mask,))
    return b"".join(parts)


def encode_datachange_notification(obj: ua.DataChangeNotification) -> bytes:
    """The binary body of a DataChangeNotification, byte for byte what asyncua's serializer makes."""
    items = obj.MonitoredItems
    times: dict = {}
    statuses: dict = {}
    if items is None:
        head = [_pack_i32(-1)]
    else:
        head = [_pack_i32(len(items))]
        for it in items:
            head.append(_pack_u32(it.ClientHandle))
            head.append(_encode_datavalue(it.Value, times, statuses))
    head.append(_generic_diagnostics(obj.DiagnosticInfos))
    return b"".join(head)


def install_fast_encoding() -> None:
    """Route asyncua's `ua_binary.struct_to_binary` (what `extensionobject_to_binary` calls for every
    NotificationData of a PublishResponse) through `encode_datachange_notification` for
    DataChangeNotifications; every other class goes the generic way. Idempotent."""
    current = ua_binary.struct_to_binary
    if getattr(current, "_cmcs_fast", False):
        return

    def struct_to_binary(obj: Any) -> bytes:
        if obj.__class__ is _DCN:
            return encode_datachange_notification(obj)
        return current(obj)

    struct_to_binary._cmcs_fast = True  # type: ignore[attr-defined]
    ua_binary.struct_to_binary = struct_to_binary
