"""`cmcs train`: generate labelled data, train the risk and load models, judge them, save a bundle.

    cmcs train [--config SITE] [--scenario-count N] [--seed S] [--out DIR] [--json F] [--quick]
    cmcs train [--config SITE] --history DATA_DIR [--bundle B] [--holdout-days D] [--out DIR] [--json F]
    cmcs train --eval-only [--scenarios DIR] [--bundle B] [--json F] [--out DIR]

Training replays random fault-rich scenarios (seeds S .. S+N-1) on the demo site and a few
generated site shapes, two processes at a time; scenarios are split into train / validation /
test by seed block (no scenario in two splits; validation and test seeds come after every
training seed). Early stopping and isotonic calibration use the validation scenarios, and so do
the operating thresholds (model) and margins (threshold baseline) at the false-alarm budget.
The test scenarios are only scored. The shipped held-out set (simulator/scenarios/heldout/)
uses seeds from HELDOUT_SEED_START on, which training refuses to use.

`--config SITE` trains for one site file: every scenario is generated on that site's layout (its
aisles, ratings, loads, DES and preferred sources), and the bundle records the layout it was
trained for (`bundle.json: layout`, cmcs.layout), which the live CMCS checks at start-up.
Without it the bundle is recorded as the demo hall's (it is judged on the demo hall).

`--history DATA_DIR` refines the load forecaster of a bundle (`--bundle B`, else the one this run
trains) on the site's recorded history and judges it on the history's last days (cmcs.history).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from cmcs.dataset import (
    COMPONENT_KINDS,
    FAILURE_KINDS,
    HELDOUT_SEED_START,
    HORIZON_S,
    ScenarioRun,
    compact_for_training,
    keep_aisles,
    load_scored_rows,
    load_targets,
    seasonal_naive,
    simulate,
    training_scenario,
)
from cmcs.cli_args import add_history_arguments  # noqa: F401  (re-exported: the options of --history)
from cmcs.features import FEATURE_NAMES, LOAD_HORIZONS_S
from cmcs.layout import layout_fingerprint, layout_record, layout_summary
from cmcs.models import SHIPPED_BUNDLE, BundleError, Predictor

HELDOUT_DIR = Path(__file__).resolve().parent.parent / "simulator" / "scenarios" / "heldout"
DEFAULT_REPORT_DIR = Path("reports") / "train"
DEFAULT_SCENARIO_COUNT = 80
HORIZON_KEYS = {60: "1min", 300: "5min", 900: "15min"}


@dataclass
class TrainConfig:
    seed: int = 0
    scenario_count: int = DEFAULT_SCENARIO_COUNT
    duration_s: float = 6 * 3600.0
    val_fraction: float = 0.25
    test_fraction: float = 0.1
    risk_rounds: int = 300
    load_rounds: int = 300
    processes: int = 2
    quick: bool = False
    site: object = None  # siteconfig.model.Site to train for (`--config`); None: demo hall + generated shapes
    site_file: str | None = None  # where it came from, for the record

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        quick = bool(getattr(args, "quick", False))
        count = getattr(args, "scenario_count", None)
        cfg = cls(seed=int(getattr(args, "seed", 0) or 0), quick=quick)
        if quick:
            cfg.scenario_count, cfg.duration_s, cfg.risk_rounds, cfg.load_rounds = 10, 3 * 3600.0, 40, 40
        if count is not None:
            cfg.scenario_count = int(count)
        return cfg

    def splits(self) -> dict[str, list[int]]:
        seeds = list(range(self.seed, self.seed + self.scenario_count))
        n_test = max(1, int(round(self.test_fraction * len(seeds))))
        n_val = max(1, int(round(self.val_fraction * len(seeds))))
        n_train = len(seeds) - n_val - n_test
        return {"train": seeds[:n_train], "val": seeds[n_train:n_train + n_val], "test": seeds[n_train + n_val:]}


# ---- the CLI -----------------------------------------------------------------------------------

def cli_train(args) -> int:
    from siteconfig.errors import CliError

    try:
        if getattr(args, "eval_only", False) and getattr(args, "history", None) is not None:
            raise CliError("--history trains (refines a bundle on the site's history); --eval-only evaluates on "
                           "scenario files: use one or the other")
        if getattr(args, "eval_only", False):
            return _cli_eval(args)
        if getattr(args, "history", None) is not None:
            return _cli_train_history(args)
        if getattr(args, "holdout_days", None) is not None:
            raise CliError("--holdout-days goes with --history DIR (the held-out days of that history)")
        if getattr(args, "bundle", None) is not None:
            raise CliError("--bundle names the bundle to evaluate and needs --eval-only (or, with --history, the "
                           "bundle to refine); training writes a new bundle into --data-dir (or --out)")
        return _cli_train(args)
    except BundleError as exc:
        raise CliError(str(exc)) from None


def _cli_train(args) -> int:
    cfg = TrainConfig.from_args(args)
    if getattr(args, "config", None) is not None:
        cfg.site, cfg.site_file = _load_site_arg(args.config), str(args.config)
        print(f"training for {layout_summary(cfg.site)} (layout fingerprint {layout_fingerprint(cfg.site)}), "
              f"{cfg.scenario_count} scenarios of {cfg.duration_s / 3600:g} h", file=sys.stderr)
    _check_train_config(cfg)
    out = _out_dir(args)
    t0 = time.perf_counter()
    predictor, metrics, training = train(cfg, progress=True)
    training["wall_time_s"] = round(time.perf_counter() - t0, 1)
    metrics["training_time_s"] = training["wall_time_s"]
    path = predictor.save(out, metrics=metrics, training=training)
    print_table(metrics, title=f"test split ({len(cfg.splits()['test'])} scenarios never used to train or tune)")
    if args.json:
        _write_json(args.json, metrics)
    print(f"bundle {predictor.version} saved to {path} ({_dir_size_mb(path):.2f} MB); "
          f"training took {training['wall_time_s']:.0f} s")
    return 0


def _check_train_config(cfg: TrainConfig) -> None:
    from siteconfig.errors import CliError

    if cfg.scenario_count < 3:
        raise CliError(f"--scenario-count must be at least 3 (train, validation, test), got {cfg.scenario_count}")
    if cfg.seed < 0 or cfg.seed + cfg.scenario_count > HELDOUT_SEED_START:
        raise CliError(f"training seeds {cfg.seed}..{cfg.seed + cfg.scenario_count - 1} must lie in 0.."
                       f"{HELDOUT_SEED_START - 1}: seeds from {HELDOUT_SEED_START} on are the held-out set's")


def _out_dir(args) -> Path:
    """--out, else <data-dir>/models/current (the data dir created private, as `cmcs run` makes it)."""
    if args.out is not None:
        return Path(args.out)
    data_dir = Path(getattr(args, "data_dir", None) or "cmcs-data")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return data_dir / "models" / "current"


def _cli_train_history(args) -> int:
    """`cmcs train [--config SITE] --history DIR [--bundle B] [--holdout-days D]`: the bundle (B, or one
    trained now as `cmcs train [--config SITE]` trains it) with its load models refined on the site's
    recorded history, judged on the history's last days against the shipped bundle and persistence."""
    from siteconfig.demo import demo_site
    from siteconfig.errors import CliError

    from cmcs import history as H
    from cmcs.layout import check_layout

    site_file = getattr(args, "config", None)
    site = _load_site_arg(site_file) if site_file is not None else demo_site()
    t0 = time.perf_counter()
    base = base_path = None
    if getattr(args, "bundle", None) is not None:  # a bad bundle is refused before the history is read
        base_path = Path(args.bundle)
        base = Predictor.load(base_path)
    try:
        # the history before any training: a bad one costs none
        hist = H.read_site_history(args.history, site, getattr(args, "holdout_days", None), progress=True)
        split = hist.split
    except H.HistoryError as exc:
        raise CliError(str(exc)) from None
    print(f"history of {site.name}: {hist.path}, {hist.days:.2f} days ({H._iso(hist.start_s)} .. "
          f"{H._iso(hist.end_s)}), {hist.units} units, {len(hist.runs)} segment(s); the last "
          f"{split.holdout_days:.2f} days held out", file=sys.stderr)
    if hist.extra_units:
        print(f"note: {len(hist.extra_units)} unit(s) in the history are not in the site file (first: "
              f"{hist.extra_units[0]}); left out", file=sys.stderr)
    metrics, training = {}, None
    if base is not None:
        base_desc = f"bundle {base.version} ({base_path})"
    else:
        cfg = TrainConfig.from_args(args)
        if site_file is not None:
            cfg.site, cfg.site_file = site, str(site_file)
        _check_train_config(cfg)
        base, metrics, training = train(cfg, progress=True)
        base_path, base_desc = None, f"bundle {base.version} (trained now)"
    check = check_layout(base.meta, site)
    if not check.matches:
        print(f"note: {base_desc} was {check.reason}; the refined bundle keeps that record (the live CMCS on "
              f"{site.name} stays Advisory with it)", file=sys.stderr)
    t_refine = time.perf_counter()
    try:
        boosters, info = H.refine_load(base, hist, split, stride=H.HISTORY_STRIDE)
    except H.HistoryError as exc:
        raise CliError(str(exc)) from None
    record = {
        "data_dir": str(Path(args.history).resolve()), "file": str(hist.path.resolve()), "site": site.name,
        "from": H._iso(hist.start_s), "to": H._iso(hist.end_s), "days": round(hist.days, 3),
        "holdout_days": round(split.holdout_days, 3), "holdout_from": H._iso(split.holdout_start_s),
        "units": hist.units, "segments": len(hist.runs), "train_rows": info["train_rows"], "val_rows": info["val_rows"],
        "stride_samples": max(H.HISTORY_STRIDE, hist.feature_stride), "feature_stride_samples": hist.feature_stride,
        "method": "continued boosting from the base bundle's load boosters "
        f"(eta {H.REFINE_ETA:g}, early stopping on the last {H.VAL_FRACTION:.0%} of the training span)",
        "horizons": info["horizons"], "base_bundle": {"version": base.version,
                                                      "path": str(base_path) if base_path else None},
    }
    refined = H.refined_predictor(base, boosters, record)
    refine_s = time.perf_counter() - t_refine
    shipped = Predictor.load(SHIPPED_BUNDLE)
    predictors = {"shipped": shipped}
    names = {"shipped": "shipped bundle"}
    if base_path is None or Path(base_path).resolve() != SHIPPED_BUNDLE.resolve():
        predictors["base"], names["base"] = base, "base bundle"
    predictors["refined"], names["refined"] = refined, "refined"
    ev = H.evaluate_holdout(hist, split, predictors)
    metrics["history"] = dict(record, read_s=round(hist.read_s, 1), refine_s=round(refine_s, 1),
                              holdout=ev, base=("shipped" if "base" not in predictors else "base"))
    metrics["history_load"] = H.contract_load(ev, "refined")
    if training is not None:
        print_table(metrics, title=f"test split ({len(cfg.splits()['test'])} scenarios never used to train or tune)")
    H.print_history_table(ev, names, f"{split.holdout_days:.2f} days from {H._iso(split.holdout_start_s)}")
    # the base's own training record stays (a bundle refined twice keeps the chain)
    training = dict(training or {"base": base.meta.get("training")}, history=record)
    training["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out = _out_dir(args)
    path = refined.save(out, metrics=metrics, training=training)
    if args.json:
        _write_json(args.json, metrics)
    print(f"bundle {refined.version} saved to {path} ({_dir_size_mb(path):.2f} MB); took "
          f"{training['wall_time_s']:.0f} s (history read {hist.read_s:.0f} s, refinement {refine_s:.0f} s)")
    return 0


def _load_site_arg(path) -> object:
    """The site file of `--config`, or one clear CliError line."""
    from siteconfig.errors import CliError
    from siteconfig.loader import load_site
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    try:
        return load_site(path)
    except (ConfigError, ConfigErrors, OSError, ValueError) as exc:
        raise CliError(_one_line(exc, Path(path))) from None


def _cli_eval(args) -> int:
    from siteconfig.errors import CliError

    if getattr(args, "config", None) is not None:
        raise CliError("--config trains for a site; with --eval-only each scenario file names its site "
                       "(`site: FILE`, relative to the scenario file)")

    scen_dir = Path(args.scenarios) if args.scenarios else HELDOUT_DIR
    bundle = Path(args.bundle) if args.bundle else SHIPPED_BUNDLE
    predictor = Predictor.load(bundle)
    jobs = load_scenario_folder(scen_dir)
    out_dir = Path(args.out) if args.out else DEFAULT_REPORT_DIR
    print(f"evaluating bundle {predictor.version} ({bundle}) on {len(jobs)} scenarios from {scen_dir}")
    # the workers only simulate: xgboost's OpenMP runtime is not fork-safe, so scoring stays here
    runs = replay([(site, sc, "full", None) for site, sc in jobs], desc="scenarios",
                  post=lambda run: score_run(predictor, run))
    metrics = evaluate(runs, predictor)
    metrics["bundle"] = {"path": str(bundle), "version": predictor.version}
    metrics["scenarios"] = {"folder": str(scen_dir), "count": len(runs)}
    print_table(metrics, title=f"{len(runs)} scenarios from {scen_dir}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        from cmcs.plots import write_plots

        write_plots(out_dir, runs, predictor, metrics)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise CliError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None
    if args.json:
        _write_json(args.json, metrics)
    print(f"plots and metrics.json written to {out_dir}")
    return 0


def _write_json(path, metrics: dict) -> None:
    from siteconfig.errors import CliError

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


# ---- scenario folders --------------------------------------------------------------------------

def load_scenario_folder(folder: Path) -> list[tuple]:
    """(site, scenario) of every scenario file in a folder; CliError naming the first bad file."""
    from siteconfig.errors import CliError
    from siteconfig.yamlpos import ConfigError, ConfigErrors
    from simulator.scenario import load_scenario, scenario_files

    folder = Path(folder)
    if not folder.is_dir():
        raise CliError(f"scenario folder {folder}: no such directory")
    files = scenario_files(folder)
    if not files:
        raise CliError(f"scenario folder {folder}: no scenario files (*.yaml, *.yml)")
    sites: dict[str, object] = {}
    jobs = []
    for path in files:
        try:
            sc = load_scenario(path)
            site = _site_of(sc, path, sites)
            sc = load_scenario(path, site)  # now also checks fault targets against the site
        except (ConfigError, ConfigErrors, OSError, ValueError) as exc:
            raise CliError(_one_line(exc, path)) from None
        jobs.append((site, sc))
    return jobs


def _site_of(sc, path: Path, cache: dict):
    from siteconfig.demo import demo_site
    from siteconfig.loader import load_site

    ref = sc.site or "demo"
    if ref not in cache:
        cache[ref] = demo_site() if ref == "demo" else load_site(Path(path).parent / ref)
    return cache[ref]


def _one_line(exc: Exception, path: Path) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    msg = lines[0]
    if str(path) not in msg and path.name not in msg:
        msg = f"{path}: {msg}"
    return msg + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


# ---- parallel replay ---------------------------------------------------------------------------

def _job(args):
    """Replay one scenario in a worker. Workers never touch xgboost (its OpenMP runtime does not
    survive a fork once the parent has used it): they return features, the parent scores."""
    site, scenario, mode, _ = args
    run = simulate(site, scenario)
    if mode == "train":
        return compact_for_training(run)
    if mode == "val":  # validation / test of a training run: whole aisles, at most about 240 units
        return keep_aisles(run, site)
    return run


def replay(tasks: list[tuple], processes: int = 2, progress: bool = True, desc: str = "simulating",
           post=None) -> list:
    """Run (site, scenario, mode, _) tasks, longest first, on `processes` cores; results in task
    order, each passed through `post` (in this process) as it arrives."""
    from tqdm import tqdm

    order = sorted(range(len(tasks)), key=lambda i: -len(tasks[i][0].units) * tasks[i][1].duration_s)
    results: list = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="scenario", disable=not progress, file=sys.stderr)
    post = post or (lambda r: r)
    if processes <= 1 or len(tasks) <= 1:
        for i in order:
            results[i] = post(_job(tasks[i]))
            bar.update(1)
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(processes, len(tasks))) as pool:
            for i, res in pool.imap_unordered(_indexed_job, [(i, tasks[i]) for i in order]):
                results[i] = post(res)
                bar.update(1)
    bar.close()
    return results


