"""SIGHUP and the site file (gateway/reload.py): what a new site file changes, live or refused."""

from __future__ import annotations

import dataclasses

from gateway.reload import plan_site_change
from siteconfig.demo import demo_site, generate_site


def _without(site, aisle_name: str | None = None, unit_name: str | None = None):
    """`site` with one aisle, or one unit of an aisle, left out (everything else as it is)."""
    aisles = []
    for a in site.aisles:
        if a.name == aisle_name:
            continue
        aisles.append(dataclasses.replace(a, units=tuple(u for u in a.units if u.name != unit_name)))
    return dataclasses.replace(site, aisles=tuple(aisles))


def _with_unit(site, unit_name: str, **changes):
    aisles = tuple(dataclasses.replace(a, units=tuple(dataclasses.replace(u, **changes) if u.name == unit_name else u
                                                      for u in a.units)) for a in site.aisles)
    return dataclasses.replace(site, aisles=aisles)


def test_identical_sites_change_nothing():
    plan = plan_site_change(demo_site(), demo_site())
    assert not plan.structural and plan.refused == [] and plan.applied() == []


def test_added_aisles_and_units_are_live_with_every_device_they_bring():
    large = generate_site(3, 4)
    small = _without(_without(large, aisle_name="Aisle03"), unit_name="MATS-01-04")
    plan = plan_site_change(small, large)
    assert plan.refused == []
    assert [a.name for a in plan.added_aisles] == ["Aisle03"] and [u.name for u in plan.added_units] == ["MATS-01-04"]
    assert set(plan.added_devices()) == {"PDB-03-A", "PDB-03-B", "MATS-01-04", "DES-01-04",
                                         *(f"MATS-03-0{k}" for k in range(1, 5)), *(f"DES-03-0{k}" for k in range(1, 5))}
    assert plan.removed_devices() == []
    back = plan_site_change(large, small)  # and the other way: removed, live too
    assert back.refused == [] and set(back.removed_devices()) == set(plan.added_devices()) and back.added_devices() == []
    assert sorted(back.applied()) == ["aisle Aisle03 removed", "ats MATS-01-04 removed from Aisle01"]


def test_every_other_difference_is_refused_with_what_changed():
    old = generate_site(2, 3)
    unit = old.aisles[0].units[0]
    new = _with_unit(old, unit.name, rated_current_a=unit.rated_current_a + 8.0,
                     device=dataclasses.replace(unit.device, port=unit.device.port + 100))
    new = dataclasses.replace(new, gateway=dataclasses.replace(new.gateway, dwell_time_s=45.0))
    source = new.sources[0]
    new = dataclasses.replace(new, sources=(dataclasses.replace(source, rated_power_kw=source.rated_power_kw + 10),
                                            *new.sources[1:]))
    refused = plan_site_change(old, new).refused
    assert f"{unit.name}.rated_current_a changed ({unit.rated_current_a} -> {unit.rated_current_a + 8.0})" in refused
    assert f"{unit.name}.device.port changed ({unit.device.port} -> {unit.device.port + 100})" in refused
    assert "gateway.dwell_time_s changed (30.0 -> 45.0)" in refused
    assert f"{source.name}.rated_power_kw changed ({source.rated_power_kw} -> {source.rated_power_kw + 10})" in refused
    assert len(refused) == 4


def test_a_pdb_or_a_des_of_a_kept_aisle_or_unit_cannot_come_or_go_live():
    old = generate_site(2, 3)
    aisle = old.aisles[0]
    unit = aisle.units[1]
    new = _with_unit(old, unit.name, storage=None)
    new = dataclasses.replace(new, aisles=(dataclasses.replace(new.aisles[0], pdbs=new.aisles[0].pdbs[:1]),
                                           *new.aisles[1:]))
    plan = plan_site_change(old, new)
    assert sorted(plan.refused) == sorted([f"{unit.name}.storage changed ({unit.storage.name} -> none)",
                                           f"pdb {aisle.pdbs[1].name} removed from aisle {aisle.name}"])


def test_a_unit_that_moves_to_another_aisle_is_refused():
    old = generate_site(2, 3)
    unit = old.aisles[0].units[2]
    moved = dataclasses.replace(unit, aisle="Aisle02")
    new = _without(old, unit_name=unit.name)
    new = dataclasses.replace(new, aisles=(new.aisles[0], dataclasses.replace(new.aisles[1],
                                                                              units=(*new.aisles[1].units, moved))))
    refused = plan_site_change(old, new).refused
    assert f"device {unit.name} changed place (removed and added in one reload)" in refused
