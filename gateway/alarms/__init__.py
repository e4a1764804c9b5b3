"""Alarms & Conditions (OPC UA Part 9) raised from the point table, plus the CMCS's predictions.

Three parts:
- gateway/alarms/rules.py: which measure of which device raises which alarm (thresholds with
  their sources, hysteresis, on/off delays); knows nothing of OPC UA;
- gateway/alarms/conditions.py: the Part 9 machinery asyncua 2.1 lacks: condition instances and
  their state, their events, Acknowledge / AddComment / Enable / Disable, ConditionRefresh(2);
- gateway/alarms/engine.py: `AlarmEngine`, a point-table sink that evaluates the rules and
  drives the conditions, and `attach(gateway_server)` that starts it.

Wiring: GatewayServer.start (gateway/server.py) starts the engine (`attach`) once the address
space is built and makes the condition methods' UserExecutable follow `REQUIRED_ROLE`; the
gateway (gateway/app.py `Gateway.sinks`) attaches it to the point table; GatewayServer.stop
stops it. The CMCS (in-process) calls `gateway_server.alarms.raise_predicted_failure(...)` /
`clear_predicted_failure(...)`, and `raise_loss_of_redundancy(...)` / `clear_loss_of_redundancy(...)`,
on the server's event loop.

The event filter that lets a client select our alarms (OfType a supertype, ActiveState/Id, the
ConditionId) is gateway.asyncua_hooks.SpecWhereClauseEvaluator.
"""

from __future__ import annotations

from gateway.alarms.conditions import (ALARM_TYPES, CONDITION_CLASSES, CONDITION_NAMES, REQUIRED_ROLE,
                                       RIDE_THROUGH_SHORT_S, SERVER_NODE, SEVERITY_REDUNDANCY_AT_RISK,
                                       SEVERITY_REDUNDANCY_GONE, SEVERITY_REDUNDANCY_GONE_SHORT, Condition,
                                       ConditionSet, loss_of_redundancy_severity, spec_description)
from gateway.alarms.engine import TICK_S, AlarmEngine, attach
from gateway.alarms.rules import (CELL_HIGH_DEGC, CELL_HYSTERESIS_K, CELL_WARNING_DEGC, DELAYS_S, ITIC_HIGH_PU,
                                  ITIC_LONG_S, ITIC_LOW_PU, LOADING_HYSTERESIS_PCT, NETA_AMBIENT_MAJOR_K,
                                  NETA_AMBIENT_MONITOR_K, NETA_AMBIENT_PROBABLE_K, NETA_SIMILAR_MAJOR_K,
                                  NETA_SIMILAR_PROBABLE_K, OVERLOAD_HIGH_PCT, SEVERITY_BUS_DEAD, SEVERITY_CELL_HIGH,
                                  SEVERITY_CELL_WARNING, SEVERITY_MAJOR, SEVERITY_MONITOR, SEVERITY_OVERLOAD_HIGH,
                                  SEVERITY_OVERLOAD_WARNING, SEVERITY_PROBABLE, SEVERITY_SOURCE_LOST,
                                  SEVERITY_UNIT_BOTH_INPUTS, SEVERITY_UNIT_ONE_INPUT, TEMPERATURE_HYSTERESIS_K,
                                  VOLTAGE_HYSTERESIS_PU, Band, BusEnergizedRule, CellTemperatureRule,
                                  ContactTemperatureRule, JointTemperatureRule, LoadingRule, Lookup, Rule,
                                  SourceAvailableRule, UnitInputsRule, Verdict, band_of, site_rules)

__all__ = [
    "ALARM_TYPES", "CONDITION_CLASSES", "CONDITION_NAMES", "REQUIRED_ROLE", "SERVER_NODE", "Condition", "ConditionSet",
    "spec_description", "RIDE_THROUGH_SHORT_S", "SEVERITY_REDUNDANCY_AT_RISK", "SEVERITY_REDUNDANCY_GONE",
    "SEVERITY_REDUNDANCY_GONE_SHORT", "loss_of_redundancy_severity", "TICK_S", "AlarmEngine", "attach",
    "CELL_HIGH_DEGC", "CELL_HYSTERESIS_K", "CELL_WARNING_DEGC",
    "DELAYS_S", "ITIC_HIGH_PU", "ITIC_LONG_S", "ITIC_LOW_PU", "LOADING_HYSTERESIS_PCT", "NETA_AMBIENT_MAJOR_K",
    "NETA_AMBIENT_MONITOR_K", "NETA_AMBIENT_PROBABLE_K", "NETA_SIMILAR_MAJOR_K", "NETA_SIMILAR_PROBABLE_K",
    "OVERLOAD_HIGH_PCT", "SEVERITY_BUS_DEAD", "SEVERITY_CELL_HIGH", "SEVERITY_CELL_WARNING", "SEVERITY_MAJOR",
    "SEVERITY_MONITOR", "SEVERITY_OVERLOAD_HIGH", "SEVERITY_OVERLOAD_WARNING", "SEVERITY_PROBABLE",
    "SEVERITY_SOURCE_LOST", "SEVERITY_UNIT_BOTH_INPUTS", "SEVERITY_UNIT_ONE_INPUT", "TEMPERATURE_HYSTERESIS_K",
    "VOLTAGE_HYSTERESIS_PU", "Band", "BusEnergizedRule", "CellTemperatureRule", "ContactTemperatureRule",
    "JointTemperatureRule", "LoadingRule", "Lookup", "Rule", "SourceAvailableRule", "UnitInputsRule", "Verdict",
    "band_of", "site_rules",
]
