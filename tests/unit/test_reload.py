"""SIGHUP and the site file (gateway/reload.py): every difference is named, as needing a restart."""

from __future__ import annotations

import dataclasses

from gateway.reload import site_differences
from siteconfig.demo import demo_site, generate_site


def test_identical_sites_have_no_difference():
    assert site_differences(demo_site(), demo_site()) == []


def test_added_and_removed_aisles_units_and_changed_values_are_each_named():
    old = generate_site(2, 3)
    new = generate_site(3, 3)  # a third aisle with its PDB segments, units and DES
    aisle1 = new.aisles[0]
    unit = dataclasses.replace(aisle1.units[0], rated_current_a=aisle1.units[0].rated_current_a + 8.0)
    new = dataclasses.replace(new, aisles=(dataclasses.replace(aisle1, units=(unit, *aisle1.units[1:2])),
                                           *new.aisles[1:]),
                              gateway=dataclasses.replace(new.gateway, dwell_time_s=45.0))
    changes = site_differences(old, new)
    assert "aisle Aisle03 added" in changes
    added = {c for c in changes if c.endswith(" added")}
    assert {f"ats {u.name} added" for u in new.aisles[2].units} <= added
    assert {f"pdb {p.name} added" for p in new.aisles[2].pdbs} <= added
    removed = old.aisles[0].units[2]
    assert f"ats {removed.name} removed" in changes and f"des {removed.storage.name} removed" in changes
    assert f"{unit.name}.rated_current_a {old.aisles[0].units[0].rated_current_a} -> {unit.rated_current_a}" in changes
    assert "gateway.dwell_time_s 30.0 -> 45.0" in changes


def test_a_moved_device_address_is_named_with_its_field():
    old = demo_site()
    source = old.sources[0]
    moved = dataclasses.replace(source, device=dataclasses.replace(source.device, port=source.device.port + 1))
    new = dataclasses.replace(old, sources=(moved, *old.sources[1:]))
    assert site_differences(old, new) == [f"{source.name}.device.port {source.device.port} -> {source.device.port + 1}"]