def _indexed_job(it):
    i, task = it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return i, _job(task)


def score_run(predictor: Predictor, run: ScenarioRun, keep_features: bool = False) -> ScenarioRun:
    """Risk scores and load forecasts of every sample of a run (the same calls as the live loop)."""
    for kind in COMPONENT_KINDS:
        run.scores[kind] = predictor.predict({kind: run.X[kind]})[kind]
    run.forecast = predictor.forecast({"load": run.X["load"], "load_level_kw": run.load_m1})
    if not keep_features:
        run.last_features = {k: v[-1] for k, v in run.X.items() if v is not None}
        run.X = {k: None for k in run.X}
    return run


# ---- training ----------------------------------------------------------------------------------

def train(cfg: TrainConfig, progress: bool = True, log=print):
    """Generate, train, calibrate, choose operating points, test. Returns (predictor, metrics, training)."""
    from cmcs.metrics import FA_BUDGET_PER_100_UNIT_DAYS

    splits = cfg.splits()
    t_start = time.perf_counter()
    jobs = {name: [training_scenario(s, cfg.duration_s, cfg.site) for s in seeds] for name, seeds in splits.items()}
    all_jobs = [(s, "train") for s in jobs["train"]] + [(s, "val") for s in jobs["val"]] + [
        (s, "val") for s in jobs["test"]]
    results = replay([(site, sc, mode, None) for (site, sc), mode in all_jobs], cfg.processes, progress)
    n_tr, n_va = len(jobs["train"]), len(jobs["val"])
    train_c, val_runs, test_runs = results[:n_tr], results[n_tr:n_tr + n_va], results[n_tr + n_va:]
    t_data = time.perf_counter() - t_start
    predictor, counts = fit(cfg, train_c, val_runs, progress)
    for run in test_runs:
        score_run(predictor, run)
    metrics = evaluate(test_runs, predictor)
    metrics["validation"] = evaluate(val_runs, predictor, with_inference=False)["risk"]
    training = {
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "site"},
        "splits": {k: [v[0], v[-1]] if v else [] for k, v in splits.items()},
        "split_rule": "by scenario (disjoint seed blocks: train, then validation, then test)",
        "heldout_seed_start": HELDOUT_SEED_START, "horizon_s": HORIZON_S,
        "fa_budget_per_100_unit_days": FA_BUDGET_PER_100_UNIT_DAYS,
        "sites": dict(Counter(site.name for js in jobs.values() for site, _ in js)),
        "rows": counts, "data_generation_s": round(t_data, 1),
        "command": (f"cmcs train --seed {cfg.seed} --scenario-count {cfg.scenario_count}"
                    + (f" --config {cfg.site_file}" if cfg.site_file else "") + (" --quick" if cfg.quick else "")),
    }
    predictor.meta["training_summary"] = {"command": training["command"], "scenarios": cfg.scenario_count}
    training["layout"] = record_layout(predictor, cfg)
    return predictor, metrics, training


