"""Halls the CMCS was not built for, and scenario sets on them, to measure how it carries over to a
site (issue "CMCS on any hall"). Reproducible (fixed seeds):

    python -m bench.second_layout DIR            # DIR/west-hall.yaml and DIR/scenarios/ (10 x 6 h)
    python -m bench.second_layout DIR --halls 30 # 30 random halls: DIR/site-<seed>.yaml, DIR/scenarios/

for `cmcs train --eval-only --scenarios DIR/scenarios`, `cmcs bench mission --scenarios DIR/scenarios`
and `cmcs train --config DIR/west-hall.yaml`.

**west-hall** differs from the demo hall (4 x 6, 300 kW sources, 125 A segments, every unit with a
DES, preferred sources alternating) in what a site survey would: 3 aisles x 8 units, sources of
250 kW, segments of 160 A, four units without DES, and every unit of Aisle03 preferring SourceB (its
A segment idles until something moves). Its scenarios (6 h each) start from the training generator
(`simulator.scenario.random_scenario`) on that site and widen it where the outside sets of the issue
did: in every second one the precursors redrawn log-uniformly from 5 min to 4 h, a voltage swell in
every other one, a joint loosening on both segments of one aisle in every third, and a load scale
from 0.6 to 1.25 (light and heavy halls).

**Random halls** (`other_hall`): generated shapes of 2-6 aisles x 4-8 units with other segment
ratings (a whole aisle on one segment at 35-75 % of its rating), 0-30 % of the units without DES,
and per aisle the preferred sources alternating, all on A, all on B or at random; one
`random_scenario` of 6 h on each.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from simulator.scenario import DEGRADATION_KINDS, Fault, random_scenario, scenario_to_yaml
from siteconfig.demo import generate_site, site_to_yaml
from siteconfig.model import Site, SourceSelection

HALL_SEED_START = 960000
HALL_SHAPES = ((3, 6), (5, 4), (2, 8), (4, 8), (6, 5))
_PREFERENCE_PATTERNS = (("alternate", 0.5), ("all A", 0.15), ("all B", 0.15), ("random", 0.2))

NAME = "west-hall"
SEEDS = tuple(range(930000, 930010))
DURATION_S = 6 * 3600.0
NO_DES = ("MATS-01-04", "MATS-02-02", "MATS-02-07", "MATS-03-05")
SOURCE_RATING_KW = 250.0
SEGMENT_RATING_A = 160.0
ALL_ON_B = "Aisle03"


def west_hall() -> Site:
    site = generate_site(3, 8, NAME)
    sources = tuple(dataclasses.replace(s, rated_power_kw=SOURCE_RATING_KW) for s in site.sources)
    aisles = []
    for a in site.aisles:
        pdbs = tuple(dataclasses.replace(p, rated_current_a=SEGMENT_RATING_A) for p in a.pdbs)
        units = tuple(dataclasses.replace(
            u, storage=None if u.name in NO_DES else u.storage,
            preferred_source=SourceSelection.SOURCE_B if a.name == ALL_ON_B else u.preferred_source)
            for u in a.units)
        aisles.append(dataclasses.replace(a, pdbs=pdbs, units=units))
    return dataclasses.replace(site, sources=sources, aisles=tuple(aisles))


def scenario(site: Site, seed: int, index: int):
    base = random_scenario(site, seed, DURATION_S, name=f"{NAME}-{seed}")
    rng = np.random.default_rng(seed + 7)
    faults = list(base.faults)
    if index % 2 == 0:  # precursors from 5 min to 4 h
        faults = [dataclasses.replace(f, precursor_s=min(f.onset_s, float(np.round(math.exp(
            rng.uniform(math.log(300.0), math.log(4 * 3600.0))))))) if f.kind in DEGRADATION_KINDS
                  and f.precursor_s > 0 else f for f in faults]
    else:  # a swell on a source
        faults.append(Fault("voltage_swell", str(rng.choice(["SourceA", "SourceB"])),
                            float(np.round(rng.uniform(0.2, 0.9) * DURATION_S)), 0.0, 0.5,
                            duration_s=float(np.round(rng.uniform(0.1, 3.0), 3)),
                            depth_pu=float(np.round(rng.uniform(1.1, 1.2), 2))))
    if index % 3 == 0:  # both segments of one aisle loosen: the aisle can lose both paths
        aisle = site.aisles[int(rng.integers(len(site.aisles)))]
        first = float(np.round(rng.uniform(0.35, 0.6) * DURATION_S))
        taken = {f.target for f in faults}
        for k, pdb in enumerate(aisle.pdbs):
            if pdb.name in taken:
                continue
            onset = first + k * float(np.round(rng.uniform(1200, 3600)))
            faults.append(Fault("joint_degradation", pdb.name, min(onset, 0.97 * DURATION_S),
                                float(np.round(rng.uniform(1800, 5400))), float(np.round(rng.uniform(0.5, 0.9), 2))))
    load = dataclasses.replace(base.load, scale=float(np.round(rng.uniform(0.6, 1.25), 2)))
    return dataclasses.replace(base, site=f"../{NAME}.yaml", load=load,
                               faults=tuple(sorted(faults, key=lambda f: f.onset_s)))


def other_hall(site: Site, rng) -> Site:
    """`site` (a generated shape) with another hall's layout, drawn from `rng`: PDB segments rated so that
    a whole aisle on one segment loads it to 35-75 % (generated sites: ~55 %), 0-30 % of the units without
    DES, and per aisle the preferred sources alternating, all on A, all on B (the other segment idles
    until load moves onto it) or at random. The sources keep their ratings (either alone carries the hall)."""
    no_des = float(rng.choice([0.0, 0.1, 0.2, 0.3]))
    names, weights = zip(*_PREFERENCE_PATTERNS)
    aisles = []
    for a in site.aisles:
        amps = sum(u.it_load_kw for u in a.units) * 1000.0 / (math.sqrt(3.0) * site.nominal_voltage_v)
        rating = float(max(40.0, round(amps / rng.uniform(0.35, 0.75) / 5.0) * 5.0))
        pattern = str(rng.choice(names, p=np.array(weights) / sum(weights)))
        units = []
        for u in a.units:
            pref = {"alternate": u.preferred_source, "all A": SourceSelection.SOURCE_A,
                    "all B": SourceSelection.SOURCE_B}.get(pattern)
            if pref is None:
                pref = SourceSelection.SOURCE_A if rng.random() < 0.5 else SourceSelection.SOURCE_B
            storage = None if (u.storage is not None and rng.random() < no_des) else u.storage
            units.append(dataclasses.replace(u, preferred_source=pref, storage=storage))
        aisles.append(dataclasses.replace(a, pdbs=tuple(dataclasses.replace(p, rated_current_a=rating) for p in a.pdbs),
                                          units=tuple(units)))
    return dataclasses.replace(site, aisles=tuple(aisles))


def write_halls(folder: Path, count: int) -> list[Path]:
    """`count` random halls (`other_hall`), one 6-h `random_scenario` on each."""
    (folder / "scenarios").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        seed = HALL_SEED_START + i
        shape = HALL_SHAPES[i % len(HALL_SHAPES)]
        site = dataclasses.replace(other_hall(generate_site(*shape), np.random.default_rng([seed, 5])),
                                   name=f"hall-{seed}")
        (folder / f"site-{seed}.yaml").write_text(site_to_yaml(site))
        sc = random_scenario(site, seed, duration_s=DURATION_S, name=f"hall-{seed}")
        p = folder / "scenarios" / f"hall-{seed}.yaml"
        p.write_text(scenario_to_yaml(dataclasses.replace(sc, site=f"../site-{seed}.yaml")))
        paths.append(p)
    return paths


def write(folder: Path) -> list[Path]:
    (folder / "scenarios").mkdir(parents=True, exist_ok=True)
    site = west_hall()
    (folder / f"{NAME}.yaml").write_text(site_to_yaml(site))
    paths = []
    for i, seed in enumerate(SEEDS):
        p = folder / "scenarios" / f"{NAME}-{seed}.yaml"
        p.write_text(scenario_to_yaml(scenario(site, seed, i)))
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.second_layout", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--halls", type=int, default=0, metavar="N",
                        help="N random halls with a scenario each, instead of west-hall")
    args = parser.parse_args(argv)
    if args.halls:
        paths = write_halls(args.folder, args.halls)
        print(f"{len(paths)} halls and their scenarios of {DURATION_S / 3600:g} h in {args.folder}")
        return 0
    paths = write(args.folder)
    print(f"{args.folder / (NAME + '.yaml')} and {len(paths)} scenarios of {DURATION_S / 3600:g} h in "
          f"{args.folder / 'scenarios'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
