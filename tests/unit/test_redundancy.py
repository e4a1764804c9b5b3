"""Loss of redundancy (cmcs.redundancy) and the mission benchmark's drops warned 5 min ahead."""

from __future__ import annotations

import dataclasses

import numpy as np

from cmcs.mission import run_mission
from cmcs.policy import Topology
from cmcs.redundancy import redundancy
from siteconfig.demo import demo_site
from simulator.plant import Plant
from simulator.scenario import Fault, Scenario

NO_DES = "MATS-02-06"  # 11 kW: without a DES it drops as soon as it has no path


def _site():
    site = demo_site()
    aisles = tuple(dataclasses.replace(a, units=tuple(dataclasses.replace(u, storage=None) if u.name == NO_DES
                                                      else u for u in a.units)) for a in site.aisles)
    return dataclasses.replace(site, aisles=aisles)


# aisle 2 loses its A segment at 300 s and its B segment at 900 s (joints opening, no precursors)
BOTH_SEGMENTS = Scenario(name="both-segments", duration_s=1200.0, seed=3, faults=(
    Fault("joint_degradation", "PDB-02-A", onset_s=300.0, precursor_s=0.0, severity=1.0),
    Fault("joint_degradation", "PDB-02-B", onset_s=900.0, precursor_s=0.0, severity=1.0)))


def test_a_unit_whose_second_path_is_gone_or_at_risk_is_warned_with_its_ride_through():
    site = _site()
    topo = Topology.from_site(site)
    plant = Plant(site, BOTH_SEGMENTS)
    plant.advance_to(200.0)
    healthy = redundancy(plant.snapshot(), {}, topo)
    assert not healthy.warning.any()
    aisle2 = [i for i, n in enumerate(topo.unit_names) if n.startswith("MATS-02-")]
    # the policy latched PDB-02-B at risk: the aisle's units on A have their second path at risk
    latched = redundancy(plant.snapshot(), {("pdb", topo.pdb_names.index("PDB-02-B")): 100.0}, topo)
    on_a = [u for u in aisle2 if plant.snapshot()["ats"]["ActiveSource"][u] == 1]
    assert on_a and set(np.flatnonzero(latched.warning)) == set(on_a)
    assert {latched.path_at_risk[u] for u in on_a} == {"PDB-02-B"} and not latched.gone.any()
    plant.advance_to(400.0)  # PDB-02-A open: every unit of aisle 2 on B, its second path gone
    r = redundancy(plant.snapshot(), {}, topo)
    assert set(np.flatnonzero(r.warning)) == set(aisle2) and r.gone[aisle2].all()
    assert {r.path_at_risk[u] for u in aisle2} == {"PDB-02-A"}
    no_des = topo.unit_names.index(NO_DES)
    assert r.ride_through_s[no_des] == 0.0
    others = [u for u in aisle2 if u != no_des]
    assert (r.ride_through_s[others] > 600.0).all()  # 5-10 kWh at 6-11 kW: well over 10 min


def test_drops_after_a_long_loss_of_redundancy_count_as_warned_5_min_ahead():
    site = _site()
    cmcs = run_mission(site, BOTH_SEGMENTS, "threshold")
    drops = [d for d in cmcs.drops if d["unit"] == NO_DES]
    assert drops and all(d["t_s"] >= 900.0 for d in drops)
    # warned from 300 s (its second path gone) until the drop, 600 s later
    assert cmcs.figures["drops_warned_5min"] >= len(drops)
    # both segments at once: the drop comes with no warning before it
    at_once = dataclasses.replace(BOTH_SEGMENTS, duration_s=500.0, faults=tuple(
        dataclasses.replace(f, onset_s=300.0) for f in BOTH_SEGMENTS.faults))
    sudden = run_mission(site, at_once, "threshold")
    assert any(d["unit"] == NO_DES for d in sudden.drops) and sudden.figures["drops_warned_5min"] == 0
