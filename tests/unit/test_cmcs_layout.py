"""The layout a bundle was trained for (cmcs.layout) and training for a site (`cmcs train --config`)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np

from bench.mission import bundle_layouts
from cmcs.dataset import FAILURE_KINDS, keep_aisles, simulate, training_scenario
from cmcs.layout import (ADVISORY_ONLY, check_layout, layout_fingerprint, layout_summary, model_version_text,
                         stamp_bundle_layout)
from cmcs.models import SHIPPED_BUNDLE
from gateway.cli import main
from siteconfig.demo import demo_site, generate_site, relocate_site, site_to_yaml
from siteconfig.model import SourceSelection
from simulator.scenario import Fault, Scenario


def _map_units(site, change):
    aisles = tuple(dataclasses.replace(a, units=tuple(change(u) for u in a.units)) for a in site.aisles)
    return dataclasses.replace(site, aisles=aisles)


def test_the_fingerprint_follows_what_the_models_depend_on_not_names_or_addresses():
    demo = demo_site()
    fp = layout_fingerprint(demo)
    # other ports, another site name, renamed and reordered aisles, moved units: the same hall for the models
    renamed = dataclasses.replace(relocate_site(demo), name="hall-7",
                                  aisles=tuple(dataclasses.replace(a, name=f"Row{i}")
                                               for i, a in enumerate(reversed(demo.aisles))))
    renamed = _map_units(renamed, lambda u: dataclasses.replace(u, position_ft=u.position_ft + 3))
    assert layout_fingerprint(renamed) == fp
    assert layout_fingerprint(generate_site(4, 6)) == fp  # the demo is this pattern
    # what the models see differently
    first = demo.units[0].name
    changed = [
        _map_units(demo, lambda u: dataclasses.replace(u, storage=None) if u.name == first else u),
        _map_units(demo, lambda u: dataclasses.replace(u, storage=dataclasses.replace(u.storage, capacity_kwh=20.0))
                   if u.name == first else u),
        _map_units(demo, lambda u: dataclasses.replace(u, preferred_source=SourceSelection.SOURCE_B)
                   if u.name == first else u),
        _map_units(demo, lambda u: dataclasses.replace(u, it_load_kw=u.it_load_kw * 1.5)),
        dataclasses.replace(demo, aisles=(dataclasses.replace(demo.aisles[0], pdbs=tuple(
            dataclasses.replace(p, rated_current_a=200.0) for p in demo.aisles[0].pdbs)),) + demo.aisles[1:]),
        dataclasses.replace(demo, nominal_voltage_v=480.0),
        dataclasses.replace(demo, sources=(dataclasses.replace(demo.sources[0], backup="none"),) + demo.sources[1:]),
        generate_site(3, 8),
    ]
    fps = [layout_fingerprint(s) for s in changed]
    assert fp not in fps and len(set(fps)) == len(fps)
    assert layout_summary(changed[0]) == "demo-hall: 4x6, 23 DES"


def test_the_shipped_bundle_is_the_demo_halls_and_a_bundle_without_a_record_is_taken_for_it():
    meta = json.loads((SHIPPED_BUNDLE / "bundle.json").read_text())
    assert meta["layout"]["fingerprint"] == layout_fingerprint(demo_site())
    assert meta["layout"]["summary"] == "demo-hall: 4x6, 24 DES"
    old = {k: v for k, v in meta.items() if k != "layout"}  # made before layouts were recorded
    for m in (meta, old):
        assert check_layout(m, relocate_site(demo_site())).matches
        other = check_layout(m, generate_site(3, 8))
        assert not other.matches
        assert "trained for another layout (demo-hall: 4x6, 24 DES" in other.reason
        assert "this site is site-3x8: 3x8, 24 DES" in other.reason
        text = model_version_text(meta["version"], other)
        assert text.startswith(f"{meta['version']} ({ADVISORY_ONLY}") and len(text) <= 128  # Writable limit
    assert model_version_text(meta["version"], check_layout(meta, demo_site())) == meta["version"]


def test_stamping_a_bundle_changes_only_its_bundle_json(tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    del meta["layout"]
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    rec = stamp_bundle_layout(bundle, generate_site(2, 3))
    assert rec["summary"] == "site-2x3: 2x3, 6 DES"
    for p in SHIPPED_BUNDLE.iterdir():
        if p.suffix == ".ubj":
            assert (bundle / p.name).read_bytes() == p.read_bytes()
    stamp_bundle_layout(bundle)  # the demo hall's: the shipped bundle.json again, byte for byte
    assert (bundle / "bundle.json").read_text() == (SHIPPED_BUNDLE / "bundle.json").read_text()


def test_training_scenarios_for_a_site_use_its_devices():
    site = _map_units(generate_site(3, 5, name="hall-b"),
                      lambda u: dataclasses.replace(u, storage=None) if u.name.endswith("-02") else u)
    devices = {s.name for s in site.sources} | {p.name for p in site.pdbs} | {u.name for u in site.units} \
        | {d.name for d in site.storages} | {a.name for a in site.aisles}
    kinds = set()
    for seed in range(12):
        s, sc = training_scenario(seed, 6 * 3600.0, site)
        assert s is site
        assert {f.target for f in sc.faults} <= devices
        kinds |= {f.kind for f in sc.faults if f.kind in FAILURE_KINDS}
    assert {"joint_degradation", "contact_wear", "battery_fade"} <= kinds


def test_cmcs_train_config_refuses_a_bad_site_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "site.yaml"
    bad.write_text(site_to_yaml(generate_site(2, 3)).replace("rated_current_a: 40", "rated_current_a: -40", 1))
    for path in (bad, tmp_path / "missing.yaml"):
        code = main(["train", "--config", str(path), "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert code != 0 and err.startswith("cmcs: error: ") and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and path.name in err
    assert not (tmp_path / "b").exists()
    assert main(["train", "--eval-only", "--config", str(bad)]) != 0
    assert "each scenario file names its site" in capsys.readouterr().err


def test_the_mission_benchmark_says_which_sites_differ_from_the_bundles_layout():
    meta = json.loads((SHIPPED_BUNDLE / "bundle.json").read_text())
    predictor = type("P", (), {"meta": meta})()
    jobs = [(demo_site(), None), (generate_site(3, 8), None), (demo_site(), None)]
    lay = bundle_layouts(predictor, jobs)
    assert lay["bundle"]["summary"] == "demo-hall: 4x6, 24 DES"
    assert {n: c["matches"] for n, c in lay["sites"].items()} == {"demo-hall": True, "site-3x8": False}



def test_validation_runs_of_a_large_site_keep_whole_aisles_failures_first():
    site = generate_site(4, 3)
    sc = Scenario(name="keep", duration_s=2100.0, seed=2, faults=(
        Fault("joint_degradation", "PDB-03-B", 2000.0, 900.0, 0.9), Fault("battery_fade", "DES-04-02", 2050.0, 900.0, 0.9),
        Fault("contact_wear", "MATS-01-01", 2000.0, 900.0, 0.9)))
    run = simulate(site, sc)
    assert keep_aisles(run, site, max_units=12) is run  # not larger than the cap: untouched
    small = keep_aisles(run, site, max_units=5)
    assert small.names["ats"] == [f"MATS-0{a}-0{j}" for a in (1, 3) for j in (1, 2, 3)]  # failing aisles, in order
    assert small.names["pdb"] == ["PDB-01-A", "PDB-01-B", "PDB-03-A", "PDB-03-B"] and len(small.names["source"]) == 2
    units = [run.names["ats"].index(n) for n in small.names["ats"]]
    pdbs = [run.names["pdb"].index(n) for n in small.names["pdb"]]
    np.testing.assert_array_equal(small.X["ats"], run.X["ats"][:, units])
    np.testing.assert_array_equal(small.X["load"], run.X["load"][:, units])
    np.testing.assert_array_equal(small.X["pdb"], run.X["pdb"][:, pdbs])
    np.testing.assert_array_equal(small.labels["pdb"]["ttf"], run.labels["pdb"]["ttf"][:, pdbs])
    np.testing.assert_array_equal(small.load_m1, run.load_m1[:, units])
    # the failures of kept devices, re-indexed; the DES of aisle 4 is not kept
    assert {(f.device_name, small.names[f.component][f.device]) for f in small.failures} == {
        ("PDB-03-B", "PDB-03-B"), ("MATS-01-01", "MATS-01-01")}