def record_layout(predictor: Predictor, cfg: TrainConfig) -> dict:
    """Write into the predictor's metadata the layout it was trained for (`train_layout_record`); a
    bundle for a `--config` site carries its fingerprint in its version too (the demo hall's keeps its own)."""
    predictor.meta["layout"] = rec = train_layout_record(cfg)
    if cfg.site is not None:
        predictor.version = predictor.meta["version"] = f"{predictor.version}.site-{rec['fingerprint'][:8]}"
    return rec


def train_layout_record(cfg: TrainConfig) -> dict:
    """The layout a bundle trained with `cfg` is for: the `--config` site, else the demo hall."""
    from siteconfig.demo import demo_site

    if cfg.site is not None:
        return layout_record(cfg.site)
    return layout_record(demo_site(), note="trained on the demo hall and generated shapes (cmcs.dataset."
                                            "TRAIN_SITE_SHAPES), judged on the demo hall: the demo hall's bundle")


def fit(cfg: TrainConfig, train_c: list[dict], val_runs: list[ScenarioRun], progress: bool = True):
    """Train every model on the training rows; early stopping, calibration and operating points on
    the validation runs (which are scored in place). Returns (predictor, row counts)."""
    from cmcs import models
    from cmcs.metrics import BASELINE_MARGINS, RISK_THRESHOLD_FLOOR, choose_threshold, raise_keeping_detections

    stages = ["risk:" + k for k in COMPONENT_KINDS] + [f"load:{h}s" for h in LOAD_HORIZONS_S] + ["calibrate"]
    from tqdm import tqdm

    bar = tqdm(total=len(stages), desc="training", unit="model", disable=not progress, file=sys.stderr)
    risk, load = {}, {}
    calibration = {}
    counts = {}
    for kind in COMPONENT_KINDS:
        tr = {k: np.concatenate([c["risk"][kind][k] for c in train_c]) for k in ("X", "y", "degrading", "w")}
        va = _val_rows(val_runs, kind)
        counts[kind] = {"train_rows": int(len(tr["y"])), "train_positive_rows": int(tr["y"].sum()),
                        "train_degrading_rows": int(tr["degrading"].sum()),
                        "val_rows": int(len(va["y"])), "val_positive_rows": int(va["y"].sum())}
        risk[kind] = models.train_risk(tr, va, cfg.risk_rounds, nthread=cfg.processes)
        raw = models.combined_margin(*risk[kind], va["X"])
        calibration[kind] = (models.isotonic_fit(raw, va["y"], va["w"]) if va["y"].sum() > 0
                             else {"x": [0.0, 1.0], "y": [0.0, 0.0]})
        counts[kind]["trees"] = [int(b.num_boosted_rounds()) for b in risk[kind]]
        bar.update(1)
    for h in LOAD_HORIZONS_S:
        X = np.concatenate([c["load"][0] for c in train_c])
        y = np.concatenate([c["load"][1][h] for c in train_c])
        Xv, yv = _val_load_rows(val_runs, h)
        load[h] = models.train_load(X, y, Xv, yv, cfg.load_rounds, nthread=cfg.processes)
        counts[f"load_{h}s"] = {"train_rows": int(len(y)), "trees": int(load[h].num_boosted_rounds())}
        bar.update(1)
    version = (f"{models.MODEL_VERSION}+f{models.FEATURE_VERSION}.s{cfg.seed}-{cfg.seed + cfg.scenario_count - 1}"
               f".{time.strftime('%Y%m%d')}")
    predictor = models.Predictor(models.new_meta(version, calibration, {}, {}), risk, load)
    for run in val_runs:
        score_run(predictor, run)
    model_score = lambda r, k: r.scores[k]  # noqa: E731
    base_score = lambda r, k: r.baseline[k]  # noqa: E731
    # the budget's lowest threshold on validation, then raised as far as it keeps every validation detection
    # and 80 % of their median lead time
    thresholds = {k: raise_keeping_detections(val_runs, k, model_score,
                                              choose_threshold(val_runs, k, model_score, floor=RISK_THRESHOLD_FLOOR))
                  for k in COMPONENT_KINDS}
    margins = {k: raise_keeping_detections(val_runs, k, base_score,
                                           choose_threshold(val_runs, k, base_score, candidates=BASELINE_MARGINS),
                                           ceiling=float(BASELINE_MARGINS.max()))
               for k in COMPONENT_KINDS}  # the same rule for the threshold baseline (mission policy b)
    predictor.thresholds = thresholds
    predictor.baseline_margins = margins
    predictor.meta["thresholds"] = {k: float(v) for k, v in thresholds.items()}
    predictor.meta["baseline_margins"] = {k: float(v) for k, v in margins.items()}
    bar.update(1)
    bar.close()
    return predictor, counts


