"""`cmcs bench sim`: how much faster than real time the plant runs in-process.

Targets (issue "Foundation and the plant simulator"): >= 1,000x for the demo site and >= 20x
for a 1,000-unit site, with a 1 s step and millisecond events. Each site runs twice: a quiet
scenario and a fault-rich random one (events, transfers, ledger work); the figure is the median
of the repeats, and the plant time per wall time is the ratio against real time itself.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.report import bar_plot, markdown_table, write_json

TARGETS = {"demo": 1000.0, "1000-units": 20.0}


def _run(site, scenario, sim_seconds: float) -> float:
    from simulator.plant import Plant

    plant = Plant(site, scenario)
    t0 = time.perf_counter()
    plant.advance_to(sim_seconds)
    wall = time.perf_counter() - t0
    return sim_seconds / wall


def run(out: Path, json_path: Path | None, quick: bool = False) -> dict:
    from siteconfig.demo import demo_site, generate_site
    from simulator.scenario import Scenario, random_scenario

    sites = {"demo": demo_site(), "1000-units": generate_site(20, 50)}
    sim_seconds = {"demo": 1800.0 if quick else 6 * 3600.0, "1000-units": 300.0 if quick else 1800.0}
    repeats = 1 if quick else 3
    figures: dict = {"sites": {}}
    rows = []
    for name, site in sites.items():
        T = sim_seconds[name]
        quiet = [_run(site, Scenario(duration_s=T, seed=s), T) for s in range(repeats)]
        faulty = [_run(site, random_scenario(site, 100 + s, duration_s=T, faults_per_hour=4.0), T)
                  for s in range(repeats)]
        rt = statistics.median(quiet)
        rt_faults = statistics.median(faulty)
        figures["sites"][name] = {
            "units": len(site.units), "realtime_factor": round(rt, 1),
            "realtime_factor_fault_rich": round(rt_faults, 1), "step_s": 1.0,
            "simulated_s": T, "repeats": repeats, "target": TARGETS[name],
        }
        rows.append([name, len(site.units), rt, rt_faults, TARGETS[name], "yes" if min(rt, rt_faults) >= TARGETS[name]
                     else "NO"])
        print(f"  {name}: {rt:,.0f}x real time quiet, {rt_faults:,.0f}x fault-rich (target {TARGETS[name]:g}x)")
    table = markdown_table(["site", "units", "x real time (quiet)", "x real time (fault-rich)", "target", "met"], rows)
    out.mkdir(parents=True, exist_ok=True)
    bar_plot(out / "sim_realtime_factor.png", [r[0] for r in rows], [r[2] for r in rows],
             "Plant speed, simulated s per wall s (1 s step)", "x real time",
             targets=[r[4] for r in rows], log=True)
    (out / "sim.md").write_text("# cmcs bench sim\n\nMedian of %d runs per site, 1 s step, events at ms resolution.\n\n"
                                "%s\n\n![speed](sim_realtime_factor.png)\n" % (repeats, table))
    write_json(json_path, figures)
    print(table)
    return figures
