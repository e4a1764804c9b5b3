"""The telemetry and command catalogue of each device kind.

One list, shared by the plant (which produces these values), the register-map profiles
(which place them in registers) and the OPC UA model (whose BrowseNames they are). Units are
engineering units as the plant computes them; profiles choose register scaling.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PointSpec:
    name: str
    units: str  # "" for dimensionless, enum or boolean
    kind: str  # "float" | "int" | "bool" | "enum:<EnumName>"
    description: str


def _p(name: str, units: str, kind: str, description: str) -> PointSpec:
    return PointSpec(name, units, kind, description)


SOURCE_POINTS = (
    _p("Voltage", "V", "float", "line-to-line voltage at the source switchboard"),
    _p("Frequency", "Hz", "float", "frequency"),
    _p("ActivePower", "kW", "float", "active power delivered to the hall"),
    _p("RatedPower", "kW", "float", "rating of the source"),
    _p("Loading", "%", "float", "active power in percent of rating"),
    _p("Available", "", "bool", "voltage and frequency within tolerance and breaker closed"),
    _p("BackupBatteryVoltage", "V", "float", "UPS battery string (SourceA) or generator start battery (SourceB) voltage"),
    _p("BackupBatteryResistance", "mOhm", "float", "internal resistance of that battery, from its monitor"),
    _p("BackupBatteryTemperature", "degC", "float", "temperature of that battery"),
    _p("BackupReady", "", "bool", "backup (UPS inverter or standby generator) reports ready"),
)

PDB_POINTS = (
    _p("Feed", "", "enum:SourceSelection", "source feeding this segment"),
    _p("Voltage", "V", "float", "line-to-line voltage at the segment"),
    _p("Current", "A", "float", "highest phase current"),
    _p("CurrentL1", "A", "float", "phase L1 current"),
    _p("CurrentL2", "A", "float", "phase L2 current"),
    _p("CurrentL3", "A", "float", "phase L3 current"),
    _p("ActivePower", "kW", "float", "active power through the segment"),
    _p("RatedCurrent", "A", "float", "segment rating"),
    _p("Loading", "%", "float", "highest phase current in percent of rating"),
    _p("VoltageThd", "%", "float", "voltage total harmonic distortion"),
    _p("JointTemperature", "degC", "float", "hottest joint temperature"),
    _p("JointTemperatureL1", "degC", "float", "hottest joint temperature on phase L1"),
    _p("JointTemperatureL2", "degC", "float", "hottest joint temperature on phase L2"),
    _p("JointTemperatureL3", "degC", "float", "hottest joint temperature on phase L3"),
    _p("PhaseImbalance", "%", "float", "current imbalance: max deviation from mean over mean"),
    _p("AmbientTemperature", "degC", "float", "air temperature at the bus"),
    _p("Energized", "", "bool", "segment energized (breaker closed, no open joint)"),
)

ATS_POINTS = (
    _p("ActiveSource", "", "enum:SourceSelection", "source the load is on"),
    _p("PreferredSource", "", "enum:SourceSelection", "source the unit returns to when it is healthy"),
    _p("State", "", "enum:AtsState", "unit state"),
    _p("SourceAVoltage", "V", "float", "voltage of source A at the unit"),
    _p("SourceBVoltage", "V", "float", "voltage of source B at the unit"),
    _p("LoadPower", "kW", "float", "active power of the segment load"),
    _p("LoadCurrent", "A", "float", "load current"),
    _p("ContactTemperature", "degC", "float", "temperature of the closed contact set"),
    _p("ContactResistance", "uOhm", "float", "resistance of the closed contact set (from its voltage drop)"),
    _p("TransferCount", "", "int", "transfers since commissioning"),
    _p("LastTransferTime", "ms", "float", "duration of the last transfer (load dark or out of tolerance)"),
    _p("ActuatorResponseTime", "ms", "float", "actuator response measured by the periodic self-test"),
    _p("Position", "ft", "float", "position along the aisle"),
    _p("RatedCurrent", "A", "float", "unit rating"),
)

DES_POINTS = (
    _p("StateOfCharge", "%", "float", "state of charge"),
    _p("EnergyCapacity", "kWh", "float", "usable capacity at present health"),
    _p("ActivePower", "kW", "float", "active power, positive = discharging"),
    _p("MaxDischargePower", "kW", "float", "discharge power available now (C-rate, SoC window, health)"),
    _p("Mode", "", "enum:StorageMode", "operating mode"),
    _p("CellTemperature", "degC", "float", "hottest cell temperature"),
    _p("StateOfHealth", "%", "float", "capacity in percent of nameplate"),
    _p("InternalResistance", "mOhm", "float", "pack internal resistance (from the BMS)"),
    _p("BridgeTimeRemaining", "s", "float", "time left of the commanded bridging"),
)

POINTS = {"source": SOURCE_POINTS, "pdb": PDB_POINTS, "ats": ATS_POINTS, "des": DES_POINTS}

# Commands a device accepts: name -> argument names (engineering units).
COMMANDS = {
    "ats": {
        "SwitchSource": ("Target",),  # SourceSelection 1|2
        "SetPreferredSource": ("Source",),  # SourceSelection 1|2
    },
    "des": {
        "StartBridging": ("Power", "Duration"),  # kW, s
        "StopBridging": (),
    },
    "source": {},
    "pdb": {},
}
