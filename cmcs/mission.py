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

Figures per run (the `P` of docs/interface.md section 7, plus details):
- dropped_loads, unserved_kwh, losses_kwh, des_throughput_kwh: the plant's ledger and totals;
  losses_kwh = distribution_losses_kwh (I^2 R of segments and contact sets) + conversion_losses_kwh
  (what the DES path wastes: the converter each way, the cells' coulombic loss);
- feed_seconds_over_80 / _over_100: per source and PDB segment, seconds whose true loading
  (not the noisy measurement) was above 80 % / 100 % of rating, summed, at 1 s resolution;
- transfers: every micro-ATS transfer in the run (commanded + automatic), and both apart;
- mitigations_before_failure: failures with precursors for which an action touched the failing
  component or its loads between precursor start and onset; their lead time = onset - first
  such action; median over the run (NaN when none);
- unnecessary_transfers: commanded transfers prompted by a risk that moved the load away from
  nothing that was really degrading: necessary is a risk transfer away from a component (the PDB
  segment left, its source, the contact set left) that was degrading at that moment (its
  precursor had started and it had not failed yet: the plant's real failure time,
  `Plant.failure_times`, which for a load-gated joint or contact set is later than scheduled, or
  never when the load was kept off it) or that failed within UNNECESSARY_WINDOW_S (balancing
  transfers are counted apart as balancing_transfers). The former rule (necessary only when a
  failure of the segment, unit or source left was *scheduled* within UNNECESSARY_WINDOW_S) is
  kept as unnecessary_transfers_scheduled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from cmcs.features import SAMPLE_INTERVAL_S
from cmcs.policy import (Observation, PolicyConfig, PolicyState, SetPreferredSource, StartBridging, StopBridging,
                         SwitchSource, Topology, decide, device_row)
from cmcs.redundancy import redundancy
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
    drops: list = field(default_factory=list)  # one dict per dropped IT load, with the plant's state then
    unit_unserved_kwh: list = field(default_factory=list)  # per unit
    latches: dict = field(default_factory=dict)  # (kind, index) -> first time the policy latched it at risk
    losses: list = field(default_factory=list)  # per-cause attribution (attribute_losses)


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
    unit_unserved = np.zeros(plant.n)
    nopath_kwh = np.zeros(plant.n)  # demand while the unit had no live path at all (exogenous faults only)
    nopath_bound_kwh = np.zeros(plant.n)  # ... less what its DES could have bridged: no policy serves it
    des_budget_kwh = np.zeros(plant.n)
    was_nopath = np.zeros(plant.n, dtype=bool)
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
    risk_transfers: list[tuple[float, int, int, int]] = []  # (t, unit, segment left, pole left)
    des_index = {name: i for i, name in enumerate(topo.des_names) if name}
    warned_since = np.full(plant.n, np.nan)  # start of each unit's loss-of-redundancy warning now on
    warnings: list[tuple[int, float, float]] = []  # (unit, start, end) of every warning episode
    unit_index = {name: i for i, name in enumerate(topo.unit_names)}
    steps = int(math.floor(scenario.duration_s / dt + 1e-9))
    sub = max(1, int(round(dt / plant.step_s)))
    t_prev = 0.0
    for k in range(1, steps + 1):
        t = k * dt
        # advance at the plant's own step and account the feeds' true loading second by second
        for j in range(1, sub + 1):
            tj = t_prev + (t - t_prev) * j / sub
            h = (t - t_prev) / sub
            # units with no live path over this step (the state at its start holds for the step, as
            # the plant's own energy integration takes it)
            nopath = ~plant.paths_alive(breakers=False).any(axis=1)
            if nopath.any():
                flows = plant.true_flows()
                demand = flows.demand_kw
                start = nopath & ~was_nopath
                if start.any():
                    can = plant.has_des & ~plant.des_fault & (plant.des_available_kw() >= flows.unit_kw)
                    des_budget_kwh[start] = np.where(can, plant.des_deliverable_kwh(), 0.0)[start]
                # single-corded racks lose their load; dual-corded ones only where the partner unit
                # (their second cord) has no path either
                dual = plant.dual_frac
                lost_kw = demand * (1.0 - dual) + demand * dual * nopath[plant.partner]
                need = np.where(nopath, h * lost_kw / 3600.0, 0.0)
                credit = np.minimum(des_budget_kwh, need)
                des_budget_kwh -= credit
                nopath_kwh += need
                nopath_bound_kwh += need - credit
            was_nopath = nopath
            plant.advance_to(tj)
            e = plant.true_flows()  # ground truth for the benchmark's figures (never shown to the policy)
            ls = e.src_kw / src_rated
            lp = e.pdb_i.max(axis=1) / pdb_rated
            over80 += h * (int((ls > 0.8).sum()) + int((lp > 0.8).sum()))
            over100 += h * (int((ls > 1.0).sum()) + int((lp > 1.0).sum()))
            unit_unserved += h * e.unserved_kw
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
        for key in state.at_risk:
            result.latches.setdefault(key, t)
        warned_since = _track_warnings(redundancy(snap, state.at_risk, topo).warning, warned_since, t, warnings)
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
                    risk_transfers.append((t, u, int(topo.pdb_of[u, 2 - a.target]), 3 - a.target))
                else:
                    balancing += 1
    totals = plant.totals()
    # per-unit unserved energy, scaled to the plant's own (exactly integrated) total
    tot = float(totals["unserved_kwh"])
    s_u = float(unit_unserved.sum())
    result.unit_unserved_kwh = list(unit_unserved * (tot / s_u) if s_u > 0 else unit_unserved)
    result.drops = [d.as_dict() for d in plant.dropped_loads]
    figs = {
        "dropped_loads": int(totals["dropped_loads"]),
        "unserved_kwh": float(totals["unserved_kwh"]),
        "feed_seconds_over_80": round(over80, 1),
        "feed_seconds_over_100": round(over100, 1),
        "transfers": int(plant.transfer_count.sum()) - transfers0,
        "commanded_transfers": commanded,
        "balancing_transfers": balancing,
        "losses_kwh": float(totals["losses_kwh"]),
        "distribution_losses_kwh": float(totals["distribution_losses_kwh"]),
        "conversion_losses_kwh": float(totals["conversion_losses_kwh"]),
        "des_throughput_kwh": float(totals["des_throughput_kwh"]),
        "refusals": len(result.refusals),
        "actions": len(result.actions),
    }
    figs["automatic_transfers"] = figs["transfers"] - commanded
    warnings += [(int(u), float(warned_since[u]), math.inf) for u in np.flatnonzero(np.isfinite(warned_since))]
    figs["drops_warned_5min"] = drops_warned(result.drops, warnings, unit_index, WARNING_LEAD_S, 2.0 * dt)
    mit, result.lead_times_s = _mitigation_figures(scenario, topo, result.actions, risk_transfers,
                                                   plant.failure_times, plant.worn_contact_sets())
    figs.update(mit)
    if result.cycle_ms:
        figs["cycle_ms_p50"] = round(float(np.percentile(result.cycle_ms, 50)), 3)
        figs["cycle_ms_p99"] = round(float(np.percentile(result.cycle_ms, 99)), 3)
    result.losses = attribute_losses(scenario, topo, result)
    figs["no_path_kwh"] = round(float(nopath_kwh.sum()), 4)
    figs["unavoidable_unserved_kwh_bound"] = round(float(nopath_bound_kwh.sum()), 4)
    figs["unavoidable_dropped_loads"] = sum(1 for r in result.losses if r["unavoidable"])
    figs["unavoidable_unserved_kwh"] = round(sum(r["unserved_kwh"] for r in result.losses if r["unavoidable"]), 4)
    figs["avoidable_dropped_loads"] = figs["dropped_loads"] - figs["unavoidable_dropped_loads"]
    figs["avoidable_unserved_kwh"] = round(max(0.0, figs["unserved_kwh"] - figs["unavoidable_unserved_kwh"]), 4)
    result.figures = figs
    return result


WARNING_LEAD_S = 300.0  # issue 16: a drop counts as warned when the unit's warning was on 5 min before it


def _track_warnings(warning: np.ndarray, since: np.ndarray, t: float, episodes: list) -> np.ndarray:
    """Update the start times of the units' loss-of-redundancy warnings; close ended episodes."""
    since = since.copy()
    started = warning & ~np.isfinite(since)
    ended = ~warning & np.isfinite(since)
    for u in np.flatnonzero(ended):
        episodes.append((int(u), float(since[u]), t))
    since[started] = t
    since[ended] = np.nan
    return since


def drops_warned(drops: list[dict], episodes: list, unit_index: dict, lead_s: float, slack_s: float) -> int:
    """Dropped loads whose unit had a loss-of-redundancy warning on from at least `lead_s` before the
    drop until the drop (within `slack_s`, the sampling: a warning seen at the last cycles before counts)."""
    count = 0
    for d in drops:
        u, t = unit_index.get(d["unit"]), float(d["t_s"])
        if u is not None and any(eu == u and start <= t - lead_s and end >= t - slack_s
                                 for eu, start, end in episodes):
            count += 1
    return count


def _apply(plant, topo: Topology, a, unit_index, des_index, InterlockRefused) -> str:
    """The command service's checks on the plant's current values, then the command; '' or the refusal."""
    snap = plant.snapshot()
    try:
        if isinstance(a, SwitchSource):
            u = unit_index[a.unit]
            s, p = a.target - 1, int(topo.pdb_of[u, a.target - 1])
            storage = device_row(snap["des"], u) if topo.des_names[u] else None
            verdict = check_switch(device_row(snap["ats"], u), a.target, source=device_row(snap["source"], s),
                                   pdb=device_row(snap["pdb"], p), storage=storage,
                                   nominal_voltage_v=topo.nominal_voltage_v, derating=topo.derating,
                                   since_last_transfer_s=plant.t_s - float(plant.last_transfer_t[u]),
                                   dwell_time_s=topo.dwell_time_s)
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.unit, "SwitchSource", Target=a.target)
        elif isinstance(a, SetPreferredSource):
            u = unit_index[a.unit]
            verdict = check_preferred(device_row(snap["ats"], u), a.source)
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.unit, "SetPreferredSource", Source=a.source)
        elif isinstance(a, StartBridging):
            u = des_index[a.des]
            verdict = check_start_bridging(device_row(snap["des"], u), a.power_kw, a.duration_s,
                                           rated_power_kw=float(topo.des_rated_kw[u]))
            if not verdict.ok:
                return f"{verdict.status}: {verdict.reason}"
            plant.command(a.des, "StartBridging", Power=a.power_kw, Duration=a.duration_s)
        elif isinstance(a, StopBridging):
            plant.command(a.des, "StopBridging")
    except (InterlockRefused, ValueError) as exc:
        return f"device refused: {exc}"
    return ""


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


