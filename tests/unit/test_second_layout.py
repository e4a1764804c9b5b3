"""The evaluation halls of bench/second_layout.py: site files a user could write, scenarios that load on
them, and layouts that differ from the demo pattern in the ways the benchmark says."""

from __future__ import annotations

import numpy as np

from bench import second_layout as sl
from siteconfig.demo import generate_site
from siteconfig.loader import load_site
from simulator.scenario import load_scenario


def test_west_hall_and_its_scenarios_load_and_differ_from_the_demo(tmp_path):
    paths = sl.write(tmp_path)
    site = load_site(tmp_path / "west-hall.yaml")
    assert len(paths) == len(sl.SEEDS) and (len(site.aisles), len(site.aisles[0].units)) == (3, 8)
    assert {u.name for u in site.units if u.storage is None} == set(sl.NO_DES)
    assert {int(u.preferred_source) for a in site.aisles if a.name == sl.ALL_ON_B for u in a.units} == {2}
    assert all(p.rated_current_a == sl.SEGMENT_RATING_A for p in site.pdbs)
    kinds = set()
    for p in paths:
        sc = load_scenario(p, site)  # every target is a device of the site
        kinds |= {f.kind for f in sc.faults}
        assert 0.6 <= sc.load.scale <= 1.25
    assert {"voltage_swell", "joint_degradation"} <= kinds
    assert sl.write(tmp_path / "again") and (tmp_path / "again" / "scenarios" / paths[3].name).read_text() \
        == paths[3].read_text()  # reproducible


def test_random_halls_are_other_layouts_a_site_file_can_hold(tmp_path):
    paths = sl.write_halls(tmp_path, 10)
    seen = {"one source": 0, "no DES": 0}
    for i, p in enumerate(paths):
        seed = sl.HALL_SEED_START + i
        site = load_site(tmp_path / f"site-{seed}.yaml")
        load_scenario(p, site)
        plain = generate_site(*sl.HALL_SHAPES[i % len(sl.HALL_SHAPES)])
        assert [s.rated_power_kw for s in site.sources] == [s.rated_power_kw for s in plain.sources]
        seen["one source"] += any(len({u.preferred_source for u in a.units}) == 1 for a in site.aisles)
        seen["no DES"] += any(u.storage is None for u in site.units)
        for a in site.aisles:  # a whole aisle on one segment stays within 80 % of its rating
            amps = sum(u.it_load_kw for u in a.units) * 1000 / (3 ** 0.5 * site.nominal_voltage_v)
            assert all(amps <= 0.8 * pdb.rated_current_a for pdb in a.pdbs)
    assert seen["one source"] >= 2 and seen["no DES"] >= 2, seen
    site = generate_site(3, 4)
    assert sl.other_hall(site, np.random.default_rng(7)) == sl.other_hall(site, np.random.default_rng(7))
