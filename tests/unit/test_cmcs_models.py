"""CMCS models: bundle round trip, the shipped bundle ranks degraded units first, `cmcs train` CLI paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmcs.dataset import compact_for_training, simulate
from cmcs.features import FeatureState
from cmcs.models import SHIPPED_BUNDLE, BundleError, Predictor
from cmcs.train import TrainConfig, fit
from gateway.cli import main
from siteconfig.demo import demo_site, generate_site
from simulator.plant import Plant
from simulator.scenario import Fault, Scenario, scenario_to_yaml

M_KEYS = {"pr_auc", "recall_at_budget", "false_alarms_per_100_unit_days", "median_lead_time_s", "p10_lead_time_s"}
FAULT_KINDS = ("source_outage", "joint_degradation", "contact_wear", "ats_slow_transfer", "battery_fade")


def _faults():
    return (Fault("contact_wear", "MATS-01-01", 4500, 2400, 0.9), Fault("joint_degradation", "PDB-02-A", 4800, 2400, 0.9),
            Fault("battery_fade", "DES-02-02", 4200, 2400, 0.9),
            Fault("ats_slow_transfer", "MATS-01-03", 4700, 2400, 0.9),
            Fault("source_outage", "SourceA", 5000, 2400, 0.9, duration_s=200))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny bundle: three short scenarios on a 2 x 3 site, a few trees."""
    site = generate_site(2, 3)
    runs = [simulate(site, Scenario(name=f"tiny-{s}", duration_s=5400, seed=s, faults=_faults())) for s in (1, 2, 3)]
    test_run = simulate(site, Scenario(name="tiny-4", duration_s=5400, seed=4, faults=_faults()))
    cfg = TrainConfig(risk_rounds=6, load_rounds=6, processes=1)
    predictor, _ = fit(cfg, [compact_for_training(r) for r in runs[:2]], [runs[2]], progress=False)
    path = predictor.save(tmp_path_factory.mktemp("bundles") / "tiny", metrics={"note": "test"},
                          training={"config": "tiny"})
    return {"path": path, "predictor": predictor, "run": test_run}


def test_bundle_round_trip_gives_identical_predictions(tiny):
    run = tiny["run"]
    loaded = Predictor.load(tiny["path"])
    assert loaded.version == tiny["predictor"].version
    assert loaded.thresholds == pytest.approx(tiny["predictor"].thresholds)
    for kind in ("source", "pdb", "ats", "des"):
        a = tiny["predictor"].predict({kind: run.X[kind]})[kind]
        b = loaded.predict({kind: run.X[kind]})[kind]
        assert a.shape == run.X[kind].shape[:2]
        np.testing.assert_array_equal(a, b)
        assert np.all((b >= 0) & (b <= 1))
    fa = tiny["predictor"].forecast({"load": run.X["load"], "load_level_kw": run.load_m1})
    fb = loaded.forecast({"load": run.X["load"], "load_level_kw": run.load_m1})
    for h in (60, 300, 900):
        np.testing.assert_array_equal(fa[h], fb[h])
    files = {p.name for p in Path(tiny["path"]).iterdir()}
    assert {"bundle.json", "features.json", "metrics.json", "training.json", "risk_ats_detect.ubj",
            "load_300s.ubj"} <= files
    meta = json.loads((Path(tiny["path"]) / "bundle.json").read_text())
    assert meta["library_versions"]["xgboost"] and meta["version"]


def test_bundle_from_another_feature_version_is_refused(tiny, tmp_path):
    other = tmp_path / "old"
    shutil.copytree(tiny["path"], other)
    meta = json.loads((other / "bundle.json").read_text())
    meta["feature_version"] = 0
    (other / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="retrain"):
        Predictor.load(other)


