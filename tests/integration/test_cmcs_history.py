"""`cmcs train --history DIR`: the site's own history refines the load forecaster.

The histories are recorded the way a gateway records them (tests/history_site.py: the plant's values
through the devices' register maps, the point table and the historian's own feed, under the real
address space's node keys), days of them in seconds, with wall-clock timestamps ending now.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

import gateway.cli as cli
from cmcs import history as H
from cmcs.features import FEATURE_NAMES, FeatureState
from cmcs.models import SHIPPED_BUNDLE, Predictor
from siteconfig.demo import demo_site, generate_site
from siteconfig.profiles import load_profile
from simulator.plant import Plant
from simulator.scenario import LoadProfile
from tests.history_site import _quantizer, record_history

REPO = Path(__file__).resolve().parents[2]
# the site's own load, not the simulator's default: batch jobs that run most hours and are large,
# little noise, more drift (a real hall's load is not the training distribution's centre)
SITE_LOAD = LoadProfile(scale=1.1, diurnal_amplitude=0.2, noise_pct=0.6, drift_pct=3.0, batch_probability=0.9,
                        batch_magnitude=0.35)
DAYS = 1.4  # the shortest history training accepts with the default hold-out (1 day + 20 %), and a bit
# histories end at today's midnight (UTC): the same time of day, so the same plant history, every run
END = float(int(time.time()) // 86400 * 86400)


@pytest.fixture(scope="module")
def site_history(tmp_path_factory):
    d = tmp_path_factory.mktemp("site-history")
    rec = asyncio.run(record_history(demo_site(), d, DAYS, seed=11, load=SITE_LOAD, end_epoch_s=END))
    return d, rec


@pytest.fixture(scope="module")
def short_history(tmp_path_factory):
    d = tmp_path_factory.mktemp("short-history")
    rec = asyncio.run(record_history(demo_site(), d, 0.12, seed=12, load=SITE_LOAD, end_epoch_s=END))
    return d, rec


def test_the_cmcs_command_line_itself_accepts_history():
    args = cli.build_parser().parse_args(["train", "--history", "d", "--holdout-days", "1"])
    assert args.history == Path("d") and args.holdout_days == 1.0


def test_the_rebuilt_features_are_those_the_live_cmcs_computes(short_history):
    """At every sample the history's load features equal FeatureState's fed with the plant's own
    values as the driver reads them (register-quantised), i.e. what a live CMCS saw."""
    d, rec = short_history
    site = demo_site()
    reader = H.HistoryReader(H.history_file(d))
    assert reader.sites() and "demo-hall" in reader.sites()
    assert reader.devices("demo-hall", "LoadPower") == sorted(u.name for u in site.units)
    reader.close()
    hist = H.read_site_history(d, site, split=False)  # (too short to train on: no hold-out split)
    assert len(hist.runs) == 1
    run, epochs = hist.runs[0], hist.epochs[0]
    # the same values straight from the plant, at the same times, quantised as the Modbus driver reads them
    plant = Plant(site, rec.scenario)
    q = _quantizer(next(p for p in load_profile("micro_ats_v1").points if p.name == "LoadPower"))
    fs = FeatureState(site)
    scan0 = rec.start_epoch_s - 10.0  # plant time 0
    want = []
    for t_epoch, t_rel in zip(epochs, run.times):
        plant.advance_to(float(t_epoch - scan0))
        snap = plant.snapshot()
        snap = {k: dict(v) for k, v in snap.items()}
        snap["ats"]["LoadPower"] = q(snap["ats"]["LoadPower"])
        want.append(fs.update(float(t_rel), snap)["load"])
    want = np.stack(want)
    got = run.X["load"]
    assert got.shape == want.shape == (len(epochs), len(site.units), len(FEATURE_NAMES["load"]))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_large_history_keeps_the_features_of_one_sample_in_k(short_history, monkeypatch):
    """Past MAX_FEATURE_BYTES only every k-th sample's features are kept (a 1,000-unit hall's week would
    be 10 GB); the load series (targets, persistence) stay whole."""
    d, _ = short_history
    full = H.read_site_history(d, demo_site(), split=False)
    monkeypatch.setattr(H, "MAX_FEATURE_BYTES", full.runs[0].X["load"].nbytes / 3.5)
    part = H.read_site_history(d, demo_site(), split=False)
    assert part.feature_stride == 4
    np.testing.assert_array_equal(part.x_index[0], np.arange(0, len(full.runs[0].times), 4))
    np.testing.assert_array_equal(part.runs[0].X["load"], full.runs[0].X["load"][::4])
    np.testing.assert_array_equal(part.runs[0].load_m1, full.runs[0].load_m1)


def test_train_history_refines_the_load_forecaster_and_records_the_history(site_history, tmp_path, monkeypatch,
                                                                          capsys):
    d, rec = site_history
    monkeypatch.setattr(H, "HISTORY_STRIDE", 3)  # one sample in 3: a quarter of the refinement's time
    out, js = tmp_path / "bundle", tmp_path / "m.json"
    rc = cli.main(["train", "--history", str(d), "--bundle", str(SHIPPED_BUNDLE), "--out", str(out),
                  "--json", str(js)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "held-out days" in printed.out and "shipped bundle" in printed.out
    m = json.loads(js.read_text())
    ev = m["history"]["holdout"]
    for key in ("1min", "5min", "15min"):
        assert ev[key]["rows"] > 10_000
        for col in ("mape_shipped", "mape_refined", "mape_persistence", "mape_persistence_minute_mean"):
            assert 0 < ev[key][col] < 20, (key, col)
        assert m["history_load"][key]["mape"] == ev[key]["mape_refined"]
    # the figure the refinement is for: the site's later days, at the policy's horizon
    assert ev["5min"]["mape_refined"] <= ev["5min"]["mape_shipped"], ev["5min"]
    assert ev["5min"]["mape_refined"] < ev["5min"]["mape_persistence"]
    # the bundle: loadable, the shipped risk models, refined load boosters, the history recorded
    refined, shipped = Predictor.load(out), Predictor.load(SHIPPED_BUNDLE)
    h = refined.meta["history"]
    assert h["site"] == "demo-hall" and Path(h["data_dir"]) == d.resolve()
    assert abs(h["days"] - DAYS) < 0.01 and h["train_rows"] > 10_000 and h["holdout_days"] > 0.25
    assert h["stride_samples"] == 3 and h["units"] == 24 and h["segments"] == 1
    assert h["from"] < h["holdout_from"] < h["to"]
    assert h["base_bundle"]["version"] == shipped.version and refined.version.startswith(shipped.version + ".hist-")
    assert any(v["refined"] and v["added_trees"] > 0 for v in h["horizons"].values())
    assert refined.thresholds == shipped.thresholds and refined.meta["layout"] == shipped.meta["layout"]
    X = np.random.default_rng(0).normal(0, 0.05, (50, len(FEATURE_NAMES["source"]))).astype(np.float32)
    np.testing.assert_array_equal(refined.predict({"source": X})["source"], shipped.predict({"source": X})["source"])


def _generated_site(path, name: str, aisles: int, units: int, capsys):
    """A site file written by `cmcs config generate`."""
    assert cli.main(["config", "generate", "--aisles", str(aisles), "--units-per-aisle", str(units), "--name", name,
                     "-o", str(path)]) == 0
    capsys.readouterr()
    return path


def _one_line_error(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("history:")]
    assert len(lines) == 1 and lines[0].startswith("cmcs: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_histories_are_refused_in_one_line(site_history, short_history, tmp_path, capsys):
    shipped = str(SHIPPED_BUNDLE)
    base = ["train", "--bundle", shipped, "--out", str(tmp_path / "never")]
    assert "no such directory" in _one_line_error(base + ["--history", str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(base + ["--history", str(tmp_path / "empty")], capsys)
    assert "no history there" in msg and "history.sqlite3" in msg
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "history.sqlite3").write_bytes(b"not sqlite at all" * 100)
    assert "not a readable history" in _one_line_error(base + ["--history", str(tmp_path / "garbage")],
                                                       capsys)
    d_short, _ = short_history
    msg = _one_line_error(base + ["--history", str(d_short)], capsys)
    assert "too few" in msg and "0.12 days" in msg
    d, _ = site_history
    msg = _one_line_error(base + ["--history", str(d), "--holdout-days", "0.9"], capsys)
    assert "too few" in msg  # 1.4 days cannot give 1 day of training before 0.9 held out
    # another site's history: the site file names another site
    other = _generated_site(tmp_path / "other.yaml", "other-hall", 2, 3, capsys)
    msg = _one_line_error(base + ["--history", str(d), "--config", str(other)], capsys)
    assert "no LoadPower recorded for site 'other-hall'" in msg and "demo-hall" in msg
    # the same site name with another layout: units the history never saw
    renamed = _generated_site(tmp_path / "renamed.yaml", "demo-hall", 5, 6, capsys)
    msg = _one_line_error(base + ["--history", str(d), "--config", str(renamed)], capsys)
    assert "another layout" in msg and "of this site's 30 units" in msg
    assert not (tmp_path / "never").exists()
    msg = _one_line_error(["train", "--holdout-days", "1", "--out", str(tmp_path / "never")], capsys)
    assert "--holdout-days goes with --history" in msg
    msg = _one_line_error(["train", "--history", str(d), "--bundle", str(tmp_path / "no-bundle"), "--out",
                           str(tmp_path / "never")], capsys)
    assert "no-bundle" in msg


def test_a_gap_in_the_history_restarts_the_features(tmp_path):
    """The gateway down for 20 min: two segments, each with its own warm-up (as a restarted CMCS)."""
    rec = asyncio.run(record_history(generate_site(2, 3), tmp_path, 0.1, seed=3, gaps=((3600.0, 4800.0),)))
    hist = H.read_site_history(tmp_path, generate_site(2, 3), split=False)
    assert len(hist.runs) == 2
    first, second = hist.epochs
    assert second[0] - first[-1] >= 1200.0 - 10.0
    assert hist.runs[1].times[0] == 10.0  # a fresh FeatureState: its own clock and warm-up
    assert rec.scans == len(first) + len(second)