def _val_rows(runs: list[ScenarioRun], kind: str) -> dict[str, np.ndarray]:
    """Every scored validation row (full rate): what calibration and early stopping see."""
    parts: dict[str, list] = {"X": [], "y": [], "degrading": []}
    for run in runs:
        lab = run.labels[kind]
        keep = ~lab["excluded"]
        parts["X"].append(run.X[kind][keep])
        parts["y"].append((lab["ttf"] <= HORIZON_S)[keep].astype(np.float32))
        parts["degrading"].append(lab["degrading"][keep].astype(np.float32))
    F = len(FEATURE_NAMES[kind])
    out = {"X": np.concatenate(parts["X"]) if runs else np.zeros((0, F), np.float32)}
    for k in ("y", "degrading"):
        out[k] = np.concatenate(parts[k]) if runs else np.zeros(0, np.float32)
    out["w"] = np.ones_like(out["y"])
    return out


def _val_load_rows(runs: list[ScenarioRun], h: int):
    Xs, ys = [], []
    for run in runs:
        ok = load_scored_rows(run, h)
        ok[::3] = False  # a lighter validation set: two samples in three
        y = load_targets(run, h)
        Xs.append(run.X["load"][ok])
        ys.append((y[ok] / run.load_m1[ok] - 1.0).astype(np.float32))
    return np.concatenate(Xs), np.concatenate(ys)