def test_shipped_bundle_ranks_degraded_units_above_healthy_peers():
    """Demo site: a worn contact set, a fading battery and a loosening joint, 5 min before they fail."""
    site = demo_site()
    faults = (Fault("contact_wear", "MATS-02-03", 4200, 2400, 0.8), Fault("battery_fade", "DES-03-04", 4200, 2400, 0.8),
              Fault("joint_degradation", "PDB-01-B", 4200, 2400, 0.8))
    plant = Plant(site, Scenario(duration_s=4500, seed=11, faults=faults))
    predictor = Predictor.load(SHIPPED_BUNDLE)
    fs = FeatureState(site, predictor.sample_interval_s)
    t = 0.0
    while t < 3900.0:
        t += predictor.sample_interval_s
        plant.advance_to(t)
        feats = fs.update(t, plant.snapshot())
    assert fs.ready
    risk = predictor.predict(feats)
    for kind, name in (("ats", "MATS-02-03"), ("des", "DES-03-04"), ("pdb", "PDB-01-B")):
        i = fs.device_names[kind].index(name)
        others = np.delete(risk[kind], i)
        assert risk[kind][i] > others.max(), (kind, risk[kind][i], others.max())
        assert risk[kind][i] >= predictor.thresholds[kind]  # and it is an alarm
        assert others.max() < predictor.thresholds[kind]  # while its peers are not
    forecast = predictor.forecast(feats)
    assert forecast[300].shape == (24,) and np.all(np.isfinite(forecast[300]))


def _scenario_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in (1, 2):
        sc = Scenario(name=f"cli-{s}", duration_s=4200, seed=s,
                      faults=(Fault("contact_wear", "MATS-01-01", 4000, 1500, 0.9),
                              Fault("battery_fade", "DES-02-02", 3900, 1500, 0.9)))
        (folder / f"cli-{s}.yaml").write_text(scenario_to_yaml(sc))
    return folder


def test_cli_eval_writes_the_contract_json_and_plots(tiny, tmp_path, capsys):
    scen = _scenario_folder(tmp_path / "scen")
    out = tmp_path / "report"
    rc = main(["train", "--eval-only", "--scenarios", str(scen), "--bundle", str(tiny["path"]),
               "--json", str(tmp_path / "m.json"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "contact_wear" in printed and "inference" in printed
    m = json.loads((tmp_path / "m.json").read_text())
    assert M_KEYS <= set(m["risk"]["model"]) and M_KEYS <= set(m["risk"]["baseline"])
    for kind in FAULT_KINDS:
        assert M_KEYS <= set(m["risk"]["by_fault"][kind]["model"])
        assert M_KEYS <= set(m["risk"]["by_fault"][kind]["baseline"])
    assert {"mape", "mape_persistence", "mae_kw"} <= set(m["load"]["5min"])
    assert isinstance(m["load"]["5min"]["mape"], float)
    assert 0.0 < m["inference_ms_1000_units"] < 1000.0
    assert 0.0 <= m["risk"]["model"]["recall_at_budget"] <= 1.0
    for png in ("pr_curves.png", "lead_times.png", "load_forecast.png"):
        assert (out / png).stat().st_size > 1000


def _one_line_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("cmcs: error: ")
    return lines[0]


def test_cli_bad_input_is_one_line(tiny, tmp_path, capsys):
    bundle = str(tiny["path"])
    msg = _one_line_error(["train", "--eval-only", "--scenarios", str(tmp_path / "nope"), "--bundle", bundle], capsys)
    assert "no such directory" in msg
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(["train", "--eval-only", "--scenarios", str(tmp_path / "empty"), "--bundle", bundle], capsys)
    assert "no scenario files" in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("name: broken\nduration_s: -5\nfaults:\n  - {kind: meteor_strike, target: X}\n")
    msg = _one_line_error(["train", "--eval-only", "--scenarios", str(bad), "--bundle", bundle], capsys)
    assert "broken.yaml" in msg
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "a.yaml").write_text("duration_s: 3600\nfaults:\n  - {kind: contact_wear, target: MATS-99-99, onset_s: 100}\n")
    msg = _one_line_error(["train", "--eval-only", "--scenarios", str(unknown), "--bundle", bundle], capsys)
    assert "MATS-99-99" in msg
    old = tmp_path / "old-bundle"
    shutil.copytree(tiny["path"], old)
    meta = json.loads((old / "bundle.json").read_text())
    meta["bundle_format"] = 99
    (old / "bundle.json").write_text(json.dumps(meta))
    msg = _one_line_error(["train", "--eval-only", "--scenarios", str(unknown), "--bundle", str(old)], capsys)
    assert "retrain" in msg
    msg = _one_line_error(["train", "--eval-only", "--bundle", str(tmp_path / "no-bundle")], capsys)
    assert "no such directory" in msg
    msg = _one_line_error(["train", "--seed", "899990", "--scenario-count", "20"], capsys)
    assert "held-out" in msg