def _left_components(topo: Topology, u: int, seg: int) -> dict[str, str]:
    """What a transfer of unit u off segment `seg` moves away from: device kind -> name."""
    return {"pdb": topo.pdb_names[seg], "ats": topo.unit_names[u],
            "source": topo.source_names[int(topo.pdb_feed[seg]) - 1]}


def unnecessary_scheduled(scenario, topo: Topology, risk_transfers: list) -> int:
    """The former rule: a risk transfer is necessary when a failure of the segment it left, of its unit
    or of that segment's source is *scheduled* within UNNECESSARY_WINDOW_S after it."""
    unnecessary = 0
    for t, u, seg, *_ in risk_transfers:
        left = _left_components(topo, u, seg)
        needed = any(f.kind in FAILURE_KINDS and t <= f.onset_s <= t + UNNECESSARY_WINDOW_S
                     and left.get(FAILURE_KINDS[f.kind]) == f.target for f in scenario.faults)
        unnecessary += not needed
    return unnecessary


def unnecessary_real(scenario, topo: Topology, risk_transfers: list, failure_times: dict,
                     contact_poles: dict | None = None) -> int:
    """Risk transfers that moved the load away from nothing really degrading. A transfer of unit u
    from pole q (segment `seg`) is necessary when a fault of the segment left, of that segment's
    source, or of the contact set left (contact_wear on pole q of u) was degrading at that moment
    (precursor started, real failure not yet happened: `failure_times`, the plant's record; a fault
    missing from it never failed, e.g. a joint kept empty) or really failed within
    UNNECESSARY_WINDOW_S after it. A slow actuator is not left behind by a transfer (nor does it
    fail at a transfer's expense), so it makes none necessary."""
    contact_poles = contact_poles or {}
    relevant = []
    for f in scenario.faults:
        if f.kind not in ("joint_degradation", "contact_wear", "source_outage"):
            continue
        real = failure_times.get((f.kind, f.target, float(f.onset_s)), math.inf)
        start = f.precursor_start_s if f.precursor_s > 0 else math.inf
        relevant.append((f, start, real))
    unnecessary = 0
    for t, u, seg, pole in risk_transfers:
        left = _left_components(topo, u, seg)
        needed = False
        for f, start, real in relevant:
            kind = FAILURE_KINDS[f.kind]
            if left[kind] != f.target:
                continue
            if kind == "ats" and contact_poles.get((f.target, float(f.onset_s)), pole) != pole:
                continue  # the worn set is the one the unit moved onto, not the one it left
            if start <= t <= real or t <= real <= t + UNNECESSARY_WINDOW_S:
                needed = True
                break
        unnecessary += not needed
    return unnecessary


