"""CMCS metrics: PR-AUC, alarm episodes, false alarms and lead times on hand-made data."""

from __future__ import annotations

import numpy as np

from cmcs.dataset import Failure, ScenarioRun
from cmcs.metrics import (ALARM_ON_DELAY_SAMPLES, average_precision, choose_threshold, confirmed, events,
                          raise_keeping_detections)
from cmcs.models import isotonic_apply, isotonic_fit


def test_average_precision_known_values():
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == (1.0 + 2 / 3) / 2
    assert average_precision([0, 1], [0.9, 0.1]) == 0.5
    assert average_precision([1, 1, 0], [0.5, 0.5, 0.5]) == 2 / 3  # ties share one threshold


def _run(scores: np.ndarray, failures: list[Failure]) -> ScenarioRun:
    T, n = scores.shape
    times = np.arange(1, T + 1) * 10.0
    labels = {"ats": {"excluded": np.zeros((T, n), bool), "ttf": np.full((T, n), np.inf, np.float32),
                      "code": np.zeros((T, n), np.int8), "grey": np.zeros((T, n), bool),
                      "degrading": np.zeros((T, n), bool), "unseen": np.zeros((T, n), bool)}}
    run = ScenarioRun("t", 0, "s", times, {"ats": [f"u{i}" for i in range(n)]}, {}, {"ats": scores}, labels,
                      failures, np.zeros((T, n)), np.zeros((T, n)))
    run.scores["ats"] = scores
    return run


def test_events_count_false_alarms_detections_and_lead():
    T = 8640  # one day at 10 s
    s = np.zeros((T, 3))
    onset = 5000 * 10.0
    s[4800:4900, 0] = 0.9  # device 0: alarms 200 samples (2000 s) before its failure, inside its precursor
    s[1000:1010, 1] = 0.9  # device 1: a 100 s burst ...
    s[1050:1060, 1] = 0.9  # ... and another within the merge gap: one false alarm
    s[3000:3002, 2] = 0.9  # device 2: two samples only, below the on-delay: no alarm
    f = Failure("ats", 0, "u0", "contact_wear", onset, 3000.0, True)
    r = events(_run(s, [f]), "ats", s, 0.5)
    assert r.failures == 1 and r.detected == 1
    assert r.false_alarms == 1
    first = (4800 + ALARM_ON_DELAY_SAMPLES - 1 + 1) * 10.0  # confirmed after the on-delay
    assert r.lead_times_s == [onset - first]
    assert abs(r.unit_days - 3.0) < 1e-9
    assert r.fa_per_100_unit_days == 100.0 / 3.0


def test_alarm_before_the_precursor_is_false_and_misses_the_failure():
    s = np.zeros((2000, 1))
    s[100:200, 0] = 0.9  # long before the precursor starts
    f = Failure("ats", 0, "u0", "contact_wear", 15000.0, 1200.0, True)
    r = events(_run(s, [f]), "ats", s, 0.5)
    assert r.detected == 0 and r.false_alarms == 1


def test_confirmed_needs_consecutive_samples():
    raw = np.array([1, 1, 0, 1, 1, 1, 1], bool)[:, None]
    assert confirmed(raw, 3)[:, 0].tolist() == [False, False, False, False, False, True, True]


def test_threshold_choice_respects_the_budget():
    T = 8640
    s = np.full((T, 4), 0.01)
    s[500:600, 1] = 0.3  # one false alarm at thresholds <= 0.3
    run = _run(s, [])
    thr = choose_threshold([run], "ats", lambda r, k: r.scores[k], budget=1.0)
    assert thr > 0.3  # 1 false alarm in 4 unit-days would be 25 per 100
    assert events(run, "ats", s, thr).false_alarms == 0


def test_isotonic_calibration_is_monotone_and_calibrated():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=20000)
    p_true = 1 / (1 + np.exp(-3 * raw))
    y = rng.random(20000) < p_true
    table = isotonic_fit(raw, y.astype(float))
    p = isotonic_apply(table, np.sort(raw))
    assert np.all(np.diff(p) >= -1e-6)
    for lo, hi in ((-3, -1), (-0.2, 0.2), (1, 3)):
        sel = (raw > lo) & (raw < hi)
        assert abs(isotonic_apply(table, raw[sel]).mean() - y[sel].mean()) < 0.03


def test_a_failure_still_on_its_way_is_neither_counted_nor_makes_false_alarms():
    s = np.zeros((2000, 1))
    s[1500:1600, 0] = 0.9  # alarms while the precursor is under way; the scenario ends before the failure
    f = Failure("ats", 0, "u0", "contact_wear", 1e12, 1e12 - 10000.0, True, realized=False)
    r = events(_run(s, [f]), "ats", s, 0.5)
    assert r.failures == 0 and r.detected == 0 and r.false_alarms == 0


def test_operating_threshold_rises_only_as_far_as_every_detection_is_kept():
    T = 4000
    s = np.full((T, 3), 0.01)
    s[900:1000, 0] = np.linspace(0.1, 0.7, 100)  # device 0: risk climbs to 0.7 before its failure
    s[1900:2000, 1] = np.linspace(0.1, 0.4, 100)  # device 1: a weaker precursor, peaks at 0.4
    s[3000:3010, 2] = 0.3  # device 2: healthy, one 100 s burst at 0.3
    fails = [Failure("ats", 0, "u0", "contact_wear", 10010.0, 1200.0, True),
             Failure("ats", 1, "u1", "contact_wear", 20010.0, 1200.0, True)]
    run = _run(s, fails)
    score = lambda r, k: r.scores[k]  # noqa: E731
    assert events(run, "ats", s, 0.2).false_alarms == 1
    thr = raise_keeping_detections([run], "ats", score, 0.2, keep_lead=0.0)
    r = events(run, "ats", s, thr)
    assert r.detected == 2 and r.false_alarms == 0  # the burst is gone, both failures still caught
    assert thr < 0.4  # and no higher: device 1 would be lost
    assert events(run, "ats", s, thr * 1.2).detected == 1


def test_operating_threshold_keeps_most_of_the_lead_time():
    T = 4000
    s = np.full((T, 3), 0.01)
    s[880:1000, 0] = 0.8  # device 0: a clear precursor, 1200 s before its failure
    s[1900:2000, 1] = np.linspace(0.1, 0.8, 100)  # device 1: risk climbs slowly to its failure
    s[3000:3010, 2] = 0.12  # device 2: healthy, a 100 s burst just above the starting threshold
    fails = [Failure("ats", 0, "u0", "contact_wear", 10010.0, 1200.0, True),
             Failure("ats", 1, "u1", "contact_wear", 20010.0, 1200.0, True)]
    run = _run(s, fails)
    score = lambda r, k: r.scores[k]  # noqa: E731
    base = events(run, "ats", s, 0.11)
    assert base.detected == 2 and base.false_alarms == 1
    thr = raise_keeping_detections([run], "ats", score, 0.11)
    r = events(run, "ats", s, thr)
    assert r.detected == 2 and r.false_alarms == 0  # raised past the burst
    assert np.median(r.lead_times_s) >= 0.8 * np.median(base.lead_times_s)
    # without the lead condition it climbs until device 1 is caught only in its last samples
    late = raise_keeping_detections([run], "ats", score, 0.11, keep_lead=0.0)
    assert late > thr and min(events(run, "ats", s, late).lead_times_s) < 0.3 * min(r.lead_times_s)