# ---- evaluation --------------------------------------------------------------------------------

def evaluate(runs: list[ScenarioRun], predictor: Predictor, with_inference: bool = True) -> dict:
    """The metrics of docs/interface.md section 7 (and more) on scored runs."""
    from cmcs.metrics import BASELINE_MARGINS, FA_BUDGET_PER_100_UNIT_DAYS, choose_threshold, non_predictable, summary

    model_score = lambda r, k: r.scores[k]  # noqa: E731
    base_score = lambda r, k: r.baseline[k]  # noqa: E731
    thr = predictor.thresholds
    val_margins = predictor.baseline_margins or {k: 1.0 for k in COMPONENT_KINDS}
    nominal = {k: 1.0 for k in COMPONENT_KINDS}
    # the baseline's best shot: its margin scanned on these very scenarios to meet the budget (the
    # model's thresholds come from validation data; this favours the baseline)
    best = {k: choose_threshold(runs, k, base_score, candidates=BASELINE_MARGINS, safety=1.0) for k in COMPONENT_KINDS}
    risk = {
        "model": summary(runs, COMPONENT_KINDS, model_score, thr),
        "baseline": summary(runs, COMPONENT_KINDS, base_score, best),
        "baseline_val_margin": summary(runs, COMPONENT_KINDS, base_score, val_margins),
        "baseline_nominal": summary(runs, COMPONENT_KINDS, base_score, nominal),
        "by_fault": {},
        "thresholds": {k: float(v) for k, v in thr.items()},
        "baseline_margins": {k: float(v) for k, v in best.items()},
        "baseline_margins_from_validation": {k: float(v) for k, v in val_margins.items()},
        "budget_false_alarms_per_100_unit_days": FA_BUDGET_PER_100_UNIT_DAYS,
        "horizon_s": HORIZON_S,
        "non_predictable_failures": non_predictable(runs, model_score, thr),
    }
    for fault, comp in FAILURE_KINDS.items():
        risk["by_fault"][fault] = {
            "model": summary(runs, [comp], model_score, thr, fault),
            "baseline": summary(runs, [comp], base_score, best, fault),
            "baseline_val_margin": summary(runs, [comp], base_score, val_margins, fault),
            "baseline_nominal": summary(runs, [comp], base_score, nominal, fault),
        }
    out = {"risk": risk, "load": load_metrics(runs)}
    if with_inference:
        out.update(inference_timing(predictor, runs))
    return out


