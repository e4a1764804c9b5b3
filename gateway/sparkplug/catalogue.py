"""What the edge node publishes: every metric's name, alias, Sparkplug datatype and unit, and the
payload encoding of a value (docs/interface.md section 8, docs/sparkplug.md).

Aliases are a pure function of the site (device order, catalogue order), so they are the same after
a restart and the store-and-forward queue, written with aliases, still means the same metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.sparkplug import sparkplug_b_pb2 as pb
from siteconfig.model import Site
from siteconfig.points import POINTS

Payload = pb.Payload
DataType = pb.DataType  # Sparkplug 3.0 section 6.4.16 numbers

# Sparkplug 3.0 section 6.4.16: the numbers as names
INT32, UINT32, INT64, DOUBLE, BOOLEAN, STRING = (pb.Int32, pb.UInt32, pb.Int64, pb.Double, pb.Boolean, pb.String)
UINT16 = pb.UInt16

NAMESPACE = "spBv1.0"  # Sparkplug 3.0 section 4.1.1
REBIRTH = "Node Control/Rebirth"  # Sparkplug 3.0 section 6.4.5
BDSEQ = "bdSeq"

# A device's aliases are ALIAS_BLOCK * (its index + 1) + the metric's offset below.
ALIAS_BLOCK = 1000
_RESULT_OFFSET = 100  # CMCS results
_ALARM_OFFSET = 200  # alarms: + 10 * alarm type index + field index
_COMMAND_OFFSET = 300  # command metrics (DCMD), declared only with `commands: true`

# CMCS results the CMCS writes over OPC UA (gateway/security.py WRITABLE_POINTS), per device kind
CMCS_RESULTS = {"source": (("RiskScore", DOUBLE, ""),), "pdb": (("RiskScore", DOUBLE, ""),),
                "ats": (("RiskScore", DOUBLE, ""), ("PredictedLoad", DOUBLE, "kW")), "des": ()}

# Command metrics a host writes with DCMD (docs/sparkplug.md "Commands"), per device kind; declared in
# DBIRTH (Sparkplug 3.0 6.4.2: a host writes only metrics it was born with) with value 0 / false:
# writing one is a command, not a setpoint, and the device's state comes back as DDATA of its points
COMMAND_METRICS = {"source": (), "pdb": (),
                   "ats": (("SwitchSource", INT32, ""), ("SetPreferredSource", INT32, "")),
                   "des": (("StartBridging/Power", DOUBLE, "kW"), ("StartBridging/Duration", DOUBLE, "s"),
                           ("StopBridging", BOOLEAN, ""))}

# The per-metric quality a host reads from the metric property "Quality" (Int32), in the codes that
# Ignition / Cirrus Link MQTT Engine use: 192 good, 500 stale (our Uncertain: the device did not
# answer its last poll, the value is the last one read). Bad devices are not marked: they get DDEATH.
QUALITY = "Quality"
QUALITY_GOOD, QUALITY_STALE = 192, 500

# Alarm types (docs/interface.md section 3 "Events and alarms"), in alias order; the metric prefix
# is the type name without "AlarmType": Alarms/OverTemperature/Active
ALARM_TYPES = ("SourceLossAlarmType", "OverTemperatureAlarmType", "OverloadAlarmType",
               "PredictedFailureAlarmType", "LossOfRedundancyAlarmType")
ALARM_FIELDS = (("Active", BOOLEAN), ("Acked", BOOLEAN), ("Severity", UINT16), ("Message", STRING))

# Node metrics: the Rebirth control, bdSeq and the CMCS object's variables (OPC UA Objects/<Site>/Cmcs)
NODE_METRICS = ((REBIRTH, BOOLEAN, ""), (BDSEQ, INT64, ""), ("Cmcs/Mode", INT32, ""),
                ("Cmcs/RiskThreshold", DOUBLE, ""), ("Cmcs/CycleTime", DOUBLE, "ms"),
                ("Cmcs/ModelVersion", STRING, ""), ("Cmcs/ActiveMitigations", UINT32, ""))


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    alias: int
    datatype: int
    unit: str


def _datatype(kind: str) -> int:
    """siteconfig.points kind -> Sparkplug datatype (enumerations are OPC UA Int32)."""
    if kind == "float":
        return DOUBLE
    if kind == "bool":
        return BOOLEAN
    if kind == "int":
        return UINT32  # TransferCount: OPC UA UInt32
    return INT32  # enum:*


def alarm_metric(type_name: str, field: str) -> str:
    return f"Alarms/{type_name.removesuffix('AlarmType')}/{field}"


@dataclass
class Catalogue:
    """Metrics of the node and of every device of a site."""

    node: dict[str, MetricDef]
    devices: dict[str, dict[str, MetricDef]]  # device -> metric name -> def
    kinds: dict[str, str]  # device -> source|pdb|ats|des

    @classmethod
    def of_site(cls, site: Site, commands: bool = False) -> Catalogue:
        """`commands`: declare the DCMD metrics of COMMAND_METRICS (gateway.mqtt `commands: true`)."""
        node = {name: MetricDef(name, i + 1, dt, unit) for i, (name, dt, unit) in enumerate(NODE_METRICS)}
        devices: dict[str, dict[str, MetricDef]] = {}
        kinds: dict[str, str] = {}
        for index, (device, kind, _endpoint) in enumerate(site.devices()):
            base = ALIAS_BLOCK * (index + 1)
            metrics = {p.name: MetricDef(p.name, base + j + 1, _datatype(p.kind), p.units)
                       for j, p in enumerate(POINTS[kind])}
            for j, (name, dt, unit) in enumerate(CMCS_RESULTS[kind]):
                metrics[name] = MetricDef(name, base + _RESULT_OFFSET + j, dt, unit)
            for t, type_name in enumerate(ALARM_TYPES):
                for f, (field, dt) in enumerate(ALARM_FIELDS):
                    name = alarm_metric(type_name, field)
                    metrics[name] = MetricDef(name, base + _ALARM_OFFSET + 10 * t + f, dt, "")
            if commands:
                for j, (name, dt, unit) in enumerate(COMMAND_METRICS[kind]):
                    metrics[name] = MetricDef(name, base + _COMMAND_OFFSET + j, dt, unit)
            devices[device], kinds[device] = metrics, kind
        return cls(node, devices, kinds)

    def name_of(self, device: str, metric) -> str | None:
        """The name a DCMD/NCMD metric means: its name, or (Sparkplug 3.0 6.4.6: a host may write by
        alias alone) the name of its alias among the device's metrics."""
        if metric.name:
            return metric.name
        if not metric.HasField("alias"):
            return None
        return next((d.name for d in self.devices.get(device, {}).values() if d.alias == metric.alias), None)

    def alarm_defs(self, device: str) -> list[MetricDef]:
        return [m for m in self.devices[device].values() if m.name.startswith("Alarms/")]


