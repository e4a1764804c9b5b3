"""Labelled data from simulated scenarios: what the models learn from and are judged on.

A scenario is replayed by the plant and sampled every `SAMPLE_INTERVAL_S` exactly as an OPC UA
client would see it (`Plant.snapshot()`, nothing else); features come from the one streaming
pipeline (`cmcs.features.FeatureState`). Ground truth comes from the scenario's fault list
(kind, target, onset, precursor) and, for the failure times, from when the plant's failures
happened (`Plant.failure_times`): a worn contact set wears only while it carries current, so one
that sat open fails later than its scheduled onset, or not within the scenario. Features never
read the plant's internals.

Labels, per component (source, PDB segment, micro-ATS, DES) and sample time t:
- positive: a failure with precursors of this component has its onset in (t, t + HORIZON_S];
- grey: the failure's precursor has started but its onset is further than the horizon;
  a negative for training and for the strict PR-AUC, left out of the headline PR-AUC;
- excluded: before WARMUP_S; at and after a failure of the component (it is broken, the
  question no longer applies; a source after an outage with precursors keeps its degraded
  backup battery); within the horizon before, during and for a horizon after a failure without
  precursors (it could not be predicted and is reported apart); DES rows of units without one.
`ambient_excursion` and voltage sags/swells are not failures: rows around them are negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cmcs.features import FEATURE_NAMES, LOAD_HORIZONS_S, SAMPLE_INTERVAL_S, SEASON_S, WARMUP_S, FeatureState

HORIZON_S = 900.0  # "fails within 15 min"
COMPONENT_KINDS = ("source", "pdb", "ats", "des")
FAILURE_KINDS = {  # fault kind -> component kind, for the kinds that are failures of a component
    "source_outage": "source", "joint_degradation": "pdb", "contact_wear": "ats", "ats_slow_transfer": "ats",
    "battery_fade": "des",
}
FAULT_CODES = {k: i + 1 for i, k in enumerate(FAILURE_KINDS)}  # 0: no failure pending
FAULT_NAMES = {v: k for k, v in FAULT_CODES.items()}

# Seed ranges. Training draws its scenarios from [seed, seed + count) (default 0..), which must stay
# below HELDOUT_SEED_START; the shipped held-out set uses seeds from HELDOUT_SEED_START on.
HELDOUT_SEED_START = 900_000
HELDOUT_COUNT = 36
HELDOUT_DURATION_S = 6 * 3600.0

# Site shapes for training: the demo and a few generated sizes, so that peer and twin features
# see aisles of 4 to 10 units and halls of 2 to 6 aisles. (aisles, units per aisle, weight)
# Larger halls cost little more to simulate (the plant's cost is mostly per time step), so they
# give more component-hours per second of training time.
TRAIN_SITE_SHAPES = ((4, 6, 0.35), (2, 4, 0.1), (3, 8, 0.2), (6, 8, 0.2), (8, 10, 0.15))


def site_for_shape(aisles: int, units: int):
    from siteconfig.demo import DEMO_AISLES, DEMO_UNITS_PER_AISLE, demo_site, generate_site

    if (aisles, units) == (DEMO_AISLES, DEMO_UNITS_PER_AISLE):
        return demo_site()
    return generate_site(aisles, units)


def training_scenario(seed: int, duration_s: float, site=None):
    """A random fault-rich mix for training: random site shape, fault rate and extra rare events.

    On top of `random_scenario` (every kind, random targets, lead times and severities) it adds,
    at random, a source outage with precursors (rare in the base mix) and a benign ambient
    excursion (the false-alarm bait), so that both are seen often enough to be learnt.
    `site`: train for that site (`cmcs train --config`): every scenario on its layout, ratings,
    loads, DES and preferred sources, instead of the demo hall and generated shapes."""
    from simulator.scenario import Fault, random_scenario

    rng = np.random.default_rng([seed, 20_240_905])
    shapes = TRAIN_SITE_SHAPES
    w = np.array([s[2] for s in shapes])
    aisles, units, _ = shapes[int(rng.choice(len(shapes), p=w / w.sum()))]  # drawn either way: same rng stream
    if site is None:
        site = site_for_shape(aisles, units)
    fph = float(rng.uniform(1.0, 3.0))
    sc = random_scenario(site, seed, duration_s=duration_s, faults_per_hour=fph)
    extra = []
    if rng.random() < 0.35:
        onset = float(np.round(rng.uniform(0.3, 0.95) * duration_s))
        pre = min(onset - 60.0, float(np.round(math.exp(rng.uniform(math.log(600.0), math.log(3 * 3600.0))))))
        extra.append(Fault("source_outage", str(rng.choice(["SourceA", "SourceB"])), onset, pre,
                           float(np.round(rng.uniform(0.2, 1.0), 2)), duration_s=float(np.round(rng.uniform(60, 1800)))))
    if rng.random() < 0.4:
        onset = float(np.round(rng.uniform(0.1, 0.9) * duration_s))
        extra.append(Fault("ambient_excursion", str(rng.choice([a.name for a in site.aisles])), onset, 0.0,
                           float(np.round(rng.uniform(0.2, 1.0), 2)),
                           duration_s=float(np.round(rng.uniform(1200, 5400)))))
    if extra:
        sc = sc.with_faults(*extra)
    return site, _widen(sc, rng)


# Training covers wider ranges than `random_scenario` draws, so that scenario files written with
# other parameters of the same physics (docs/interface.md section 6) are not out of distribution:
# load profiles (noise, drift, batch jobs' size and frequency, level, diurnal swing) and precursor
# durations from 5 min to 5 h. A quarter of the scenarios keep `random_scenario`'s own draws.
WIDE_LOAD_SHARE = 0.75
WIDE_PRECURSOR_SHARE = 0.4


def _widen(sc, rng):
    from dataclasses import replace

    from simulator.scenario import LoadProfile

    load = sc.load
    if rng.random() < WIDE_LOAD_SHARE:
        load = LoadProfile(
            scale=float(np.round(rng.uniform(0.6, 1.25), 2)),
            diurnal_amplitude=float(np.round(rng.uniform(0.03, 0.28), 2)),
            noise_pct=float(np.round(math.exp(rng.uniform(math.log(0.3), math.log(4.0))), 2)),
            drift_pct=float(np.round(rng.uniform(0.0, 5.0), 2)),
            batch_probability=float(np.round(rng.uniform(0.1, 0.95), 2)),
            batch_magnitude=float(np.round(rng.uniform(0.05, 0.5), 2)))
    faults = []
    for f in sc.faults:
        if f.precursor_s > 0 and rng.random() < WIDE_PRECURSOR_SHARE:
            pre = float(np.round(math.exp(rng.uniform(math.log(300.0), math.log(5 * 3600.0)))))
            f = replace(f, precursor_s=min(pre, f.onset_s))
        faults.append(f)
    return replace(sc, load=load, faults=tuple(sorted(faults, key=lambda f: f.onset_s)))


def heldout_scenarios(site=None, count: int = HELDOUT_COUNT, start: int = HELDOUT_SEED_START):
    """The shipped held-out set: `random_scenario` on the demo site with seeds never used in training."""
    from siteconfig.demo import demo_site
    from simulator.scenario import random_scenario

    site = site or demo_site()
    return [random_scenario(site, start + i, duration_s=HELDOUT_DURATION_S, faults_per_hour=1.0,
                            name=f"heldout-{start + i}") for i in range(count)]


def write_heldout(folder=None) -> list:
    """(Re)write the shipped held-out set and its README; returns the files written."""
    from pathlib import Path

    from simulator.scenario import SCENARIO_LIBRARY, scenario_to_yaml

    folder = Path(folder) if folder else SCENARIO_LIBRARY / "heldout"
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, int] = {}
    paths = []
    for sc in heldout_scenarios():
        path = folder / f"{sc.name}.yaml"
        path.write_text(scenario_to_yaml(sc))
        paths.append(path)
        for f in sc.faults:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    (folder / "README.md").write_text(
        f"# Held-out scenarios\n\n{HELDOUT_COUNT} scenarios for `cmcs train --eval-only` (its default `--scenarios`), "
        "never used to train or tune:\n`random_scenario(demo_site(), seed, duration_s=21600, faults_per_hour=1.0)` "
        f"for seeds\n{HELDOUT_SEED_START}..{HELDOUT_SEED_START + HELDOUT_COUNT - 1}, written with `scenario_to_yaml` by\n"
        '`python -c "from cmcs.dataset import write_heldout; write_heldout()"`.\n'
        f"Training (`cmcs train`) refuses seeds from {HELDOUT_SEED_START} on. Fault mix of the set: {mix}.\n")
    return paths


# ---- labels ------------------------------------------------------------------------------------

@dataclass
class Failure:
    component: str  # source | pdb | ats | des
    device: int  # row in that kind's arrays
    device_name: str
    fault: str  # fault kind
    onset_s: float
    precursor_s: float
    predictable: bool  # the scenario gives it precursors (precursor_s > 0, and a backup battery for sources)
    observable: bool = True  # and a client could see them: False for a worn contact set that stayed open
    realized: bool = True  # it happened within the scenario (False: precursor under way at its end)


def _source_backup_kinds(site) -> list[str]:
    return [s.backup for s in sorted(site.sources, key=lambda s: int(s.selection))]


NOT_WITHIN_SCENARIO_S = 1e12  # "onset" of a failure still on its way when the scenario ends


# faults whose precursor advances only under load (simulator/plant.py): their failure can come
# later than scheduled, or not within the scenario; the plant's record says when it happened
LOAD_GATED_KINDS = ("contact_wear", "joint_degradation")


def scenario_failures(site, scenario, names: dict[str, list[str]],
                      failure_times: dict | None = None) -> list[Failure]:
    """The component failures of a scenario, from its fault list, at the times they happened.

    `failure_times` ((kind, target, scheduled onset) -> time, `Plant.failure_times`) moves the onset
    of a contact-wear failure whose worn set sat open for part of its precursor (it wears only while it
    carries current); one that had not failed by the end of the scenario keeps its degrading rows
    (its precursor is under way) but is not counted as a failure (`realized` False)."""
    backups = _source_backup_kinds(site)
    out = []
    for f in scenario.faults:
        comp = FAILURE_KINDS.get(f.kind)
        if comp is None:
            continue
        try:
            i = names[comp].index(f.target)
        except ValueError:
            continue
        predictable = f.precursor_s > 0 and not (comp == "source" and backups[i] == "none")
        onset, realized = float(f.onset_s), True
        if failure_times is not None and f.kind in LOAD_GATED_KINDS and f.precursor_s > 0:
            onset = float(failure_times.get((f.kind, f.target, float(f.onset_s)), NOT_WITHIN_SCENARIO_S))
            realized = onset < NOT_WITHIN_SCENARIO_S
        start = float(f.onset_s - f.precursor_s)
        out.append(Failure(comp, i, f.target, f.kind, onset, onset - start, predictable, realized=realized))
    return out


def mark_unobservable(failures: list[Failure], site, scenario, times: np.ndarray, active_source: np.ndarray) -> None:
    """Flag contact-wear failures whose worn contact set never carried the load during its precursor.

    The unit measures the resistance of its closed contact set only; a worn set that stays open
    (the unit sits on its other source, e.g. after its preferred feed's PDB failed) shows nothing
    to any client. Decided from the scenario (which pole) and the telemetry (ActiveSource)."""
    preferred = [int(u.preferred_source) for u in site.units]
    poles = {(f.target, f.onset_s): f.pole for f in scenario.faults if f.kind == "contact_wear"}
    for f in failures:
        if f.fault != "contact_wear" or not f.predictable:
            continue
        pole = poles.get((f.device_name, f.onset_s)) or preferred[f.device]
        win = (times >= f.onset_s - f.precursor_s) & (times < f.onset_s)
        f.observable = bool((active_source[win, f.device] == pole).any())


def label_arrays(times: np.ndarray, n: int, failures: list[Failure], comp: str, scenario,
                 present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """ttf (s to the next predictable failure, inf if none), fault code, excluded and grey masks (T x n)."""
    T = len(times)
    ttf = np.full((T, n), np.inf, dtype=np.float32)
    code = np.zeros((T, n), dtype=np.int8)
    excluded = np.zeros((T, n), dtype=bool)
    excluded[times < WARMUP_S] = True
    if present is not None:
        excluded[:, ~present] = True
    grey = np.zeros((T, n), dtype=bool)
    durations = {(f.kind, f.target, f.onset_s): f.duration_s for f in scenario.faults}
    for f in sorted((f for f in failures if f.component == comp), key=lambda f: -f.onset_s):
        col = f.device
        if f.predictable:
            before = times < f.onset_s
            t_to = (f.onset_s - times).astype(np.float32)
            sel = before & (t_to <= ttf[:, col])
            ttf[sel, col] = t_to[sel]
            code[sel, col] = FAULT_CODES[f.fault]
            excluded[times >= f.onset_s, col] = True
        else:
            end = f.onset_s + (durations.get((f.fault, f.device_name, f.onset_s), 0.0) if comp == "source" else math.inf)
            excluded[(times >= f.onset_s - HORIZON_S) & (times <= end + HORIZON_S), col] = True
    # degrading: a predictable failure's precursor is on; grey: and its onset is beyond the horizon
    degrading = np.zeros((T, n), dtype=bool)
    unseen = np.zeros((T, n), dtype=bool)
    for f in failures:
        if f.component == comp and f.predictable:
            on = (times >= f.onset_s - f.precursor_s) & (times < f.onset_s)
            degrading[on, f.device] = True
            grey[on & (f.onset_s - times > HORIZON_S), f.device] = True
            if not f.observable:
                unseen[(times >= f.onset_s - max(f.precursor_s, HORIZON_S)) & (times < f.onset_s), f.device] = True
    return {"ttf": ttf, "code": code, "excluded": excluded, "grey": grey & ~excluded,
            "degrading": degrading & ~excluded, "unseen": unseen & ~excluded}


# ---- simulation --------------------------------------------------------------------------------

@dataclass
class ScenarioRun:
    """One replayed scenario: features, baseline scores, labels and load series, (T x devices)."""

    name: str
    seed: int
    site_name: str
    times: np.ndarray
    names: dict[str, list[str]]
    X: dict[str, np.ndarray | None]  # kind (incl. "load") -> T x n x F float32, or None once scored
    baseline: dict[str, np.ndarray]  # kind -> T x n
    labels: dict[str, dict[str, np.ndarray]]
    failures: list[Failure]
    load_last: np.ndarray  # T x units, LoadPower samples (kW)
    load_m1: np.ndarray  # T x units, mean of the last minute (kW)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> T x n calibrated risk
    forecast: dict[int, np.ndarray] = field(default_factory=dict)  # horizon s -> T x units kW
    last_features: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> n x F at the last sample


def simulate(site, scenario, sample_interval_s: float = SAMPLE_INTERVAL_S) -> ScenarioRun:
    """Replay a scenario on the plant and sample it as a client would: features, baseline scores, labels."""
    from simulator.plant import Plant

    plant = Plant(site, scenario)
    times = np.arange(sample_interval_s, scenario.duration_s + 1e-9, sample_interval_s)

    def snapshots():
        for t in times:
            plant.advance_to(float(t))
            yield plant.snapshot()

    # the failure times are read after the replay (labels look ahead; features never do)
    return from_snapshots(site, scenario, times, snapshots(), sample_interval_s,
                          failure_times=lambda: plant.failure_times)


def from_snapshots(site, scenario, times: np.ndarray, snapshots, sample_interval_s: float = SAMPLE_INTERVAL_S,
                   failure_times=None) -> ScenarioRun:
    """A ScenarioRun from a stream of client-side snapshots (one per sample time). `failure_times`:
    a callable giving `Plant.failure_times` once the stream is consumed (None: scheduled onsets)."""
    fs = FeatureState(site, sample_interval_s)
    T = len(times)
    sizes = {"source": fs.ns, "pdb": fs.np_, "ats": fs.n, "des": fs.n, "load": fs.n}
    X = {k: np.empty((T, sizes[k], len(FEATURE_NAMES[k])), dtype=np.float32) for k in sizes}
    base = {k: np.empty((T, sizes[k]), dtype=np.float32) for k in COMPONENT_KINDS}
    last = np.empty((T, fs.n), dtype=np.float32)
    m1 = np.empty((T, fs.n), dtype=np.float32)
    active = np.empty((T, fs.n), dtype=np.int8)
    for j, (t, snap) in enumerate(zip(times, snapshots)):
        feats = fs.update(float(t), snap)
        for k in sizes:
            X[k][j] = feats[k]
        for k in COMPONENT_KINDS:
            base[k][j] = fs.baseline_scores[k]
        last[j] = snap["ats"]["LoadPower"]
        m1[j] = fs.load_level_kw
        active[j] = snap["ats"]["ActiveSource"]
    names = fs.device_names
    failures = scenario_failures(site, scenario, names, failure_times() if failure_times else None)
    mark_unobservable(failures, site, scenario, times, active)
    labels = {k: label_arrays(times, sizes[k], failures, k, scenario, fs.has_des if k == "des" else None)
              for k in COMPONENT_KINDS}
    return ScenarioRun(scenario.name, int(scenario.seed), site.name, times, names, X, base, labels, failures,
                       last, m1)


# Validation and test runs are kept whole (every sample of every device) for calibration, early
# stopping and the operating points: 0.65 GB per 6-h scenario on a 1,000-unit site. On a site larger
# than this they keep whole aisles up to about this many units (aisles holding a failure first), which
# they select in the worker, after the features were computed on the whole site (peers unchanged).
VALIDATION_MAX_UNITS = 240


def keep_aisles(run: ScenarioRun, site, max_units: int = VALIDATION_MAX_UNITS) -> ScenarioRun:
    """The run restricted to whole aisles holding about `max_units` micro-ATS (all of them if the site
    is no larger): aisles with a failing component first, then in site order. Sources are kept."""
    if len(site.units) <= max_units:
        return run
    failing = {f.device_name for f in run.failures}
    order = sorted(range(len(site.aisles)), key=lambda i: (not any(
        u.name in failing or (u.storage is not None and u.storage.name in failing) for u in site.aisles[i].units)
        and not any(p.name in failing for p in site.aisles[i].pdbs), i))
    kept, count = set(), 0
    for i in order:
        if count >= max_units:
            break
        kept.add(site.aisles[i].name)
        count += len(site.aisles[i].units)
    idx = {"source": np.arange(len(run.names["source"])),
           "pdb": np.array([i for i, p in enumerate(site.pdbs) if p.aisle in kept]),
           "ats": np.array([i for i, u in enumerate(site.units) if u.aisle in kept])}
    idx["des"] = idx["load"] = idx["ats"]
    new_index = {k: {int(old): new for new, old in enumerate(v)} for k, v in idx.items()}
    failures = []
    for f in run.failures:
        j = new_index[f.component].get(f.device)
        if j is not None:
            failures.append(Failure(**{**f.__dict__, "device": j}))
    return ScenarioRun(
        run.name, run.seed, run.site_name, run.times,
        {k: [run.names[k][i] for i in idx[k]] for k in run.names},
        {k: (None if v is None else v[:, idx[k]]) for k, v in run.X.items()},
        {k: v[:, idx[k]] for k, v in run.baseline.items()},
        {k: {name: a[:, idx[k]] for name, a in lab.items()} for k, lab in run.labels.items()},
        failures, run.load_last[:, idx["ats"]], run.load_m1[:, idx["ats"]])


def load_targets(run: ScenarioRun, horizon_s: int) -> np.ndarray:
    """Target of the load forecast at t: the mean LoadPower over the minute ending at t + h (T x units)."""
    steps = int(round(horizon_s / (run.times[1] - run.times[0])))
    y = np.full_like(run.load_m1, np.nan)
    if steps < len(run.times):
        y[:-steps] = run.load_m1[steps:]
    return y


def load_scored_rows(run: ScenarioRun, horizon_s: int, normal_only: bool = True) -> np.ndarray:
    """Rows where the forecast is judged (T x units): one season of history, a target and a live load.

    normal_only also leaves out load interruptions: rows where the level now or the target is
    outside 50-200 % of the unit's median level (IT load dropped by a dark unit, or restarting).
    Forecasting those is the risk model's job, and MAPE explodes as the truth approaches zero."""
    y = load_targets(run, horizon_s)
    seas = seasonal_naive(run, horizon_s)
    ok = np.isfinite(y) & (y > 0.5) & (run.load_m1 > 0.5) & np.isfinite(seas)
    ok &= (run.times >= SEASON_S)[:, None]
    if normal_only:
        med = np.nanmedian(np.where(ok, run.load_m1, np.nan), axis=0) if ok.any() else np.zeros(ok.shape[1])
        with np.errstate(invalid="ignore"):
            for v in (y, run.load_m1):
                ok &= (v > 0.5 * med) & (v < 2.0 * med)
    return ok


def seasonal_naive(run: ScenarioRun, horizon_s: int) -> np.ndarray:
    """Seasonal-naive forecast for t + h (see baselines.seasonal_naive)."""
    from cmcs.baselines import seasonal_naive as naive

    return naive(run.load_m1, float(run.times[1] - run.times[0]), horizon_s, SEASON_S)


# ---- training rows -----------------------------------------------------------------------------

NEGATIVE_STRIDE = 12  # training keeps one sample in 12 (2 min) of components that do not fail in the scenario
LOAD_STRIDE = 18  # and one in 18 (3 min) of the load rows


def training_rows(run: ScenarioRun, kind: str) -> dict[str, np.ndarray]:
    """Training rows of one component kind: every sample of components that fail in the scenario,
    one in NEGATIVE_STRIDE of the others (weighted up to match). X, y (fails within the horizon),
    degrading (precursor on), w."""
    lab = run.labels[kind]
    X = run.X[kind]
    T, n, _ = X.shape
    fails = np.zeros(n, dtype=bool)
    for f in run.failures:
        if f.component == kind and f.predictable:
            fails[f.device] = True
    stride_ok = (np.arange(T) % NEGATIVE_STRIDE == 0)[:, None]
    keep = ~lab["excluded"] & ~lab["unseen"] & (fails[None, :] | stride_ok)
    y = (lab["ttf"] <= HORIZON_S).astype(np.float32)
    w = np.broadcast_to(np.where(fails, 1.0, float(NEGATIVE_STRIDE)).astype(np.float32)[None, :], (T, n))
    return {"X": X[keep], "y": y[keep], "degrading": lab["degrading"][keep].astype(np.float32), "w": w[keep]}


def load_training_rows(run: ScenarioRun) -> tuple[np.ndarray, dict[int, np.ndarray], np.ndarray]:
    """(X, {h: target ratio}, mask) of the load forecaster, strided, rows with all targets defined."""
    X = run.X["load"]
    T = X.shape[0]
    keep = np.broadcast_to(((np.arange(T) % LOAD_STRIDE == 0) & (run.times >= WARMUP_S))[:, None],
                           run.load_m1.shape).copy()
    ys = {}
    for h in LOAD_HORIZONS_S:
        y = load_targets(run, h)
        keep &= np.isfinite(y) & (y > 0.5) & (run.load_m1 > 0.5)
        ys[h] = y
    return X[keep], {h: (ys[h][keep] / run.load_m1[keep] - 1.0).astype(np.float32) for h in ys}, keep


def compact_for_training(run: ScenarioRun) -> dict:
    """The training rows of a run, small enough to pass between processes."""
    out = {"name": run.name, "seed": run.seed, "risk": {}, "n_failures": {}}
    for k in COMPONENT_KINDS:
        out["risk"][k] = training_rows(run, k)
    X, ys, _ = load_training_rows(run)
    out["load"] = (X, ys)
    out["failures"] = run.failures
    return out