def load_metrics(runs: list[ScenarioRun]) -> dict:
    """MAPE (%) and MAE (kW) per horizon for the model, persistence and seasonal-naive, on the same rows.

    `mape_persistence` is the textbook persistence: the last observed sample (10 s before t);
    `mape_persistence_minute_mean` the last minute's mean (the same quantity as the target, a
    stronger baseline); the gain is given against each. Headline figures are on normal-operation
    rows (see dataset.load_scored_rows); *_all_rows include load interruptions."""
    from cmcs.metrics import mae, mape_pct

    out = {}
    for h in LOAD_HORIZONS_S:
        m = {}
        for suffix, normal in (("", True), ("_all_rows", False)):
            P, T, PL, PM, SN = [], [], [], [], []
            for run in runs:
                ok = load_scored_rows(run, h, normal_only=normal)
                y = load_targets(run, h)
                T.append(y[ok])
                P.append(run.forecast[h][ok])
                PL.append(run.load_last[ok])
                PM.append(run.load_m1[ok])
                SN.append(seasonal_naive(run, h)[ok])
            if not sum(len(t) for t in T):
                continue
            y, p, pl, pm, sn = (np.concatenate(a).astype(float) for a in (T, P, PL, PM, SN))
            mape_last, mape_min, mape_model = mape_pct(pl, y), mape_pct(pm, y), mape_pct(p, y)
            m.update({
                f"mape{suffix}": round(mape_model, 3), f"mae_kw{suffix}": round(mae(p, y), 4),
                f"mape_persistence{suffix}": round(mape_last, 3),
                f"mae_persistence_kw{suffix}": round(mae(pl, y), 4),
                f"mape_persistence_minute_mean{suffix}": round(mape_min, 3),
                f"mae_persistence_minute_mean_kw{suffix}": round(mae(pm, y), 4),
                f"mape_seasonal_naive{suffix}": round(mape_pct(sn, y), 3),
                f"mae_seasonal_naive_kw{suffix}": round(mae(sn, y), 4), f"rows{suffix}": int(len(y)),
                f"improvement_vs_persistence_pct{suffix}": round(100.0 * (1.0 - mape_model / mape_last), 1),
                f"improvement_vs_persistence_minute_mean_pct{suffix}": round(100.0 * (1.0 - mape_model / mape_min), 1),
            })
        if "mape" not in m:  # nothing to judge (scenarios shorter than one season): keys stay, values None
            m = {k: None for k in ("mape", "mae_kw", "mape_persistence", "mae_persistence_kw",
                                   "mape_persistence_minute_mean", "mape_seasonal_naive", "mape_all_rows",
                                   "mape_persistence_all_rows", "improvement_vs_persistence_pct",
                                   "improvement_vs_persistence_minute_mean_pct")}
        m["persistence"] = "last sample (10 s before t)"
        m["persistence_minute_mean"] = "mean of the last minute's samples"
        out[HORIZON_KEYS[h]] = m
    return out


