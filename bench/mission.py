"""`cmcs bench mission`: each scenario replayed under three policies on the same plant.

(a) hardware_only: micro-ATS local transfer, no CMCS; (b) threshold: the CMCS policy driven by
static DCIM threshold alarms; (c) ml: the same policy driven by the model bundle's risk scores.
Figures per policy are summed over scenarios (lead time: median over all mitigated failures);
the JSON carries docs/interface.md section 7's keys and more. Targets (issue 6): (c) at most 10 % of
(a)'s dropped loads and unserved energy and strictly fewer than (b), zero feed-seconds above
100 %, no more than twice (a)'s transfers.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import markdown_table, write_json

POLICIES = ("hardware_only", "threshold", "ml")
SUM_KEYS = ("dropped_loads", "unserved_kwh", "feed_seconds_over_80", "feed_seconds_over_100", "transfers",
            "commanded_transfers", "automatic_transfers", "balancing_transfers", "mitigations_before_failure",
            "failures_with_precursors", "risk_transfers", "unnecessary_transfers",
            "unnecessary_transfers_scheduled", "losses_kwh", "distribution_losses_kwh",
            "conversion_losses_kwh", "des_throughput_kwh", "refusals",
            "actions", "unavoidable_dropped_loads", "unavoidable_unserved_kwh", "avoidable_dropped_loads",
            "avoidable_unserved_kwh", "no_path_kwh", "unavoidable_unserved_kwh_bound", "drops_warned_5min")
HELDOUT = Path(__file__).resolve().parent.parent / "simulator" / "scenarios" / "heldout"
LIBRARY = Path(__file__).resolve().parent.parent / "simulator" / "scenarios"

_PREDICTOR: dict = {}


def _job(task):
    i, site, scenario, policy, bundle = task
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cmcs.mission import run_mission
    from cmcs.models import Predictor

    if bundle not in _PREDICTOR:
        _PREDICTOR[bundle] = Predictor.load(bundle)
        for pair in _PREDICTOR[bundle].risk_boosters.values():
            for b in pair:
                b.set_param({"nthread": 1})
        for b in _PREDICTOR[bundle].load_boosters.values():
            b.set_param({"nthread": 1})
    r = run_mission(site, scenario, policy, _PREDICTOR[bundle])
    return (i, scenario.name, policy, r.figures, [(t, str(a), why) for t, a, why in r.refusals], r.lead_times_s,
            r.losses)


def cycle_time(bundle: Path, aisles: int = 20, units_per_aisle: int = 50, cycles: int = 200,
               warm_cycles: int = 20, seed: int = 810999) -> dict:
    """One full CMCS cycle on a generated site (default 1,000 units): FeatureState.update +
    Predictor.predict + Predictor.forecast + policy.decide, timed together, the plant's own
    simulation between cycles not counted. The plant replays a random fault-rich scenario, and
    PDB segments and a source are put at risk in turn so that the mitigation and balancing paths
    (the policy's expensive parts) are timed too; the actions are applied to the plant (as the live
    loop would), untimed. Single-threaded inference (nthread 1), as in the benchmark's workers."""
    from cmcs.features import FeatureState
    from cmcs.models import Predictor
    from cmcs.policy import Observation, PolicyState, decide
    from cmcs.mission import _apply, policy_config
    from siteconfig.demo import generate_site
    from simulator.plant import InterlockRefused, Plant
    from simulator.scenario import random_scenario

    site = generate_site(aisles, units_per_aisle)
    predictor = Predictor.load(bundle)
    for pair in predictor.risk_boosters.values():
        for b in pair:
            b.set_param({"nthread": 1})
    for b in predictor.load_boosters.values():
        b.set_param({"nthread": 1})
    sc = random_scenario(site, seed, duration_s=(cycles + warm_cycles + 10) * predictor.sample_interval_s)
    plant = Plant(site, sc)
    cfg = policy_config("ml", site, predictor)
    cfg.safe_start_cycles = 0
    topo = cfg.topology
    unit_index = {name: i for i, name in enumerate(topo.unit_names)}
    des_index = {name: i for i, name in enumerate(topo.des_names) if name}
    state = PolicyState()
    fs = FeatureState(site, predictor.sample_interval_s)
    dt = predictor.sample_interval_s
    times = []
    stage = {"features": [], "inference": [], "policy": []}
    n_units = len(site.units)
    for k in range(1, cycles + warm_cycles + 1):
        t = k * dt
        plant.advance_to(t)
        snap = plant.snapshot()
        t0 = time.perf_counter()
        feats = fs.update(t, snap)
        t1 = time.perf_counter()
        risk = predictor.predict(feats)
        fc = predictor.forecast(feats, fs.load_level_kw)
        t2 = time.perf_counter()
        risk = {kk: np.array(v, dtype=float) for kk, v in risk.items()}
        # a busy site: a different PDB segment goes at risk every 50 cycles, and source B from the
        # 100th cycle on, so that the mitigation path (its bursts of moves and arms) is timed too
        risk["pdb"][(k // 50) * 3 % len(risk["pdb"])] = 1.0
        if k >= 100:
            risk["source"][1] = 1.0
        obs = Observation(t_s=t, values=snap, risk=risk, forecast_kw=fc.get(300))
        actions = decide(obs, state, cfg)
        t3 = time.perf_counter()
        for a in actions:  # applied as the live loop would (the plant's time is not counted)
            _apply(plant, topo, a, unit_index, des_index, InterlockRefused)
        if k > warm_cycles:
            times.append((t3 - t0) * 1000.0)
            stage["features"].append((t1 - t0) * 1000.0)
            stage["inference"].append((t2 - t1) * 1000.0)
            stage["policy"].append((t3 - t2) * 1000.0)
    load1, load5, _ = os.getloadavg()
    out = {
        "units": n_units, "cycles": len(times),
        "cycle_ms_p50": round(float(np.percentile(times, 50)), 2),
        "cycle_ms_p99": round(float(np.percentile(times, 99)), 2),
        "cycle_ms_max": round(float(np.max(times)), 2),
        "stage_ms_p50": {k: round(float(np.percentile(v, 50)), 2) for k, v in stage.items()},
        "stage_ms_p99": {k: round(float(np.percentile(v, 99)), 2) for k, v in stage.items()},
        "load_average_1min": round(load1, 2), "cpus": os.cpu_count(),
    }
    return out


def default_scenario_dir() -> Path:
    return HELDOUT if HELDOUT.is_dir() and any(HELDOUT.glob("*.y*ml")) else LIBRARY


def default_bundle() -> Path:
    from cmcs.models import SHIPPED_BUNDLE

    return Path(os.environ.get("CMCS_BUNDLE", SHIPPED_BUNDLE))


def _layout_note(figures: dict) -> str:
    lay = figures.get("bundle_layout") or {}
    other = [c["summary"] for c in lay.get("sites", {}).values() if not c["matches"]]
    if not other:
        return ""
    return (f" (trained for {lay['bundle'].get('summary', '?')}; replayed as given on another layout: "
            f"{'; '.join(other)}, where the live CMCS would stay Advisory)")


def bundle_layouts(predictor, jobs) -> dict:
    """The layout the bundle was trained for, and whether each scenario site matches it (cmcs.layout):
    the benchmark replays the bundle on every site, and says where the live CMCS would hold back."""
    from cmcs.layout import bundle_layout, check_layout

    sites = {}
    for site, _sc in jobs:
        if site.name not in sites:
            check = check_layout(predictor.meta, site)
            sites[site.name] = {"fingerprint": check.site_fingerprint, "summary": check.site_summary,
                                "matches": check.matches}
    return {"bundle": bundle_layout(predictor.meta), "sites": sites}


def run(out: Path, json_path: Path | None, scenarios: Path | None = None, bundle: Path | None = None,
        quick: bool = False, processes: int = 2, cycle: bool = True) -> dict:
    from cmcs.models import BundleError, Predictor
    from cmcs.train import load_scenario_folder
    from gateway.cli import CliError

    folder = Path(scenarios) if scenarios else default_scenario_dir()
    bundle = Path(bundle) if bundle else default_bundle()
    try:
        predictor = Predictor.load(bundle)
    except BundleError as exc:
        raise CliError(f"{exc} (train one with `cmcs train`, or set CMCS_BUNDLE)") from None
    jobs = load_scenario_folder(folder)
    if quick:
        jobs = jobs[:3]
    print(f"mission: {len(jobs)} scenarios from {folder}, bundle {predictor.version} ({bundle}), "
          f"{len(POLICIES)} policies, {processes} processes", file=sys.stderr)
    layouts = bundle_layouts(predictor, jobs)
    for name, check in layouts["sites"].items():
        if not check["matches"]:
            print(f"mission: bundle {predictor.version} was trained for another layout "
                  f"({layouts['bundle'].get('summary', '?')}); site {check['summary']}: replayed anyway "
                  "(the live CMCS would stay Advisory there)", file=sys.stderr)
    tasks = [(i * len(POLICIES) + k, site, sc, pol, str(bundle)) for i, (site, sc) in enumerate(jobs)
             for k, pol in enumerate(POLICIES)]
    tasks.sort(key=lambda t: -len(t[1].units) * t[2].duration_s)
    results: dict = {}
    t0 = time.time()
    done = 0

    def progress(name, pol, figs):
        nonlocal done
        done += 1
        print(f"  [{done}/{len(tasks)}] {time.time() - t0:6.0f} s  {name:<32} {pol:<14} dropped "
              f"{figs['dropped_loads']:>3}  unserved {figs['unserved_kwh']:7.3f} kWh  transfers "
              f"{figs['transfers']:>4}  refusals {figs['refusals']}", file=sys.stderr, flush=True)

    if processes <= 1 or len(tasks) <= 1:
        for task in tasks:
            i, name, pol, figs, refusals, leads, losses = _job(task)
            results[i] = (name, pol, figs, refusals, leads, losses)
            progress(name, pol, figs)
    else:
        # spawn, not fork: the parent has loaded xgboost (OpenMP), and a forked OpenMP runtime can hang
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(processes, 2, len(tasks))) as pool:
            for i, name, pol, figs, refusals, leads, losses in pool.imap_unordered(_job, tasks):
                results[i] = (name, pol, figs, refusals, leads, losses)
                progress(name, pol, figs)
    figures = summarise(results, len(jobs))
    figures["scenario_dir"] = str(folder)
    figures["bundle"] = predictor.version
    figures["bundle_layout"] = layouts
    if cycle:
        print("mission: cycle time on a generated 1,000-unit site ...", file=sys.stderr, flush=True)
        ct = cycle_time(bundle, cycles=50 if quick else 200)
        figures["cycle_time"] = ct
        figures["cycle_ms_p50_1000_units"] = ct["cycle_ms_p50"]
        figures["cycle_ms_p99_1000_units"] = ct["cycle_ms_p99"]
        figures["targets"]["cycle_ms_p99_1000_units_lt_100"] = ct["cycle_ms_p99"] < 100.0
    write_report(out, figures)
    write_json(json_path, figures)
    return figures


def summarise(results: dict, n_scenarios: int) -> dict:
    per_policy = {p: {k: 0.0 for k in SUM_KEYS} for p in POLICIES}
    leads = {p: [] for p in POLICIES}
    per_scenario: dict = {}
    refusals = {p: [] for p in POLICIES}
    cycle_p99 = {p: [] for p in POLICIES}
    losses = {p: [] for p in POLICIES}
    for i in sorted(results):
        name, pol, figs, refs, lt, ls = results[i]
        losses[pol] += ls
        for k in SUM_KEYS:
            per_policy[pol][k] += figs.get(k, 0) or 0
        leads[pol] += lt
        refusals[pol] += refs
        if "cycle_ms_p99" in figs:
            cycle_p99[pol].append(figs["cycle_ms_p99"])
        per_scenario.setdefault(name, {})[pol] = figs
    out = {"policies": {}, "scenarios": n_scenarios, "per_scenario": per_scenario}
    for p in POLICIES:
        P = per_policy[p]
        for k in SUM_KEYS:
            v = P[k]
            P[k] = int(round(v)) if k in ("dropped_loads", "transfers", "commanded_transfers", "automatic_transfers",
                                          "balancing_transfers", "mitigations_before_failure",
                                          "failures_with_precursors", "risk_transfers", "unnecessary_transfers",
                                          "unnecessary_transfers_scheduled", "refusals",
                                          "actions", "unavoidable_dropped_loads", "avoidable_dropped_loads",
                                          "drops_warned_5min") \
                else round(float(v), 4)
        P["median_mitigation_lead_time_s"] = round(float(np.median(leads[p])), 1) if leads[p] else None
        if cycle_p99[p]:
            P["cycle_ms_p99_max"] = round(max(cycle_p99[p]), 3)
        P["refusal_examples"] = refusals[p][:5]
        out["policies"][p] = P
    a, b, c = (out["policies"][p] for p in POLICIES)

    def le_frac(x, y, frac):
        return x <= frac * y if y > 0 else x == 0

    out["targets"] = {
        "ml_dropped_loads_le_10pct_of_hardware_only": le_frac(c["dropped_loads"], a["dropped_loads"], 0.1),
        "ml_unserved_kwh_le_10pct_of_hardware_only": le_frac(c["unserved_kwh"], a["unserved_kwh"], 0.1),
        "ml_dropped_loads_lt_threshold": c["dropped_loads"] < b["dropped_loads"],
        "ml_unserved_kwh_lt_threshold": c["unserved_kwh"] < b["unserved_kwh"],
        "ml_zero_feed_seconds_over_100": c["feed_seconds_over_100"] == 0,
        "ml_transfers_le_2x_hardware_only": c["transfers"] <= 2 * a["transfers"],
        "no_refusals": all(out["policies"][p]["refusals"] == 0 for p in POLICIES),
        # issue 16: distribution and DES conversion losses together, no higher than without a CMCS
        "ml_losses_le_hardware_only": c["losses_kwh"] <= a["losses_kwh"],
    }
    # what no policy could prevent (see cmcs.mission.attribute_losses): the same hardware-only losses
    # split into avoidable and unavoidable, and the targets restated on the avoidable part
    # the no-path bound depends a little on the run (DES state of charge when a path is lost): the
    # smallest of the three is taken, which counts more of every policy's loss as avoidable
    bound = min(out["policies"][p]["unavoidable_unserved_kwh_bound"] for p in POLICIES)
    a_avoid_kwh = max(a["unserved_kwh"] - bound, 0.0)
    c_avoid_kwh = max(c["unserved_kwh"] - bound, 0.0)
    out["avoidable"] = {
        "hardware_only_dropped_loads": a["dropped_loads"],
        "hardware_only_unavoidable_dropped_loads": a["unavoidable_dropped_loads"],
        "hardware_only_unavoidable_share": round(a["unavoidable_dropped_loads"] / a["dropped_loads"], 3)
        if a["dropped_loads"] else None,
        "hardware_only_unserved_kwh": a["unserved_kwh"],
        "unavoidable_unserved_kwh_bound": round(bound, 4),
        "hardware_only_unavoidable_unserved_share": round(bound / a["unserved_kwh"], 3) if a["unserved_kwh"] else None,
        "ml_unavoidable_dropped_loads": c["unavoidable_dropped_loads"],
        "ml_avoidable_dropped_loads": c["avoidable_dropped_loads"],
        "ml_avoidable_unserved_kwh": round(c_avoid_kwh, 4),
        "ml_avoidable_dropped_loads_pct_of_hardware_only_avoidable": round(
            100.0 * c["avoidable_dropped_loads"] / a["avoidable_dropped_loads"], 1) if a["avoidable_dropped_loads"] else None,
        "ml_avoidable_unserved_pct_of_hardware_only_avoidable": round(100.0 * c_avoid_kwh / a_avoid_kwh, 1)
        if a_avoid_kwh > 0 else None,
        "best_possible_dropped_loads_pct_of_hardware_only": round(
            100.0 * a["unavoidable_dropped_loads"] / a["dropped_loads"], 1) if a["dropped_loads"] else None,
    }
    out["loss_breakdown"] = {p: _breakdown(losses[p]) for p in POLICIES}
    out["losses"] = {p: losses[p] for p in POLICIES}
    return out


def _breakdown(rows: list[dict]) -> list[dict]:
    """Dropped loads and unserved energy grouped by fault kind, mechanism and whether it was predicted."""
    groups: dict = {}
    for r in rows:
        key = (r["fault"], r["mechanism"], bool(r["predicted"]), bool(r["unavoidable"]))
        g = groups.setdefault(key, {"fault": key[0], "mechanism": key[1], "predicted": key[2],
                                    "unavoidable": key[3], "dropped_loads": 0, "unserved_kwh": 0.0,
                                    "scenarios": set(), "leads": []})
        g["dropped_loads"] += 1
        g["unserved_kwh"] += r["unserved_kwh"]
        g["scenarios"].add(r["scenario"])
        if r.get("lead_s") is not None:
            g["leads"].append(r["lead_s"])
    out = []
    for g in sorted(groups.values(), key=lambda g: (-g["dropped_loads"], -g["unserved_kwh"])):
        out.append({**{k: g[k] for k in ("fault", "mechanism", "predicted", "unavoidable", "dropped_loads")},
                    "unserved_kwh": round(g["unserved_kwh"], 3), "scenarios": len(g["scenarios"]),
                    "median_lead_s": round(float(np.median(g["leads"])), 0) if g["leads"] else None})
    return out


ROWS = (("dropped loads (ITIC)", "dropped_loads"), ("unserved energy (kWh)", "unserved_kwh"),
        ("feed-seconds > 80 %", "feed_seconds_over_80"), ("feed-seconds > 100 %", "feed_seconds_over_100"),
        ("transfers (all)", "transfers"), ("  commanded", "commanded_transfers"),
        ("  of which balancing", "balancing_transfers"),
        ("mitigations before failure", "mitigations_before_failure"),
        ("failures with precursors", "failures_with_precursors"),
        ("median mitigation lead time (s)", "median_mitigation_lead_time_s"),
        ("risk transfers (commanded, not balancing)", "risk_transfers"),
        ("unnecessary transfers (nothing really degrading left)", "unnecessary_transfers"),
        ("unnecessary transfers (former rule: no failure scheduled within 1 h)", "unnecessary_transfers_scheduled"),
        ("losses (kWh): distribution + DES conversion", "losses_kwh"),
        ("  distribution (I²R of segments and contact sets)", "distribution_losses_kwh"),
        ("  DES conversion (converter each way, cells)", "conversion_losses_kwh"),
        ("DES throughput (kWh)", "des_throughput_kwh"), ("interlock refusals", "refusals"),
        ("unavoidable dropped loads", "unavoidable_dropped_loads"),
        ("avoidable dropped loads", "avoidable_dropped_loads"),
        ("dropped loads warned >= 5 min ahead (loss of redundancy)", "drops_warned_5min"),
        ("no-path unserved bound (kWh)", "unavoidable_unserved_kwh_bound"))


def write_report(out: Path, figures: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pol = figures["policies"]
    rows = [[label] + [_cell(pol[p].get(key)) for p in POLICIES] for label, key in ROWS]
    table = markdown_table(["figure"] + list(POLICIES), rows)
    detail_rows = []
    for name, by in figures["per_scenario"].items():
        for p in POLICIES:
            f = by.get(p, {})
            detail_rows.append([name, p, f.get("dropped_loads"), _cell(f.get("unserved_kwh")),
                                _cell(f.get("feed_seconds_over_80")), _cell(f.get("feed_seconds_over_100")),
                                f.get("transfers"), f.get("commanded_transfers"),
                                f"{f.get('mitigations_before_failure')}/{f.get('failures_with_precursors')}",
                                _cell(f.get("median_mitigation_lead_time_s")),
                                f"{f.get('unnecessary_transfers')} ({f.get('unnecessary_transfers_scheduled')})",
                                f.get("refusals")])
    details = markdown_table(["scenario", "policy", "dropped", "unserved kWh", "s>80%", "s>100%", "transfers",
                              "commanded", "mitigated", "lead s", "unnecessary (former rule)", "refusals"], detail_rows)
    targets = "\n".join(f"- {k}: {'met' if v else 'NOT met'}" for k, v in figures["targets"].items())
    from cmcs.mission import LOSS_MECHANISMS

    cause_tables = []
    for p in POLICIES:
        rows_p = [[r["fault"], LOSS_MECHANISMS.get(r["mechanism"], r["mechanism"]), "yes" if r["predicted"] else "no",
                   "yes" if r["unavoidable"] else "no", r["dropped_loads"], r["unserved_kwh"], r["scenarios"],
                   _cell(r["median_lead_s"])] for r in figures.get("loss_breakdown", {}).get(p, [])]
        if rows_p:
            cause_tables.append(f"### {p}\n\n" + markdown_table(
                ["fault behind it", "why the load dropped", "predicted", "unavoidable", "dropped", "unserved kWh",
                 "scenarios", "median lead s"], rows_p))
    av = figures.get("avoidable", {})
    avoid_text = ""
    if av:
        avoid_text = (
            "## What no CMCS could prevent\n\n"
            "A drop is *unavoidable* when, at that moment, the unit had no live path at all (both of its "
            "feeds lost to faults: an open joint, a failed contact set, a source outage or sag) and its DES "
            "could not bridge (absent, failed, too small for the load, or run empty): no transfer and no "
            "pre-arming changes that. Where the DES could have carried the load the drop counts as avoidable, "
            "even if pre-arming would only have delayed it (a conservative split). The unserved-energy bound "
            "integrates each unit's demand over the seconds it had no live path, less what its DES could "
            "have delivered from its state of charge then (1 s resolution; load restart time after power "
            "returns not included, so it is a lower bound); it varies a little with the run (the DES state of "
            "charge when a path is lost), and the smallest of the three runs is used.\n\n"
            + markdown_table(["figure", "value"], [[k, _cell(v)] for k, v in av.items()]) + "\n")
    ct = figures.get("cycle_time")
    cycle_text = ""
    if ct:
        cycle_text = (f"## Cycle time\n\nOne full cycle (FeatureState.update + Predictor.predict + forecast + "
                      f"policy.decide) on a generated {ct['units']}-unit site, {ct['cycles']} cycles, one thread: "
                      f"p50 {ct['cycle_ms_p50']} ms, p99 {ct['cycle_ms_p99']} ms (max {ct['cycle_ms_max']} ms); "
                      f"per stage p50 {ct['stage_ms_p50']}, p99 {ct['stage_ms_p99']}; load average "
                      f"{ct['load_average_1min']} on {ct['cpus']} CPUs.\n\n")
    _plots(out, pol)
    (out / "mission.md").write_text(
        f"# cmcs bench mission\n\n{figures['scenarios']} scenarios from `{figures.get('scenario_dir')}`, "
        f"model bundle {figures.get('bundle')}{_layout_note(figures)}.\n\n{table}\n\n## Targets (issue 6)\n{targets}\n\n"
        "![dropped loads](mission_dropped_loads.png) ![unserved energy](mission_unserved_kwh.png) "
        f"![transfers](mission_transfers.png)\n\n{avoid_text}\n## Where the losses come from (per cause)\n\n"
        "Each dropped load is traced to the fault behind it (the ledger's cause and the scenario's fault "
        "list), whether the policy had latched that component at risk before its onset, and why the load "
        "still dropped.\n\n" + "\n\n".join(cause_tables) + f"\n\n{cycle_text}## Per scenario\n\n{details}\n")
    print(table)
    print(targets)


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return v


def _plots(out: Path, pol: dict) -> None:
    from bench.report import bar_plot

    labels = list(POLICIES)
    bar_plot(out / "mission_dropped_loads.png", labels, [pol[p]["dropped_loads"] for p in labels],
             "Dropped IT loads (ITIC violations)", "loads")
    bar_plot(out / "mission_unserved_kwh.png", labels, [pol[p]["unserved_kwh"] for p in labels],
             "Unserved energy", "kWh")
    bar_plot(out / "mission_transfers.png", labels, [pol[p]["transfers"] for p in labels],
             "Micro-ATS transfers (commanded + automatic)", "transfers")