def set_value(metric, datatype: int, value) -> None:
    """Put `value` in the metric's value field for its datatype (Sparkplug 3.0 section 6.4.17), or is_null."""
    if value is None or (isinstance(value, float) and math.isnan(value) and datatype != DOUBLE):
        metric.is_null = True
        return
    if datatype == DOUBLE:
        metric.double_value = float(value)
    elif datatype == BOOLEAN:
        metric.boolean_value = bool(value)
    elif datatype == STRING:
        metric.string_value = str(value)
    elif datatype == INT64:
        metric.long_value = int(value) & 0xFFFF_FFFF_FFFF_FFFF  # signed: two's complement in uint64
    elif datatype == INT32:
        metric.int_value = int(value) & 0xFFFF_FFFF  # signed: two's complement in uint32
    else:  # UInt8..UInt32
        metric.int_value = int(value) & 0xFFFF_FFFF


def value_of(metric) -> object:
    """A metric's value back as Python (for commands and tests)."""
    if metric.is_null:
        return None
    which = metric.WhichOneof("value")
    if which is None:
        return None
    v = getattr(metric, which)
    if which == "int_value" and metric.datatype in (pb.Int8, pb.Int16, pb.Int32) and v >= 2**31:
        v -= 2**32
    return v


def birth_metric(payload, d: MetricDef, value, ts_ms: int, with_unit: bool = True):
    """A BIRTH metric: name, alias, datatype, timestamp, value and the property engUnit."""
    m = payload.metrics.add()
    m.name, m.alias, m.datatype, m.timestamp = d.name, d.alias, d.datatype, ts_ms
    set_value(m, d.datatype, value)
    if with_unit:
        m.properties.keys.append("engUnit")
        pv = m.properties.values.add()
        pv.type = STRING
        pv.string_value = d.unit
    return m


def set_quality(metric, code: int) -> None:
    """The metric property QUALITY (Int32) on a DATA metric."""
    metric.properties.keys.append(QUALITY)
    pv = metric.properties.values.add()
    pv.type = INT32
    pv.int_value = code


def topic(group_id: str, message_type: str, edge_node_id: str, device: str | None = None) -> str:
    """Sparkplug 3.0 section 4.1: spBv1.0/<group>/<type>/<edge node>[/<device>]."""
    base = f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}"
    return f"{base}/{device}" if device else base