def inference_timing(predictor: Predictor, runs: list[ScenarioRun] | None = None, units: int = 1000,
                     repeats: int = 30) -> dict:
    """Median time of one batch inference of every model (risk of all four kinds, load at all three
    horizons) for a 1,000-unit site (20 aisles x 50 units: 1,000 micro-ATS, 1,000 DES, 40 PDB
    segments, 2 sources), and of one feature update of that site."""
    from siteconfig.demo import generate_site
    from simulator.plant import Plant

    from cmcs.features import FeatureState

    site = generate_site(20, units // 20)
    plant = Plant(site)
    plant.advance_to(10.0)
    snap = plant.snapshot()
    fs = FeatureState(site)
    feats = None
    upd = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        feats = fs.update(10.0 * i, snap)
        upd.append(time.perf_counter() - t0)
    # realistic values: rows of the evaluated runs' last samples, drawn to the 1,000-unit shapes
    if runs:
        rng = np.random.default_rng(0)
        for kind in (*COMPONENT_KINDS, "load"):
            pool = [r.last_features[kind] for r in runs if kind in r.last_features]
            if pool:
                rows = np.concatenate(pool)
                feats[kind] = rows[rng.integers(0, len(rows), size=len(feats[kind]))]
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(feats)
        predictor.forecast(feats)
        ts.append(time.perf_counter() - t0)
    return {"inference_ms_1000_units": round(float(np.median(ts)) * 1000.0, 2),
            "feature_update_ms_1000_units": round(float(np.median(upd[5:])) * 1000.0, 2)}


# ---- the table ---------------------------------------------------------------------------------

def _fmt(x, nd=3, pct=False):
    if x is None:
        return "-"
    return f"{x * 100:.0f}%" if pct else f"{x:.{nd}f}"


def _lead(x):
    return "-" if x is None else f"{x / 60:.1f}"


def print_table(metrics: dict, title: str = "", file=None) -> None:
    file = file or sys.stdout
    risk = metrics["risk"]
    print(f"\nRisk of failure within {risk['horizon_s'] / 60:.0f} min, {title}; budget "
          f"{risk['budget_false_alarms_per_100_unit_days']:g} false alarm per 100 unit-days", file=file)
    head = f"{'fault kind':<20} {'n':>4} | {'PR-AUC':>6} {'strict':>6} {'recall':>6} {'FA/100d':>7} {'lead50':>6} " \
           f"{'lead10':>6} | {'PR-AUC':>6} {'recall':>6} {'FA/100d':>7} {'lead50':>6} {'lead10':>6}"
    print(f"{'':<25} | {'model (thresholds from validation)':^49} | {'threshold baseline, best margin':^40}",
          file=file)
    print(head, file=file)
    print("-" * len(head), file=file)
    rows = [(k, v["model"], v["baseline"]) for k, v in risk["by_fault"].items()]
    rows.append(("all with precursors", risk["model"], risk["baseline"]))
    for name, m, b in rows:
        print(f"{name:<20} {m['failures']:>4} | {_fmt(m['pr_auc']):>6} {_fmt(m['pr_auc_strict']):>6} "
              f"{_fmt(m['recall_at_budget'], pct=True):>6} {_fmt(m['false_alarms_per_100_unit_days'], 2):>7} "
              f"{_lead(m['median_lead_time_s']):>6} {_lead(m['p10_lead_time_s']):>6} | {_fmt(b['pr_auc']):>6} "
              f"{_fmt(b['recall_at_budget'], pct=True):>6} {_fmt(b['false_alarms_per_100_unit_days'], 2):>7} "
              f"{_lead(b['median_lead_time_s']):>6} {_lead(b['p10_lead_time_s']):>6}", file=file)
    nb = risk["baseline_nominal"]
    bv = risk["baseline_val_margin"]
    npf = risk["non_predictable_failures"]
    m = risk["model"]
    if m.get("failures_unobservable"):
        print(f"of the {m['failures']} failures, {m['failures_unobservable']} had a precursor no client could see "
              f"(worn contact set open, unit on its other source); without them the model's recall is "
              f"{_fmt(m['recall_at_budget_observable'], pct=True)} and PR-AUC {_fmt(m['pr_auc_observable'])}, the "
              f"baseline's {_fmt(risk['baseline']['recall_at_budget_observable'], pct=True)}", file=file)
    print(f"(lead times in minutes. Baseline margins scanned on these scenarios to meet the budget; at margins "
          f"from validation it gets recall {_fmt(bv['recall_at_budget'], pct=True)} at "
          f"{_fmt(bv['false_alarms_per_100_unit_days'], 2)} FA/100 unit-days, at its nominal limits "
          f"{_fmt(nb['recall_at_budget'], pct=True)} at {_fmt(nb['false_alarms_per_100_unit_days'], 1)}. "
          f"Failures without precursors: {npf['count']}, alarmed before: {npf['alarmed_within_horizon']})", file=file)
    load = metrics.get("load", {})
    if load:
        print("\nLoad forecast per micro-ATS segment (minute-mean LoadPower at t + h), normal operation "
              "(all rows, incl. load interruptions, in brackets)", file=file)
        print(f"{'horizon':<8} {'MAPE %':>14} {'MAE kW':>7} | {'pers. last':>14} {'gain':>6} | "
              f"{'pers. minute':>14} {'gain':>6} | {'seasonal':>8}", file=file)
        for key, m in load.items():
            if m.get("mape") is None:
                print(f"{key:<8} (no rows: scenarios need more than 1 h of history)", file=file)
                continue
            print(f"{key:<8} {m['mape']:>6.2f} ({m['mape_all_rows']:>5.2f}) {m['mae_kw']:>7.3f} | "
                  f"{m['mape_persistence']:>6.2f} ({m['mape_persistence_all_rows']:>5.2f}) "
                  f"{m['improvement_vs_persistence_pct']:>5.1f}% | "
                  f"{m['mape_persistence_minute_mean']:>6.2f} ({m['mape_persistence_minute_mean_all_rows']:>5.2f}) "
                  f"{m['improvement_vs_persistence_minute_mean_pct']:>5.1f}% | {m['mape_seasonal_naive']:>8.2f}",
                  file=file)
        print("(persistence: 'last' = the last sample, 10 s old; 'minute' = the last minute's mean, the same "
              "quantity as the target; gain = MAPE reduction; seasonal-naive: same minute 1 h earlier)", file=file)
    if "inference_ms_1000_units" in metrics:
        print(f"\ninference, all models, 1,000 units: {metrics['inference_ms_1000_units']:.1f} ms "
              f"(feature update {metrics.get('feature_update_ms_1000_units', float('nan')):.1f} ms)", file=file)
