"""The CMCS in simulated time: replay a scenario on a Plant under a policy (the benchmark's adapter).

The plant is sampled every `SAMPLE_INTERVAL_S` exactly as the live client sees it
(`Plant.snapshot()`, every device fresh); features, risk and forecasts come from the same
streaming pipeline and models as the live loop; `cmcs.policy.decide` chooses the actions; each
action is checked against the command service's interlocks (`siteconfig.interlocks`, dwell time
from the plant's last transfer, rating at the site's derating) and then applied with
`plant.command`. A refusal at either stage is counted: the policy must never cause one.

Policies: "hardware_only" (no CMCS: only the micro-ATS local logic), "threshold" (risk = the
static DCIM thresholds of cmcs.baselines, alarm at score >= 1, i.e. at the nominal limits),
"ml" (risk = Predictor output, alarm at the bundle's operating thresholds).

Figures per run (the `P` of INTERFACE.md section 7, plus details):
- dropped_loads, unserved_kwh, losses_kwh, des_throughput_kwh: the plant's ledger and totals;
- feed_seconds_over_80 / _over_100: per source and PDB segment, seconds whose true loading
  (not the noisy measurement) was above 80 % / 100 % of rating, summed, at 1 s resolution;
- transfers: every micro-ATS transfer in the run (commanded + automatic), and both apart;
- mitigations_before_failure: failures with precursors for which an action touched the failing
  component or its loads between precursor start and onset; their lead time = onset - first
  such action; median over the run (NaN when none);
- unnecessary_transfers: commanded transfers prompted by a risk that were not followed, within
  UNNECESSARY_WINDOW_S, by a failure of the component they moved away from (balancing
  transfers are counted apart as balancing_transfers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from cmcs.features import SAMPLE_INTERVAL_S
from cmcs.policy import (Observation, PolicyConfig, PolicyState, SetPreferredSource, StartBridging,
                         StopBridging, SwitchSource, Topology, decide)
from siteconfig.interlocks import check_preferred, check_start_bridging, check_switch

POLICIES = ("hardware_only", "threshold", "ml")
FAILURE_KINDS = {"source_outage": "source", "joint_degradation": "pdb", "contact_wear": "ats",
                 "ats_slow_transfer": "ats", "battery_fade": "des"}
UNNECESSARY_WINDOW_S = 3600.0
# Without a bundle, the DCIM alarms at these margins over the nominal limits (score = reading / limit):
# the values `cmcs train --quick` tuned to its false-alarm budget. At the nominal limits (1.0) every
# joint of the demo hall alarms (NETA 4 K rise is exceeded in normal service) and nothing can move.
DEFAULT_DCIM_MARGINS = {"source": 1.05, "pdb": 2.0, "ats": 1.8, "des": 1.0}


@dataclass
class MissionResult:
    scenario: str
    policy: str
    figures: dict
    actions: list = field(default_factory=list)  # (t_s, action)
    refusals: list = field(default_factory=list)  # (t_s, action, reason)
    cycle_ms: list = field(default_factory=list)
    lead_times_s: list = field(default_factory=list)  # per mitigated failure


def policy_config(policy: str, site, predictor=None) -> PolicyConfig | None:
    """The PolicyConfig of a named policy (None for hardware_only)."""
    topo = Topology.from_site(site)
    if policy == "hardware_only":
        return None
    if policy == "threshold":
        # the DCIM at its best shot: the margins tuned on the same false-alarm budget as the models
        margins = dict(predictor.baseline_margins) if predictor is not None and predictor.baseline_margins else {}
        return PolicyConfig(topology=topo, variant="threshold",
                            thresholds={k: margins.get(k, DEFAULT_DCIM_MARGINS[k]) for k in ("source", "pdb", "ats", "des")})
    if policy == "ml":
        if predictor is None:
            raise ValueError("the ml policy needs a Predictor")
        return PolicyConfig(topology=topo, variant="ml", thresholds=dict(predictor.thresholds))
    raise ValueError(f"unknown policy {policy!r}; one of {', '.join(POLICIES)}")


def run_mission(site, scenario, policy: str, predictor=None, config: PolicyConfig | None = None) -> MissionResult:
    """Replay `scenario` on a fresh plant under `policy`; returns the figures."""
    from cmcs.features import FeatureState
    from simulator.plant import InterlockRefused, Plant

    plant = Plant(site, scenario)
    cfg = config if config is not None else policy_config(policy, site, predictor)
    topo = cfg.topology if cfg is not None else Topology.from_site(site)
    state = PolicyState()
    dt = float(predictor.sample_interval_s) if predictor is not None else SAMPLE_INTERVAL_S
    fs = FeatureState(site, dt) if cfg is not None else None
    warmup_s = float(predictor.warmup_s) if predictor is not None else 0.0
    transfers0 = int(plant.transfer_count.sum())
    src_rated = plant.src_rated_kw
    pdb_rated = plant.pdb_rated_a
    over80 = over100 = 0.0
    result = MissionResult(scenario.name, policy, {})
    commanded = balancing = 0
    risk_transfers: list[tuple[float, int, int]] = []  # (t, unit, segment left)
    des_index = {name: i for i, name in enumerate(topo.des_names) if name}
    unit_index = {name: i for i, name in enumerate(topo.unit_names)}
    steps = int(math.floor(scenario.duration_s / dt + 1e-9))
    sub = max(1, int(round(dt / plant.step_s)))
    t_prev = 0.0
    for k in range(1, steps + 1):
        t = k * dt
        # advance at the plant's own step and account the feeds' true loading second by second
        for j in range(1, sub + 1):
            tj = t_prev + (t - t_prev) * j / sub
            plant.advance_to(tj)
            e = plant._elec  # ground truth for the benchmark's figures (never shown to the policy)
            h = (t - t_prev) / sub
            ls = e["src_kw"] / src_rated
            lp = e["pdb_i"].max(axis=1) / pdb_rated
            over80 += h * (int((ls > 0.8).sum()) + int((lp > 0.8).sum()))
            over100 += h * (int((ls > 1.0).sum()) + int((lp > 1.0).sum()))
        t_prev = t
        if cfg is None:
            continue
        t0 = time.perf_counter()
        snap = plant.snapshot()
        feats = fs.update(t, snap)
        risk = None
        forecast = None
        if cfg.variant == "threshold":
            risk = fs.baseline_scores
        elif fs.t_s - fs.t0_s >= warmup_s:
            risk = predictor.predict(feats)
            fc = predictor.forecast(feats, fs.load_level_kw)
            h_s = 300 if 300 in fc else sorted(fc)[0]
            forecast = fc[h_s]
        if forecast is None:
            forecast = fs.load_level_kw
        obs = Observation(t_s=t, values=snap, risk=risk, forecast_kw=forecast)
        actions = decide(obs, state, cfg)
        result.cycle_ms.append((time.perf_counter() - t0) * 1000.0)
        for a in actions:
            reason = _apply(plant, topo, a, unit_index, des_index, InterlockRefused)
            if reason:
                result.refusals.append((t, a, reason))
                continue
            result.actions.append((t, a))
            if isinstance(a, SwitchSource):
                commanded += 1
                if a.component:
                    u = unit_index[a.unit]
                    risk_transfers.append((t, u, int(topo.pdb_of[u, 2 - a.target])))
                else:
                    balancing += 1
    totals = plant.totals()
    figs = {
        "dropped_loads": int(totals["dropped_loads"]),
        "unserved_kwh": float(totals["unserved_kwh"]),
        "feed_seconds_over_80": round(over80, 1),
        "feed_seconds_over_100": round(over100, 1),
        "transfers": int(plant.transfer_count.sum()) - transfers0,
        "commanded_transfers": commanded,
        "balancing_transfers": balancing,
        "losses_kwh": float(totals["losses_kwh"]),
        "des_throughput_kwh": float(totals["des_throughput_kwh"]),
        "refusals": len(result.refusals),
        "actions": len(result.actions),
    }
    figs["automatic_transfers"] = figs["transfers"] - commanded
    mit, result.lead_times_s = _mitigation_figures(scenario, topo, result.actions, risk_transfers)
    figs.update(mit)
    if result.cycle_ms:
        figs["cycle_ms_p50"] = round(float(np.percentile(result.cycle_ms, 50)), 3)
        figs["cycle_ms_p99"] = round(float(np.percentile(result.cycle_ms, 99)), 3)
    result.figures = figs
    return result


def _apply(plant, topo: Topology, a, unit_index, des_index, InterlockRefused) -> str:
    """The command service's checks on the plant's current values, then the command; '' or the refusal."""
    snap = plant.snapshot()
    try:
        if isinstance(a, SwitchSource):
            u = unit_index[a.unit]
            s, p = a.target - 1, int(topo.pdb_of[u, a.target - 1])
            storage = _row(snap["des"], u) if topo.des_names[u] else None
            verdict = check_switch(_row(snap["ats"], u), a.target, source=_row(snap["source"], s),
                                   pdb=_row(snap["pdb"], p), storage=storage,
                                   nominal_voltage_v=topo.nominal_voltage_v, derating=topo.derating,
                                   since_last_transfer_s=plant.t_s - float(plant.last_transfer_t[u]),
                                   dwell_time_s=topo.dwell_time_s)
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.unit, "SwitchSource", Target=a.target)
        elif isinstance(a, SetPreferredSource):
            u = unit_index[a.unit]
            verdict = check_preferred(_row(snap["ats"], u), a.source)
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.unit, "SetPreferredSource", Source=a.source)
        elif isinstance(a, StartBridging):
            u = des_index[a.des]
            verdict = check_start_bridging(_row(snap["des"], u), a.power_kw, a.duration_s,
                                           rated_power_kw=float(topo.des_rated_kw[u]))
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.des, "StartBridging", Power=a.power_kw, Duration=a.duration_s)
        elif isinstance(a, StopBridging):
            plant.command(a.des, "StopBridging")
    except (InterlockRefused, ValueError) as exc:
        return f"device refused: {exc}"
    return ""


def _row(d: dict, i: int) -> dict:
    return {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in d.items()}


def _touches(a, fault, topo: Topology) -> bool:
    """Does action `a` act on the failing component or on the loads it feeds?"""
    kind = FAILURE_KINDS[fault.kind]
    unit = getattr(a, "unit", None)
    des = getattr(a, "des", None)
    u = topo.unit_names.index(unit) if unit else (topo.des_names.index(des) if des else -1)
    if u < 0:
        return False
    if kind == "ats":
        return topo.unit_names[u] == fault.target
    if kind == "des":
        return topo.des_names[u] == fault.target
    if kind == "pdb":
        p = topo.pdb_names.index(fault.target)
        if p not in topo.pdb_of[u]:
            return False
        feed = int(topo.pdb_feed[p])
        if isinstance(a, SwitchSource) or isinstance(a, SetPreferredSource):
            return getattr(a, "target", getattr(a, "source", 0)) == 3 - feed  # away from the segment
        return isinstance(a, StartBridging)
    if kind == "source":
        s = topo.source_names.index(fault.target) + 1
        if isinstance(a, (SwitchSource, SetPreferredSource)):
            return getattr(a, "target", getattr(a, "source", 0)) == 3 - s
        return isinstance(a, StartBridging)
    return False


def _mitigation_figures(scenario, topo: Topology, actions: list, risk_transfers: list) -> tuple[dict, list]:
    failures = [f for f in scenario.faults if f.kind in FAILURE_KINDS and f.precursor_s > 0]
    leads = []
    for f in failures:
        times = [t for t, a in actions if f.precursor_start_s <= t < f.onset_s and _touches(a, f, topo)]
        if times:
            leads.append(f.onset_s - min(times))
    # a risk transfer is necessary when the segment it left, its unit or its source failed soon after
    unnecessary = 0
    for t, u, seg in risk_transfers:
        needed = False
        for f in scenario.faults:
            if f.kind not in FAILURE_KINDS or not (t <= f.onset_s <= t + UNNECESSARY_WINDOW_S):
                continue
            kind = FAILURE_KINDS[f.kind]
            if (kind == "pdb" and f.target == topo.pdb_names[seg]) or \
               (kind == "ats" and f.target == topo.unit_names[u]) or \
               (kind == "source" and f.target == topo.source_names[int(topo.pdb_feed[seg]) - 1]):
                needed = True
                break
        unnecessary += not needed
    return {
        "failures_with_precursors": len(failures),
        "mitigations_before_failure": len(leads),
        "median_mitigation_lead_time_s": round(float(np.median(leads)), 1) if leads else float("nan"),
        "unnecessary_transfers": unnecessary,
    }, leads