def _mitigation_figures(scenario, topo: Topology, actions: list, risk_transfers: list,
                        failure_times: dict, contact_poles: dict) -> tuple[dict, list]:
    failures = [f for f in scenario.faults if f.kind in FAILURE_KINDS and f.precursor_s > 0]
    leads = []
    for f in failures:
        times = [t for t, a in actions if f.precursor_start_s <= t < f.onset_s and _touches(a, f, topo)]
        if times:
            leads.append(f.onset_s - min(times))
    return {
        "failures_with_precursors": len(failures),
        "mitigations_before_failure": len(leads),
        "median_mitigation_lead_time_s": round(float(np.median(leads)), 1) if leads else float("nan"),
        "risk_transfers": len(risk_transfers),
        "unnecessary_transfers": unnecessary_real(scenario, topo, risk_transfers, failure_times, contact_poles),
        "unnecessary_transfers_scheduled": unnecessary_scheduled(scenario, topo, risk_transfers),
    }, leads


# ---- where the losses come from ---------------------------------------------------------------------

LOSS_MECHANISMS = {
    "no_path_des_exhausted": "no path left (both feeds of the unit lost); its DES carried the load until empty",
    "no_path_des_cannot_carry": "no path left; DES absent, failed or too small for the load (power binds)",
    "no_path_des_not_online": "no path left at an arcing failure; DES could carry but was not online",
    "slow_transfer_des_cannot_carry": "slow micro-ATS transfer; DES too small or failed to ride it through",
    "slow_transfer_des_not_online": "slow micro-ATS transfer; DES could carry but was not online",
    "arcing_on_active_path": "arcing failure on the path the load was on (not moved, DES not online)",
    "overload_trip": "overload trip of a feed",
    "other": "other",
}


