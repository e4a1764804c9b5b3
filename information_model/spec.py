"""Declarative source of the PowerDistribution type model (docs/interface.md section 3).

`gen_nodeset.py` renders this into `cmcs_power.NodeSet2.xml`; the XML is what the server
loads and what other tools import. NodeIds in the types namespace are numeric and fixed by
the `block` of each type plus the order of its members, so append new members at the end of
a list to keep existing NodeIds stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TYPES_NAMESPACE_URI = "urn:cmcs-gateway:UA:PowerDistribution"
MODEL_VERSION = "1.0.0"
MODEL_PUBLICATION_DATE = "2025-11-25T00:00:00Z"
# Oldest base model with everything we use (AnalogItemType, EUInformation, AlarmConditionType).
BASE_MODEL_VERSION = "1.04"
BASE_MODEL_PUBLICATION_DATE = "2019-05-01T00:00:00Z"

# OPC UA Part 8, 5.6.3: EUInformation.NamespaceUri for UNECE Recommendation 20 codes.
UNECE_NAMESPACE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


def unece_unit_id(common_code: str) -> int:
    """UnitId of a UNECE common code, per OPC UA Part 8 5.6.3 (one byte per character, big-endian)."""
    unit_id = 0
    for ch in common_code.upper():
        unit_id = (unit_id << 8) | ord(ch)
    return unit_id


@dataclass(frozen=True)
class Unit:
    code: str  # UNECE Rec. 20 common code
    symbol: str  # EUInformation.DisplayName
    name: str  # EUInformation.Description

    @property
    def unit_id(self) -> int:
        return unece_unit_id(self.code)


# Keys are the short names used in this file; codes from UNECE Recommendation 20, Annex II/III.
UNITS: dict[str, Unit] = {
    "V": Unit("VLT", "V", "volt"),
    "A": Unit("AMP", "A", "ampere"),
    "kW": Unit("KWT", "kW", "kilowatt"),
    "Hz": Unit("HTZ", "Hz", "hertz"),
    "%": Unit("P1", "%", "percent"),
    "degC": Unit("CEL", "°C", "degree Celsius"),
    "ms": Unit("C26", "ms", "millisecond"),
    "ft": Unit("FOT", "ft", "foot"),
    "kWh": Unit("KWH", "kW·h", "kilowatt hour"),
    "s": Unit("SEC", "s", "second"),
    "uOhm": Unit("B94", "µΩ", "microohm"),
    "mOhm": Unit("C42", "mΩ", "milliohm"),
    "1": Unit("C62", "1", "one (dimensionless ratio)"),
}

# Built-in DataTypes by the names used below (ns=0 numeric ids, OPC UA Part 6 / NodeIds.csv).
BUILTIN_DATATYPES = {"Boolean": 1, "UInt32": 7, "Double": 11, "String": 12}


@dataclass(frozen=True)
class Enumeration:
    name: str
    block: int  # NodeId of the DataType; its EnumStrings property is block + 1
    values: tuple[tuple[str, str], ...]  # (name, description), value = position
    description: str


ENUMERATIONS: tuple[Enumeration, ...] = (
    Enumeration(
        "SourceSelection",
        3001,
        (
            ("None", "No source selected / load not fed."),
            ("SourceA", "Fed from utility source A."),
            ("SourceB", "Fed from utility source B."),
        ),
        "Which of the two upstream sources feeds a load or bus.",
    ),
    Enumeration(
        "AtsState",
        3011,
        (
            ("Normal", "Closed on one source, ready to transfer."),
            ("Transferring", "A transfer between sources is in progress."),
            ("Bridging", "Load carried by the local energy storage during a transfer or outage."),
            ("Fault", "Unit has detected an internal fault; transfers are inhibited."),
            ("Offline", "Unit is out of service or not communicating."),
        ),
        "Operating state of a micro automatic transfer switch.",
    ),
    Enumeration(
        "StorageMode",
        3021,
        (
            ("Standby", "Idle, ready to bridge."),
            ("Charging", "Recharging from the active source."),
            ("Bridging", "Discharging to carry the load through a transfer or outage."),
            ("Smoothing", "Discharging or charging to smooth load peaks."),
            ("Fault", "Storage unit fault; not available for bridging."),
        ),
        "Operating mode of a distributed energy storage unit.",
    ),
    Enumeration(
        "CmcsMode",
        3031,
        (
            ("Manual", "The CMCS only observes; no recommendations, no actions."),
            ("Advisory", "The CMCS raises recommendations and alarms but does not act."),
            ("Automatic", "The CMCS acts through method calls, within the interlocks."),
        ),
        "Operating mode of the continuous monitoring and control system.",
    ),
)


@dataclass(frozen=True)
class Member:
    """A variable InstanceDeclaration of an ObjectType."""

    name: str
    datatype: str  # a BUILTIN_DATATYPES key or an Enumeration name
    description: str
    unit: str | None = None  # UNITS key; set => AnalogItemType with EngineeringUnits + EURange
    eu_range: tuple[float, float] | None = None
    writable: bool = False
    historized: bool = False

    @property
    def analog(self) -> bool:
        return self.unit is not None


@dataclass(frozen=True)
class Argument:
    name: str
    datatype: str
    description: str


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    inputs: tuple[Argument, ...] = ()
    outputs: tuple[Argument, ...] = ()


@dataclass(frozen=True)
class ObjectTypeSpec:
    name: str
    block: int  # NodeId of the type; members are numbered from block + 1, methods from block + 70
    description: str
    members: tuple[Member, ...] = ()
    methods: tuple[Method, ...] = ()
    # (BrowseName, ObjectType name, description): Optional object components, numbered from block + 95
    optional_components: tuple[tuple[str, str, str], ...] = ()


def _risk(description: str = "Predicted probability (0..1) that this equipment fails within the CMCS horizon.") -> Member:
    return Member("RiskScore", "Double", description, "1", (0.0, 1.0), historized=True)


POWER_SOURCE = ObjectTypeSpec(
    "PowerSourceType",
    1000,
    "An upstream power source (utility feed with UPS or standby generator) feeding the site.",
    (
        Member("Voltage", "Double", "Line-to-line RMS voltage at the source output.", "V", (0.0, 600.0), historized=True),
        Member("Frequency", "Double", "Supply frequency.", "Hz", (45.0, 65.0), historized=True),
        Member("ActivePower", "Double", "Total active power delivered by the source.", "kW", (0.0, 5000.0), historized=True),
        Member("RatedPower", "Double", "Rated (nameplate) active power of the source.", "kW", (0.0, 5000.0)),
        Member("Available", "Boolean", "True while the source is within voltage and frequency tolerance."),
        _risk("Predicted probability (0..1) that this source is lost within the CMCS horizon."),
        Member("Loading", "Double", "Active power as a percentage of rated power.", "%", (0.0, 150.0), historized=True),
        Member("BackupBatteryVoltage", "Double", "DC voltage of the backup battery string (UPS string or generator start battery).", "V", (0.0, 600.0), historized=True),
        Member("BackupBatteryResistance", "Double", "Measured internal resistance of the backup battery string.", "mOhm", (0.0, 100.0)),
        Member("BackupBatteryTemperature", "Double", "Temperature of the backup battery string.", "degC", (-20.0, 80.0), historized=True),
        Member("BackupReady", "Boolean", "True while the backup (UPS or standby generator) is ready to take the load."),
    ),
)

DISTRIBUTION_BUS = ObjectTypeSpec(
    "DistributionBusType",
    1100,
    "A power distribution bus (PDB) segment in an aisle, fed from one source.",
    (
        Member("Feed", "SourceSelection", "The source this bus segment is fed from."),
        Member("Voltage", "Double", "Line-to-line RMS voltage of the bus.", "V", (0.0, 600.0), historized=True),
        Member("Current", "Double", "RMS current of the most loaded phase.", "A", (0.0, 1000.0), historized=True),
        Member("CurrentL1", "Double", "RMS current of phase L1.", "A", (0.0, 1000.0), historized=True),
        Member("CurrentL2", "Double", "RMS current of phase L2.", "A", (0.0, 1000.0), historized=True),
        Member("CurrentL3", "Double", "RMS current of phase L3.", "A", (0.0, 1000.0), historized=True),
        Member("ActivePower", "Double", "Total active power through the bus segment.", "kW", (0.0, 1000.0), historized=True),
        Member("RatedCurrent", "Double", "Rated current of the bus segment.", "A", (0.0, 1000.0)),
        Member("Loading", "Double", "Highest phase current as a percentage of rated current.", "%", (0.0, 150.0), historized=True),
        Member("VoltageThd", "Double", "Total harmonic distortion of the bus voltage.", "%", (0.0, 100.0)),
        Member("JointTemperature", "Double", "Temperature of the hottest bolted joint on the bus.", "degC", (-20.0, 150.0), historized=True),
        Member("PhaseImbalance", "Double", "Current imbalance between phases (max deviation from mean over mean).", "%", (0.0, 100.0)),
        Member("AmbientTemperature", "Double", "Air temperature around the bus.", "degC", (-20.0, 80.0), historized=True),
        Member("Energized", "Boolean", "True while the bus segment is live."),
        _risk(),
        Member("JointTemperatureL1", "Double", "Temperature of the hottest bolted joint on phase L1.", "degC", (-20.0, 150.0), historized=True),
        Member("JointTemperatureL2", "Double", "Temperature of the hottest bolted joint on phase L2.", "degC", (-20.0, 150.0), historized=True),
        Member("JointTemperatureL3", "Double", "Temperature of the hottest bolted joint on phase L3.", "degC", (-20.0, 150.0), historized=True),
    ),
)

ENERGY_STORAGE = ObjectTypeSpec(
    "EnergyStorageType",
    1300,
    "A distributed energy storage (DES) unit that bridges a micro-ATS load through transfers and outages.",
    (
        Member("StateOfCharge", "Double", "Stored energy as a percentage of usable capacity.", "%", (0.0, 100.0), historized=True),
        Member("EnergyCapacity", "Double", "Usable energy capacity at the present state of health.", "kWh", (0.0, 100.0)),
        Member("ActivePower", "Double", "Active power at the inverter terminals; positive = discharging to the load.", "kW", (-100.0, 100.0), historized=True),
        Member("MaxDischargePower", "Double", "Discharge power available now (inverter, state of charge and health limits).", "kW", (0.0, 100.0)),
        Member("Mode", "StorageMode", "Operating mode of the unit."),
        Member("CellTemperature", "Double", "Temperature of the hottest cell.", "degC", (-20.0, 80.0), historized=True),
        Member("StateOfHealth", "Double", "Remaining capacity as a percentage of the rated capacity.", "%", (0.0, 100.0)),
        Member("InternalResistance", "Double", "Internal resistance of the battery string.", "mOhm", (0.0, 1000.0)),
        Member("BridgeTimeRemaining", "Double", "Time the unit can carry the present load from its state of charge.", "s", (0.0, 3600.0)),
    ),
    (
        Method(
            "StartBridging",
            "Start discharging to carry the load at the given power for at most the given duration.",
            (
                Argument("Power", "Double", "Discharge power setpoint in kW (positive)."),
                Argument("Duration", "Double", "Maximum bridging duration in s."),
            ),
        ),
        Method("StopBridging", "Stop bridging and return to Standby."),
    ),
)

MICRO_ATS = ObjectTypeSpec(
    "MicroAtsType",
    1200,
    "A micro automatic transfer switch feeding one rack segment from source A or source B.",
    (
        Member("ActiveSource", "SourceSelection", "The source the unit is closed on.", historized=True),
        Member("PreferredSource", "SourceSelection", "The source the unit returns to when it is healthy."),
        Member("State", "AtsState", "Operating state of the unit.", historized=True),
        Member("SourceAVoltage", "Double", "Line-to-line RMS voltage seen on the source A input.", "V", (0.0, 600.0), historized=True),
        Member("SourceBVoltage", "Double", "Line-to-line RMS voltage seen on the source B input.", "V", (0.0, 600.0), historized=True),
        Member("LoadPower", "Double", "Active power delivered to the load.", "kW", (0.0, 200.0), historized=True),
        Member("LoadCurrent", "Double", "RMS load current of the most loaded phase.", "A", (0.0, 400.0), historized=True),
        Member("ContactTemperature", "Double", "Temperature of the hottest main contact.", "degC", (-20.0, 150.0), historized=True),
        Member("ContactResistance", "Double", "Resistance of the closed main contacts.", "uOhm", (0.0, 5000.0)),
        Member("TransferCount", "UInt32", "Number of transfers since commissioning."),
        Member("LastTransferTime", "Double", "Duration of the last transfer (break-before-make, detection to load fed).", "ms", (0.0, 1000.0)),
        Member("ActuatorResponseTime", "Double", "Time from command to contact movement at the last operation.", "ms", (0.0, 1000.0)),
        Member("Position", "Double", "Distance of the unit from the start of the aisle.", "ft", (0.0, 1000.0)),
        Member("RatedCurrent", "Double", "Rated current of the unit.", "A", (0.0, 400.0)),
        _risk(),
        Member("PredictedLoad", "Double", "CMCS forecast of the load power over the next horizon.", "kW", (0.0, 200.0)),
    ),
    (
        Method(
            "SwitchSource",
            "Transfer the load to the target source. Refused with a Bad status if an interlock forbids it.",
            (Argument("Target", "SourceSelection", "Source to transfer to (SourceA or SourceB)."),),
            (Argument("TransferTime", "Double", "Measured transfer time in ms."),),
        ),
        Method(
            "SetPreferredSource",
            "Set the source the unit returns to when it is healthy.",
            (Argument("Source", "SourceSelection", "The new preferred source (SourceA or SourceB)."),),
        ),
    ),
    (("Storage", "EnergyStorageType", "The distributed energy storage unit bridging this micro-ATS, if fitted."),),
)

CMCS = ObjectTypeSpec(
    "CmcsType",
    1400,
    "The continuous monitoring and control system: risk prediction and mitigation for the site.",
    (
        Member("Mode", "CmcsMode", "Operating mode of the CMCS.", historized=True),
        Member("RiskThreshold", "Double", "Risk score above which the CMCS mitigates (0..1).", "1", (0.0, 1.0), writable=True),
        Member("CycleTime", "Double", "Duration of the last collect-predict-optimise-act cycle.", "ms", (0.0, 10000.0)),
        Member("ModelVersion", "String", "Version of the loaded prediction model bundle."),
        Member("ActiveMitigations", "UInt32", "Number of mitigations currently in force."),
    ),
    (
        Method(
            "SetMode",
            "Change the CMCS operating mode.",
            (Argument("Mode", "CmcsMode", "The new operating mode."),),
        ),
        Method(
            "ReportPrediction",
            "The CMCS predicts that a component fails: raise (or update) its PredictedFailureAlarm.",
            (
                Argument("Component", "String", "BrowseName of the at-risk source, PDB segment, micro-ATS or DES unit."),
                Argument("RiskScore", "Double", "Probability (0..1) that it fails within the CMCS horizon."),
                Argument("LeadTime", "Double", "Expected time to the failure in s."),
                Argument("Recommendation", "String", "The mitigation the CMCS takes (Automatic) or recommends (Advisory)."),
            ),
        ),
        Method(
            "ClearPrediction",
            "The CMCS no longer predicts a failure of the component: its PredictedFailureAlarm returns to normal.",
            (Argument("Component", "String", "BrowseName of the component."),),
        ),
        Method(
            "Advise",
            "Advisory mode: notify an event with an action the CMCS recommends but does not take.",
            (
                Argument("Component", "String", "BrowseName of the object the action is about."),
                Argument("Action", "String", "The recommended action and its reason."),
            ),
        ),
        Method(
            "ReportLossOfRedundancy",
            "The CMCS sees a micro-ATS whose second path is at risk or gone: raise (or update) its "
            "LossOfRedundancyAlarm.",
            (
                Argument("Unit", "String", "BrowseName of the micro-ATS."),
                Argument("PathAtRisk", "String", "The path at risk or gone: one of the unit's PDB segments or a source."),
                Argument("RideThroughTime", "Double", "s the unit's DES can carry its present load alone (0: none)."),
                Argument("PathGone", "Boolean", "True when the path is gone (not merely at risk)."),
            ),
        ),
        Method(
            "ClearLossOfRedundancy",
            "The micro-ATS has its second path again: its LossOfRedundancyAlarm returns to normal.",
            (Argument("Unit", "String", "BrowseName of the micro-ATS."),),
        ),
    ),
)

# Order matters only for readability of the XML; the importer sorts by dependency.
OBJECT_TYPES: tuple[ObjectTypeSpec, ...] = (POWER_SOURCE, DISTRIBUTION_BUS, MICRO_ATS, ENERGY_STORAGE, CMCS)


@dataclass(frozen=True)
class AlarmTypeSpec:
    name: str
    nodeid: int
    description: str
    # (name, datatype, description) Mandatory properties, numbered from nodeid + 1
    properties: tuple[tuple[str, str, str], ...] = field(default=())


ALARM_TYPES: tuple[AlarmTypeSpec, ...] = (
    AlarmTypeSpec("SourceLossAlarmType", 2000, "An upstream source is lost or out of tolerance."),
    AlarmTypeSpec("OverTemperatureAlarmType", 2010, "A temperature (joint, contact, cell, battery) exceeds its limit."),
    AlarmTypeSpec("OverloadAlarmType", 2020, "A feed or bus is loaded beyond its derated limit."),
    AlarmTypeSpec(
        "PredictedFailureAlarmType",
        2030,
        "The CMCS predicts a failure of a component before it happens.",
        (
            ("PredictedComponent", "String", "Name of the device or component predicted to fail."),
            ("LeadTime", "Double", "Predicted time until the failure, in seconds."),
        ),
    ),
    AlarmTypeSpec(
        "LossOfRedundancyAlarmType",
        2040,
        "Raised by the CMCS on a micro-ATS whose second path (the other PDB segment or source) is at "
        "risk or gone: one more failure drops its load unless its DES carries it.",
        (
            ("RideThroughTime", "Double", "How long the unit's DES can carry its load alone at the present load, in "
                                          "seconds (0: no usable DES)."),
            ("PathAtRisk", "String", "The path at risk or gone: the PDB segment or source, e.g. PDB-01-B."),
        ),
    ),
)


def object_type(name: str) -> ObjectTypeSpec:
    for t in OBJECT_TYPES:
        if t.name == name:
            return t
    raise KeyError(name)


def enumeration(name: str) -> Enumeration:
    for e in ENUMERATIONS:
        if e.name == name:
            return e
    raise KeyError(name)
