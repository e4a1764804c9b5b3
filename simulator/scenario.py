"""Scenarios: what the plant replays (docs/interface.md section 6). A scenario is data.

```yaml
name: joint-failure-aisle2
duration_s: 7200          # plant time to simulate
step_s: 1.0               # continuous-physics step; events inside a step keep millisecond time
seed: 42
start_time_of_day_s: 36000   # 10:00; shapes the diurnal load
site: demo                # "demo", or a site file path relative to the scenario file
load:                     # all optional
  scale: 1.0              # multiplies every unit's it_load_kw
  diurnal_amplitude: 0.15 # +-15 % over the day, peak at 15:00
  noise_pct: 1.0          # fast load fluctuation (white, per second)
  drift_pct: 1.5          # slow fluctuation (AR(1), 10 min time constant)
  batch_probability: 0.6  # chance that an aisle runs its hourly batch job
  batch_magnitude: 0.2    # +20 % of unit load while a batch runs
faults:
  - kind: joint_degradation    # see FAULT_KINDS
    target: PDB-02-A
    onset_s: 5400              # when it fails (outage starts, sag starts, joint opens ...)
    precursor_s: 3000          # its precursors show this long before onset (0: none)
    severity: 0.8              # 0..1
    duration_s: 0              # outages, sags, swells, excursions: how long
    depth_pu: 0.0              # sags/swells: residual voltage in per unit
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# kind -> device kind of its target, and whether it is a failure with precursors
FAULT_KINDS: dict[str, str] = {
    "source_outage": "source",
    "voltage_sag": "source",
    "voltage_swell": "source",
    "joint_degradation": "pdb",
    "contact_wear": "ats",
    "ats_slow_transfer": "ats",
    "battery_fade": "des",
    # Not a fault: a benign anomaly (a cooling unit struggling in an aisle) that warms every
    # joint and contact there without any degradation. Threshold alarms fire on it; a model
    # that compares temperature with I^2 and with peers should not.
    "ambient_excursion": "aisle",
}
DEGRADATION_KINDS = ("joint_degradation", "contact_wear", "ats_slow_transfer", "battery_fade", "source_outage")


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str
    onset_s: float
    precursor_s: float = 0.0
    severity: float = 0.5
    duration_s: float = 0.0
    depth_pu: float = 0.0
    pole: int | None = None  # contact_wear: which contact set (1 = A, 2 = B); default: the preferred one

    @property
    def precursor_start_s(self) -> float:
        return self.onset_s - self.precursor_s


@dataclass(frozen=True)
class LoadProfile:
    scale: float = 1.0
    diurnal_amplitude: float = 0.15
    noise_pct: float = 1.0
    drift_pct: float = 1.5
    batch_probability: float = 0.6
    batch_magnitude: float = 0.2


@dataclass(frozen=True)
class Scenario:
    name: str = "quiet"
    duration_s: float = 3600.0
    step_s: float = 1.0
    seed: int = 0
    start_time_of_day_s: float = 36000.0
    site: str = "demo"
    load: LoadProfile = field(default_factory=LoadProfile)
    faults: tuple[Fault, ...] = ()
    path: str | None = None

    def with_faults(self, *faults: Fault) -> "Scenario":
        return replace(self, faults=tuple(self.faults) + tuple(faults))


def quiet_day(seed: int = 0, duration_s: float = 86400.0) -> Scenario:
    """A day with no fault: the default for `cmcs simulate` and `cmcs run`."""
    return Scenario(name="quiet-day", duration_s=duration_s, seed=seed)


def random_scenario(site, seed: int, duration_s: float = 6 * 3600.0, faults_per_hour: float = 1.0,
                    name: str | None = None) -> Scenario:
    """A random fault-rich scenario for training and evaluation: every kind, random targets,
    random lead times (minutes to hours), severities and benign anomalies."""
    rng = np.random.default_rng(seed)
    units = [u for u in site.units]
    des_units = [u.storage.name for u in units if u.storage is not None]
    pdbs = [p.name for p in site.pdbs]
    aisles = [a.name for a in site.aisles]
    n_faults = max(1, int(rng.poisson(faults_per_hour * duration_s / 3600.0)))
    faults: list[Fault] = []
    used_targets: set[str] = set()
    degradation_weights = {
        "joint_degradation": 0.25, "contact_wear": 0.2, "ats_slow_transfer": 0.15,
        "battery_fade": 0.15, "source_outage": 0.05, "voltage_sag": 0.12, "ambient_excursion": 0.08,
    }
    kinds = list(degradation_weights)
    probs = np.array([degradation_weights[k] for k in kinds])
    probs /= probs.sum()
    for _ in range(n_faults):
        kind = str(rng.choice(kinds, p=probs))
        severity = float(np.round(rng.uniform(0.2, 1.0), 2))
        # precursors last minutes to hours (log-uniform 10 min .. 3 h), never before t = 0
        precursor = float(np.round(math.exp(rng.uniform(math.log(600.0), math.log(3 * 3600.0)))))
        lo = 0.25 * duration_s
        onset = float(np.round(rng.uniform(lo, 0.95 * duration_s)))
        if kind in ("voltage_sag",):
            faults.append(Fault(kind, str(rng.choice(["SourceB", "SourceB", "SourceA"])), onset, 0.0,
                                severity, duration_s=float(np.round(rng.uniform(0.05, 3.0), 3)),
                                depth_pu=float(np.round(rng.uniform(0.4, 0.85), 2))))
            continue
        if kind == "ambient_excursion":
            faults.append(Fault(kind, str(rng.choice(aisles)), onset, 0.0, severity,
                                duration_s=float(np.round(rng.uniform(1200, 5400)))))
            continue
        precursor = min(precursor, onset)
        if kind == "source_outage":
            target = str(rng.choice(["SourceA", "SourceB"]))
            faults.append(Fault(kind, target, onset, precursor, severity,
                                duration_s=float(np.round(rng.uniform(60, 1800)))))
            continue
        pool = {"joint_degradation": pdbs, "contact_wear": [u.name for u in units],
                "ats_slow_transfer": [u.name for u in units], "battery_fade": des_units}[kind]
        pool = [t for t in pool if t not in used_targets] or pool
        target = str(rng.choice(pool))
        used_targets.add(target)
        faults.append(Fault(kind, target, onset, precursor, severity))
    # an ATS that transfers slowly only shows it when a transfer is needed: add a sag after some
    for f in list(faults):
        if f.kind == "ats_slow_transfer" and rng.random() < 0.7:
            t = f.onset_s + float(np.round(rng.uniform(60, 1800)))
            if t < duration_s:
                faults.append(Fault("voltage_sag", "SourceB", t, 0.0, 0.5,
                                    duration_s=float(np.round(rng.uniform(0.1, 2.0), 3)),
                                    depth_pu=float(np.round(rng.uniform(0.3, 0.8), 2))))
    faults.sort(key=lambda f: f.onset_s)
    return Scenario(
        name=name or f"random-{seed}", duration_s=duration_s, seed=seed,
        start_time_of_day_s=float(rng.integers(0, 24) * 3600),
        load=LoadProfile(scale=float(np.round(rng.uniform(0.85, 1.1), 2)),
                         diurnal_amplitude=float(np.round(rng.uniform(0.08, 0.2), 2)),
                         batch_probability=float(np.round(rng.uniform(0.3, 0.8), 2))),
        faults=tuple(faults),
    )


# ---- scenario files ---------------------------------------------------------------------------

_SCENARIO_KEYS = {"name", "description", "duration_s", "step_s", "seed", "start_time_of_day_s", "site", "load",
                  "faults"}
_LOAD_KEYS = {"scale", "diurnal_amplitude", "noise_pct", "drift_pct", "batch_probability", "batch_magnitude"}
_FAULT_KEYS = {"kind", "target", "onset_s", "precursor_s", "severity", "duration_s", "depth_pu", "pole"}


def load_scenario(path, site=None) -> Scenario:
    """Read and validate a scenario file; raises siteconfig.yamlpos.ConfigErrors naming file, line, key.

    When `site` is given, fault targets are checked against its devices."""
    from siteconfig.yamlpos import read_file_text

    text = read_file_text(path)
    return parse_scenario(text, str(path), site)


def parse_scenario(text: str, filename: str, site=None) -> Scenario:
    from siteconfig.yamlpos import ErrorCollector, read_document

    errors = ErrorCollector(filename)
    top = read_document(text, errors, "a scenario mapping")
    if top is None:
        errors.raise_if_any()
    top.reject_unknown(_SCENARIO_KEYS)
    name = top.string("name", default=Path(filename).stem)
    duration = top.number("duration_s", gt=0)
    step = top.number("step_s", default=1.0, gt=0, le=60)
    seed = top.integer("seed", default=0, ge=0)
    tod = top.number("start_time_of_day_s", default=36000.0, ge=0, lt=86400)
    site_ref = top.string("site", default="demo")
    load = LoadProfile()
    lm = top.mapping("load")
    if lm is not None:
        lm.reject_unknown(_LOAD_KEYS)
        load = LoadProfile(
            scale=lm.number("scale", default=1.0, gt=0, le=3),
            diurnal_amplitude=lm.number("diurnal_amplitude", default=0.15, ge=0, lt=1),
            noise_pct=lm.number("noise_pct", default=1.0, ge=0, le=20),
            drift_pct=lm.number("drift_pct", default=1.5, ge=0, le=20),
            batch_probability=lm.number("batch_probability", default=0.6, ge=0, le=1),
            batch_magnitude=lm.number("batch_magnitude", default=0.2, ge=0, le=2),
        )
    targets = None
    if site is not None:
        targets = {"source": {s.name for s in site.sources}, "pdb": {p.name for p in site.pdbs},
                   "ats": {u.name for u in site.units}, "des": {d.name for d in site.storages},
                   "aisle": {a.name for a in site.aisles}}
    faults: list[Fault] = []
    for fm in top.mappings("faults"):
        fm.reject_unknown(_FAULT_KEYS)
        kind = fm.choice("kind", list(FAULT_KINDS))
        target = fm.string("target")
        onset = fm.number("onset_s", ge=0)
        precursor = fm.number("precursor_s", default=0.0, ge=0)
        severity = fm.number("severity", default=0.5, ge=0, le=1)
        dur = fm.number("duration_s", default=0.0, ge=0)
        depth = fm.number("depth_pu", default=0.0, ge=0, le=2)
        pole = fm.choice("pole", {"A": 1, "B": 2, "SourceA": 1, "SourceB": 2, 1: 1, 2: 2}, default=None)
        if kind is None or target is None or onset is None:
            continue
        if targets is not None and target not in targets[FAULT_KINDS[kind]]:
            fm.error(f"no {FAULT_KINDS[kind]} named {target!r} in site {site.name!r}", "target")
        if kind in ("source_outage", "voltage_sag", "voltage_swell", "ambient_excursion") and dur <= 0:
            fm.error(f"{kind} needs a positive duration_s", "duration_s")
        if precursor is not None and onset is not None and precursor > onset:
            fm.error(f"precursor_s ({precursor:g}) is longer than onset_s ({onset:g}): precursors would start "
                     "before the scenario", "precursor_s")
        if duration is not None and onset >= duration:
            fm.error(f"onset_s ({onset:g}) is not inside the scenario (duration_s {duration:g})", "onset_s")
        faults.append(Fault(kind, target, onset, precursor or 0.0, severity, dur or 0.0, depth or 0.0, pole))
    errors.raise_if_any()
    return Scenario(name=name, duration_s=duration, step_s=step, seed=seed, start_time_of_day_s=tod,
                    site=site_ref, load=load, faults=tuple(sorted(faults, key=lambda f: f.onset_s)),
                    path=str(filename))


def scenario_to_yaml(sc: Scenario) -> str:
    """The file form of a scenario (parse_scenario reads it back to an equal Scenario)."""
    import yaml

    doc = {
        "name": sc.name, "duration_s": sc.duration_s, "step_s": sc.step_s, "seed": sc.seed,
        "start_time_of_day_s": sc.start_time_of_day_s, "site": sc.site,
        "load": {k: getattr(sc.load, k) for k in sorted(_LOAD_KEYS)},
        "faults": [],
    }
    for f in sc.faults:
        d = {"kind": f.kind, "target": f.target, "onset_s": f.onset_s, "precursor_s": f.precursor_s,
             "severity": f.severity}
        if f.duration_s:
            d["duration_s"] = f.duration_s
        if f.depth_pu:
            d["depth_pu"] = f.depth_pu
        if f.pole:
            d["pole"] = "A" if f.pole == 1 else "B"
        doc["faults"].append(d)
    return yaml.safe_dump(doc, sort_keys=False)


def scenario_files(folder) -> list[Path]:
    """The scenario files of a folder, sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))


SCENARIO_LIBRARY = Path(__file__).parent / "scenarios"