def _fault_of_drop(d: dict, scenario, topo: Topology) -> tuple[str, str]:
    """(fault kind, target) that caused a drop, from the ledger's cause and the scenario's fault list."""
    cause = d["cause"]
    t = d["t_s"]
    if cause.startswith("joint failure "):
        return "joint_degradation", cause.split()[-1]
    if cause.startswith("contact failure "):
        return "contact_wear", cause.split()[-1]
    if d.get("slow_ms", 0.0) > 0 and math.isfinite(d["duration_ms"]):
        return "ats_slow_transfer", d["unit"]
    if cause in ("source outage", "voltage sag", "voltage swell"):
        kind = {"source outage": "source_outage", "voltage sag": "voltage_sag", "voltage swell": "voltage_swell"}[cause]
        near = [f for f in scenario.faults if f.kind == kind and abs(f.onset_s - t) < 1.0]
        return kind, (near[0].target if near else "?")
    if cause.startswith("storage"):
        # the DES carried the unit after it lost its last path: blame the last fault on that unit's paths
        u = topo.unit_names.index(d["unit"])
        mine = {topo.pdb_names[p] for p in topo.pdb_of[u]} | set(topo.source_names) | {d["unit"]}
        past = [f for f in scenario.faults if f.onset_s <= t and f.target in mine
                and f.kind in ("joint_degradation", "contact_wear", "source_outage")]
        if past:
            f = max(past, key=lambda f: f.onset_s)
            return f.kind, f.target
        return "storage", d["unit"]
    if cause == "overload trip":
        return "overload", "-"
    return "other", cause


