"""Loss of redundancy: which micro-ATS have their second path at risk or gone (docs/interface.md
section 3, `LossOfRedundancyAlarmType`), and how long each one's DES could carry it alone.

A unit has two paths, one per source: source -> its aisle's PDB segment of that feed -> one
contact set of the unit. While it sits on one (its active source), the other is its second path:
the one the local logic transfers to when the first fails. The warning is on when that second path
is **gone** (the unit sees the other source out of tolerance, the segment de-energized, the source
unavailable; the unit is in FAULT, one contact set failed; or the unit has no path at all) or **at
risk** (the CMCS latched that segment or source at risk): one more failure then drops the load
unless the DES carries it, and IT can still move or shut down workloads in time.

Pure functions of an observation (what an OPC UA client sees) and the policy's latches: the
mission benchmark counts drops warned 5 min ahead with them (`cmcs.mission`), and the live CMCS
can raise the alarm from the same result (RideThroughTime, the path at risk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from siteconfig.model import AtsState

TOLERANCE_PU = (0.9, 1.1)  # ITIC steady-state band (docs/domain.md): a path outside it is not a path


@dataclass(frozen=True)
class Redundancy:
    """Per unit (observation order): is its second path at risk or gone, which, and its DES's ride-through."""

    warning: np.ndarray  # (n,) bool
    gone: np.ndarray  # (n,) bool: the second path is not there (not merely at risk)
    path_at_risk: list[str]  # (n,) name of the segment or source at risk / gone ("" where no warning)
    ride_through_s: np.ndarray  # (n,) s the DES can carry the unit's present load alone (0: none, cannot carry)


def ride_through_s(values: dict, topo) -> np.ndarray:
    """How long each unit's DES could carry its present load alone, in seconds (0 where it has none or
    its available power is below the load): the energy above its SoC floor over the load."""
    ats, des = values["ats"], values.get("des", {})
    n = topo.n
    load = np.asarray(ats["LoadPower"], float)
    soc = np.asarray(des.get("StateOfCharge", np.zeros(n)), float)
    cap = np.asarray(des.get("EnergyCapacity", topo.des_capacity_kwh), float)
    pmax = np.asarray(des.get("MaxDischargePower", topo.des_rated_kw), float)
    energy_kwh = np.clip(soc - topo.des_soc_min_pct, 0.0, None) / 100.0 * np.nan_to_num(cap)
    has = np.array([bool(d) for d in topo.des_names]) & (np.nan_to_num(pmax) >= load) & (load > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(has, 3600.0 * energy_kwh / np.where(load > 0, load, 1.0), 0.0)
    return np.nan_to_num(t, nan=0.0, posinf=0.0)


def redundancy(values: dict, at_risk, topo) -> Redundancy:
    """The loss-of-redundancy state of every unit from one observation and the policy's latched
    components (`PolicyState.at_risk`: {(kind, index): t})."""
    ats, pdb, src = values["ats"], values["pdb"], values["source"]
    n = topo.n
    active = np.asarray(ats["ActiveSource"], np.int64)
    state = np.asarray(ats["State"], np.int64)
    second = np.where(active == 1, 2, 1)  # with no active source, either path would be "second"
    seg = topo.pdb_of[np.arange(n), second - 1]
    v_second = np.where(second == 1, np.asarray(ats["SourceAVoltage"], float),
                        np.asarray(ats["SourceBVoltage"], float)) / topo.nominal_voltage_v
    energized = np.asarray(pdb.get("Energized", np.ones(len(topo.pdb_names), bool)), bool)
    available = np.asarray(src["Available"], bool)
    with np.errstate(invalid="ignore"):
        in_band = (v_second >= TOLERANCE_PU[0]) & (v_second <= TOLERANCE_PU[1])
    gone = ~in_band | ~energized[seg] | ~available[second - 1] | (state == int(AtsState.FAULT)) | (active == 0)
    risky_seg = np.isin(seg, [i for kind, i in at_risk if kind == "pdb"])
    risky_src = np.isin(second - 1, [i for kind, i in at_risk if kind == "source"])
    warning = gone | risky_seg | risky_src
    names = [""] * n
    for u in np.flatnonzero(warning):
        if risky_src[u] or not available[second[u] - 1]:
            names[u] = topo.source_names[int(second[u]) - 1]
        else:
            names[u] = topo.pdb_names[int(seg[u])]
    return Redundancy(warning, gone, names, ride_through_s(values, topo))
