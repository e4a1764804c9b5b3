"""`cmcs bench mission`: each scenario replayed under three policies on the same plant.

(a) hardware_only: micro-ATS local transfer, no CMCS; (b) threshold: the CMCS policy driven by
static DCIM threshold alarms; (c) ml: the same policy driven by the model bundle's risk scores.
Figures per policy are summed over scenarios (lead time: median over all mitigated failures);
the JSON carries INTERFACE.md section 7's keys and more. Targets (issue 6): (c) at most 10 % of
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
            "failures_with_precursors", "unnecessary_transfers", "losses_kwh", "des_throughput_kwh", "refusals",
            "actions")
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
    return i, scenario.name, policy, r.figures, [(t, str(a), why) for t, a, why in r.refusals], r.lead_times_s


def default_scenario_dir() -> Path:
    return HELDOUT if HELDOUT.is_dir() and any(HELDOUT.glob("*.y*ml")) else LIBRARY


def default_bundle() -> Path:
    from cmcs.models import SHIPPED_BUNDLE

    return Path(os.environ.get("CMCS_BUNDLE", SHIPPED_BUNDLE))


def run(out: Path, json_path: Path | None, scenarios: Path | None = None, bundle: Path | None = None,
        quick: bool = False, processes: int = 2) -> dict:
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
            i, name, pol, figs, refusals, leads = _job(task)
            results[i] = (name, pol, figs, refusals, leads)
            progress(name, pol, figs)
    else:
        # spawn, not fork: the parent has loaded xgboost (OpenMP), and a forked OpenMP runtime can hang
        ctx = mp.get_context("spawn")
        with ctx.Pool(min(processes, 2, len(tasks))) as pool:
            for i, name, pol, figs, refusals, leads in pool.imap_unordered(_job, tasks):
                results[i] = (name, pol, figs, refusals, leads)
                progress(name, pol, figs)
    figures = summarise(results, len(jobs))
    figures["scenario_dir"] = str(folder)
    figures["bundle"] = predictor.version
    write_report(out, figures)
    write_json(json_path, figures)
    return figures


def summarise(results: dict, n_scenarios: int) -> dict:
    per_policy = {p: {k: 0.0 for k in SUM_KEYS} for p in POLICIES}
    leads = {p: [] for p in POLICIES}
    per_scenario: dict = {}
    refusals = {p: [] for p in POLICIES}
    cycle_p99 = {p: [] for p in POLICIES}
    for i in sorted(results):
        name, pol, figs, refs, lt = results[i]
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
                                          "failures_with_precursors", "unnecessary_transfers", "refusals",
                                          "actions") else round(float(v), 4)
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
    }
    return out


ROWS = (("dropped loads (ITIC)", "dropped_loads"), ("unserved energy (kWh)", "unserved_kwh"),
        ("feed-seconds > 80 %", "feed_seconds_over_80"), ("feed-seconds > 100 %", "feed_seconds_over_100"),
        ("transfers (all)", "transfers"), ("  commanded", "commanded_transfers"),
        ("  of which balancing", "balancing_transfers"),
        ("mitigations before failure", "mitigations_before_failure"),
        ("failures with precursors", "failures_with_precursors"),
        ("median mitigation lead time (s)", "median_mitigation_lead_time_s"),
        ("unnecessary transfers", "unnecessary_transfers"), ("distribution losses (kWh)", "losses_kwh"),
        ("DES throughput (kWh)", "des_throughput_kwh"), ("interlock refusals", "refusals"))


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
                                _cell(f.get("median_mitigation_lead_time_s")), f.get("unnecessary_transfers"),
                                f.get("refusals")])
    details = markdown_table(["scenario", "policy", "dropped", "unserved kWh", "s>80%", "s>100%", "transfers",
                              "commanded", "mitigated", "lead s", "unnecessary", "refusals"], detail_rows)
    targets = "\n".join(f"- {k}: {'met' if v else 'NOT met'}" for k, v in figures["targets"].items())
    _plots(out, pol)
    (out / "mission.md").write_text(
        f"# cmcs bench mission\n\n{figures['scenarios']} scenarios from `{figures.get('scenario_dir')}`, "
        f"model bundle {figures.get('bundle')}.\n\n{table}\n\n## Targets (issue 6)\n{targets}\n\n"
        "![dropped loads](mission_dropped_loads.png) ![unserved energy](mission_unserved_kwh.png) "
        f"![transfers](mission_transfers.png)\n\n## Per scenario\n\n{details}\n")
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