def _mechanism(d: dict) -> tuple[str, bool]:
    """(mechanism, unavoidable). Unavoidable: the unit had no live path at all and its DES could not
    have bridged the gap (absent, failed, too small for the load, or it ran empty): no transfer and no
    pre-arming changes that. Where the DES could have carried the load, the drop counts as avoidable,
    even where the path was gone for good (pre-arming would only have delayed it): a conservative bound."""
    cause = d["cause"]
    both_lost = "feed_ok" in d and not any(d["feed_ok"])
    des_can = bool(d.get("des")) and not d.get("des_fault") and d.get("des_pmax_kw", 0.0) >= d.get("load_kw", 0.0)
    if cause == "overload trip":
        return "overload_trip", False
    if both_lost:
        if cause.startswith("storage"):
            return "no_path_des_exhausted", True
        # the plant's own verdict at the moment the paths were lost: a dark load's drop is recorded later,
        # when its DES has left bridging and its load no longer holds its dual-corded partner's share
        des_can = d.get("des_could_carry_at_loss", des_can)
        if not des_can or (cause in ("source outage", "voltage sag", "voltage swell")
                           and not math.isfinite(d["duration_ms"])):
            # no arcing here: the DES picks the load up in 8 ms on its own when it can carry it, so a
            # dark drop means the plant found it could not (power at its limit, partner's cord share)
            return "no_path_des_cannot_carry", True
        return "no_path_des_not_online", False
    if d.get("slow_ms", 0.0) > 0 and math.isfinite(d["duration_ms"]):
        return ("slow_transfer_des_not_online" if des_can else "slow_transfer_des_cannot_carry"), False
    if cause.startswith(("joint failure", "contact failure")):
        return "arcing_on_active_path", False
    return "other", False


def attribute_losses(scenario, topo: Topology, result: MissionResult) -> list[dict]:
    """One row per dropped load: the fault behind it, whether (and when) the policy had latched that
    component at risk, the mechanism, whether any policy could have prevented it, and its share of the
    unserved energy (a unit's unserved energy split evenly over that unit's drops)."""
    per_unit: dict[str, int] = {}
    for d in result.drops:
        per_unit[d["unit"]] = per_unit.get(d["unit"], 0) + 1
    kinds = {"joint_degradation": "pdb", "contact_wear": "ats", "ats_slow_transfer": "ats", "source_outage": "source",
             "battery_fade": "des"}
    rows = []
    for d in result.drops:
        kind, target = _fault_of_drop(d, scenario, topo)
        mech, unavoidable = _mechanism(d)
        faults = [f for f in scenario.faults if f.kind == kind and f.target == target]
        f = min(faults, key=lambda f: abs(f.onset_s - d["t_s"])) if faults else None
        latched = None
        if kind in kinds:
            names = {"pdb": topo.pdb_names, "ats": topo.unit_names, "source": topo.source_names,
                     "des": topo.des_names}[kinds[kind]]
            if target in names:
                latched = result.latches.get((kinds[kind], names.index(target)))
        lead = (f.onset_s - latched) if (f is not None and latched is not None and latched <= f.onset_s) else None
        u = topo.unit_names.index(d["unit"]) if d["unit"] in topo.unit_names else -1
        share = (result.unit_unserved_kwh[u] / per_unit[d["unit"]]) if u >= 0 and result.unit_unserved_kwh else 0.0
        rows.append({
            "scenario": scenario.name, "t_s": round(d["t_s"], 3), "load": d["load"], "cause": d["cause"],
            "fault": kind, "target": target, "precursor_s": (f.precursor_s if f is not None else None),
            "predicted": latched is not None and (f is None or latched <= f.onset_s),
            "lead_s": lead, "mechanism": mech, "unavoidable": unavoidable, "unserved_kwh": round(share, 4),
        })
    return rows
