"""CMCS features and data: past-only features, labels from the scenario only, no leakage by split."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cmcs.dataset import (
    HELDOUT_SEED_START,
    HORIZON_S,
    from_snapshots,
    scenario_failures,
    label_arrays,
)
from cmcs.features import FEATURE_NAMES, FeatureState
from cmcs.train import HELDOUT_DIR, TrainConfig
from siteconfig.demo import demo_site, generate_site
from simulator.plant import Plant
from simulator.scenario import Fault, Scenario, load_scenario, scenario_files


@pytest.fixture(scope="module")
def small_site():
    return generate_site(2, 3)


def _snapshots(site, scenario, n: int, dt: float = 10.0):
    plant = Plant(site, scenario)
    out = []
    for j in range(1, n + 1):
        plant.advance_to(dt * j)
        out.append(copy.deepcopy(plant.snapshot()))
    return out


def test_features_use_only_the_past(small_site):
    """Features at t do not change when every reading after t changes; later ones do."""
    sc = Scenario(duration_s=3600, seed=5, faults=(Fault("contact_wear", "MATS-01-02", 3000, 1500, 0.9),))
    snaps = _snapshots(small_site, sc, 150)
    cut = 90
    altered = copy.deepcopy(snaps)
    for snap in altered[cut:]:
        for kind in snap:
            for point, values in snap[kind].items():
                if np.asarray(values).dtype.kind == "f":
                    snap[kind][point] = np.asarray(values) * 3.0 + 7.0
    a, b = FeatureState(small_site), FeatureState(small_site)
    for j, (sa, sb) in enumerate(zip(snaps, altered)):
        fa = a.update(10.0 * (j + 1), sa)
        fb = b.update(10.0 * (j + 1), sb)
        for kind in FEATURE_NAMES:
            if j < cut:
                np.testing.assert_array_equal(fa[kind], fb[kind], err_msg=f"{kind} at sample {j}")
        if j == cut:
            assert not np.array_equal(fa["load"], fb["load"], equal_nan=True)  # the check can see a change


def test_feature_shapes_and_device_order(small_site):
    fs = FeatureState(small_site)
    plant = Plant(small_site)
    plant.advance_to(10.0)
    feats = fs.update(10.0, plant.snapshot())
    assert fs.device_names["ats"] == plant.unit_names
    assert fs.device_names["pdb"] == plant.pdb_names
    assert fs.device_names["source"] == plant.source_names
    for kind, names in FEATURE_NAMES.items():
        assert feats[kind].shape[1] == len(names)
        assert feats[kind].dtype == np.float32
    assert feats["ats"].shape[0] == len(small_site.units)
    with pytest.raises(ValueError):
        fs.update(5.0, plant.snapshot())  # time must move forward


def test_labels_come_from_the_fault_list_only(small_site):
    """Positive within the horizon before a failure with precursors; excluded after it; a benign
    ambient excursion and a sag label nothing."""
    sc = Scenario(duration_s=7200, seed=1, faults=(
        Fault("joint_degradation", "PDB-01-A", 5000, 2000, 0.8),
        Fault("ambient_excursion", "Aisle02", 3000, 0.0, 1.0, duration_s=2000),
        Fault("voltage_sag", "SourceB", 4000, 0.0, 0.5, duration_s=0.5, depth_pu=0.5),
        Fault("source_outage", "SourceA", 6000, 0.0, 0.5, duration_s=60),
    ))
    times = np.arange(10.0, 7200.0 + 1e-9, 10.0)
    names = {"pdb": [p.name for p in small_site.pdbs], "source": ["SourceA", "SourceB"],
             "ats": [u.name for u in small_site.units], "des": [u.storage.name for u in small_site.units]}
    failures = scenario_failures(small_site, sc, names)
    assert [(f.fault, f.predictable) for f in failures] == [("joint_degradation", True), ("source_outage", False)]
    pdb = label_arrays(times, len(names["pdb"]), failures, "pdb", sc)
    pos = pdb["ttf"] <= HORIZON_S
    j = names["pdb"].index("PDB-01-A")
    assert pos[(times > 5000 - HORIZON_S) & (times < 5000), j].all()
    assert not pos[times < 5000 - HORIZON_S, j].any()  # onset in (t, t + horizon]
    assert pdb["excluded"][times >= 5000, j].all()
    assert pdb["grey"][(times >= 3000) & (times < 5000 - HORIZON_S), j].all()
    assert not pos[:, [i for i in range(len(names["pdb"])) if i != j]].any()  # the hot aisle is no failure
    src = label_arrays(times, 2, failures, "source", sc)
    assert not (src["ttf"] <= HORIZON_S).any()  # an outage without precursors is not a positive ...
    assert src["excluded"][(times > 6000 - HORIZON_S) & (times < 6060 + HORIZON_S), 0].all()  # ... and not scored


def test_splits_are_disjoint_and_never_use_heldout_seeds():
    cfg = TrainConfig()
    splits = cfg.splits()
    sets = {k: set(v) for k, v in splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(len(v) for v in sets.values()) == cfg.scenario_count
    assert max(splits["train"]) < min(splits["val"]) <= max(splits["val"]) < min(splits["test"])
    heldout_seeds = {load_scenario(p).seed for p in scenario_files(HELDOUT_DIR)}
    assert len(heldout_seeds) >= 20
    assert min(heldout_seeds) >= HELDOUT_SEED_START
    assert not heldout_seeds & set().union(*sets.values())


def test_a_run_keeps_rows_per_device_and_marks_warmup():
    site = demo_site()
    sc = Scenario(duration_s=1900, seed=2)
    plant = Plant(site, sc)
    times = np.arange(10.0, 1900.0 + 1e-9, 10.0)

    def snaps():
        for t in times:
            plant.advance_to(t)
            yield plant.snapshot()

    run = from_snapshots(site, sc, times, snaps())
    assert run.X["ats"].shape == (len(times), 24, len(FEATURE_NAMES["ats"]))
    assert run.labels["ats"]["excluded"][times < 1800].all()
    assert not run.labels["ats"]["excluded"][times >= 1800].any()


def test_contact_wear_labels_follow_when_the_worn_set_failed(small_site):
    """A worn contact set wears only while it carries current (simulator.plant): its failure is
    labelled at the time it happened, and one still on its way at the end is no failure."""
    unit = small_site.units[0]
    other = 3 - int(unit.preferred_source)
    sc = Scenario(duration_s=7200, seed=1, faults=(
        Fault("contact_wear", unit.name, 3000, 1800, 0.8, pole=other),))  # the worn set stays open
    run = from_snapshots(small_site, sc, np.arange(10.0, 7200.0 + 1e-9, 10.0), _snapshots(small_site, sc, 720),
                         failure_times=lambda: {})
    (f,) = run.failures
    assert not f.realized and f.onset_s > 1e9
    lab = run.labels["ats"]
    assert not (lab["ttf"] <= HORIZON_S).any()  # never a positive ...
    assert lab["degrading"][run.times >= 1200 + 1800, 0].all()  # ... but degrading from its precursor on
    names = {"ats": [u.name for u in small_site.units], "pdb": [], "source": ["SourceA", "SourceB"], "des": []}
    (g,) = scenario_failures(small_site, sc, names, {("contact_wear", unit.name, 3000.0): 4500.0})
    assert g.realized and g.onset_s == 4500.0 and g.precursor_s == 4500.0 - 1200.0


def test_plant_failure_times_reach_the_labels(small_site):
    from cmcs.dataset import simulate

    unit = small_site.units[0]
    other = 3 - int(unit.preferred_source)
    sc = Scenario(duration_s=3000, seed=1, faults=(Fault("contact_wear", unit.name, 2000, 600, 0.8, pole=other),))
    (f,) = simulate(small_site, sc).failures
    assert not f.realized  # the plant never loaded the worn set: it did not fail


def test_batch_job_features_follow_the_aisles_real_jobs():
    """job_on / job_age_h (feature version 3) track the plant's hourly batch jobs per aisle, seen only
    through LoadPower: on while a job runs (after the ~1-2 min it takes to see the step), off otherwise."""
    site = demo_site()
    plant = Plant(site, Scenario(duration_s=4 * 3600, seed=11))
    state = FeatureState(site)
    names = FEATURE_NAMES["load"]
    i_on, i_age = names.index("job_on"), names.index("job_age_h")
    agree, rows, ages_ok, jobs_seen, truth_on = 0, 0, [], 0, 0
    prev_truth = None
    for j in range(1, 4 * 360 + 1):
        t = 10.0 * j
        plant.advance_to(t)
        feats = state.update(t, plant.snapshot())
        truth = plant.batch_job_factor(t)[plant.unit_aisle] > 0  # ground truth, per unit's aisle
        if prev_truth is not None:
            jobs_seen += int((truth & ~prev_truth).sum())
        prev_truth = truth
        if t < 3600.0:
            continue  # the pipeline's first hour: job rate and levels still settling
        on = feats["load"][:, i_on] > 0.5
        rows += len(on)
        truth_on += int(truth.sum())
        agree += int((on == truth).sum())
        age = feats["load"][on & truth, i_age]
        ages_ok.extend(((age >= 0) & (age <= 1.0)).tolist())
    assert jobs_seen > 0, "the scenario must contain batch jobs for this test to mean anything"
    assert 0.1 < truth_on / rows < 0.5  # so that "always off" (or "always on") scores far below 90 %
    assert agree / rows > 0.9, agree / rows  # measured 0.99
    assert ages_ok and all(ages_ok)
