"""The site's own history: load-forecast rows from a data dir's historian, refinement, judgement.

`cmcs train --history DIR` reads `<DIR>/history.sqlite3` (the gateway's historian,
gateway/historian.py), rebuilds what the live CMCS saw every `SAMPLE_INTERVAL_S` and refines the
bundle's load forecaster on it; the last days of the history are held out and judge the refinement
against the bundle it started from and against persistence.

- **What the live CMCS saw**: at each 10 s sample time, each point's last recorded value at or
  before it (the historian stores every change of a historized variable; a subscription holds the
  last one), with Bad values as missing. The load features read `LoadPower` and `ActiveSource`
  (both historized) and `PreferredSource` (not historized: the site file's, which is what the
  address space starts with). These go through `cmcs.live.client_snapshot`, the live loop's own
  conversion, into `FeatureState.update`: the same features as live, for every unit of the site.
- **Gaps**: a stretch of more than `GAP_S` with no LoadPower recorded for any unit (the gateway
  was down) ends a segment; each segment starts a fresh FeatureState, as a restarted CMCS does.
- **Split**: the last `holdout_days` (default 20 % of the span, at least `MIN_HOLDOUT_DAYS`) are
  held out; training rows end one horizon before them (their targets stay on the training side),
  and the last `VAL_FRACTION` of the training span watches early stopping.
- **Refinement**: boosting continues from the bundle's load boosters (xgboost `xgb_model=`) on the
  site's rows, at a lower learning rate; a horizon whose validation MAE does not improve keeps the
  bundle's booster. The risk models, calibration and thresholds are the bundle's: the historian
  records neither labels (no failure is known) nor the risk models' inputs (contact and internal
  resistances, SoH, THD, self-test times are not historized).
"""

from __future__ import annotations

import math
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cmcs.dataset import ScenarioRun, load_scored_rows, load_targets
from cmcs.features import FEATURE_NAMES, LOAD_HORIZONS_S, SAMPLE_INTERVAL_S, WARMUP_S, FeatureState

GAP_S = 120.0  # no LoadPower recorded for any unit for this long: the gateway was down
MIN_TRAIN_DAYS = 1.0  # history before the held-out days
MIN_HOLDOUT_DAYS = 0.25
DEFAULT_HOLDOUT_FRACTION = 0.2
VAL_FRACTION = 0.2  # of the training span, its end: early stopping
MAX_FEATURE_BYTES = 1.5e9  # load-feature rows kept in memory: on a large site or a long history only one
# sample in k is kept (k recorded as feature_stride_samples; 6 days of the demo hall: 0.22 GB, k = 1)
HISTORY_STRIDE = 1  # training keeps every sample of each unit (a site's days are few; one in 3 gave 80 % of
# the 5-min gain on the west-hall history in a quarter of the time: docs/models.md)
REFINE_ETA = 0.05
REFINE_ROUNDS = 300
REFINE_PATIENCE = 30
HORIZON_KEYS = {60: "1min", 300: "5min", 900: "15min"}


class HistoryError(Exception):
    """A history that cannot be used: missing, unreadable, too short, or of another layout."""


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_file(data_dir: Path) -> Path:
    """The historian's file in a data dir (gateway/historian.py: history.sqlite3, or an earlier version's
    history.db, which the gateway renames at its next start)."""
    from gateway.historian import DB_FILE_NAME, OLD_DB_FILE_NAME

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise HistoryError(f"--history {data_dir}: no such directory")
    for name in (DB_FILE_NAME, OLD_DB_FILE_NAME):
        if (data_dir / name).is_file():
            return data_dir / name
    raise HistoryError(f"--history {data_dir}: no history there ({DB_FILE_NAME} not found; the gateway writes "
                       "it in its --data-dir)")


class HistoryReader:
    """The historian's file read-only (gateway.historian.HistoryFile), its failures as HistoryError."""

    def __init__(self, path: Path):
        from gateway.historian import HistoryFile

        self.path = Path(path)
        try:
            self.file = HistoryFile(self.path)
        except sqlite3.Error as exc:
            raise HistoryError(f"{self.path}: not a readable history ({exc})") from None
        self.sites, self.devices = self.file.sites, self.file.devices

    def close(self) -> None:
        self.file.close()

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(timestamps s since 1970, values; NaN where Bad or null) of one node, in time order."""
        ts, vals = self.file.numeric_series(key)
        return np.asarray(ts, dtype=float), np.asarray(vals, dtype=float)


def _hold(ts: np.ndarray, vals: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The last value at or before each grid time (NaN before the first)."""
    idx = np.searchsorted(ts, grid, side="right") - 1
    out = np.where(idx >= 0, vals[np.maximum(idx, 0)], np.nan)
    return out


@dataclass
class SiteHistory:
    """A site's load history rebuilt as the live CMCS saw it: one ScenarioRun-shaped run per segment."""

    path: Path
    site_name: str
    runs: list[ScenarioRun]
    epochs: list[np.ndarray]  # per run: the epoch second of each row
    start_s: float
    end_s: float
    units: int
    extra_units: list[str] = field(default_factory=list)  # recorded, not in the site file
    x_index: list[np.ndarray] = field(default_factory=list)  # per run: the rows whose features are kept
    read_s: float = 0.0
    split: "Split | None" = None
    feature_stride: int = 1  # features kept for one sample in this many (MAX_FEATURE_BYTES)

    @property
    def days(self) -> float:
        return (self.end_s - self.start_s) / 86400.0


def read_site_history(data_dir: Path, site, holdout_days: float | None = None, progress: bool = False,
                      split: bool = True) -> SiteHistory:
    """The site's history from a data dir, split (`split_history`, unless `split` is False) before its
    features are computed; HistoryError (one line) if there is none usable for `site`."""
    t0 = time.perf_counter()
    path = history_file(data_dir)
    reader = HistoryReader(path)
    try:
        return _read(reader, path, site, holdout_days if split else False, progress, t0)
    finally:
        reader.close()


def _read(reader: HistoryReader, path: Path, site, holdout_days, progress: bool, t0: float) -> SiteHistory:
    from cmcs.live import client_snapshot
    from siteconfig.points import POINTS

    units = [u.name for u in site.units]
    recorded = reader.devices(site.name, "LoadPower")
    if not recorded:
        others = ", ".join(f"{n} ({c} variables)" for n, c in sorted(reader.sites().items())) or "none"
        raise HistoryError(f"{path}: no LoadPower recorded for site {site.name!r} (its history holds sites: "
                           f"{others}); is it this site's data dir?")
    missing = [u for u in units if u not in set(recorded)]
    if missing:
        raise HistoryError(f"{path}: recorded for another layout: {len(missing)} of this site's {len(units)} units "
                           f"have no LoadPower history (first: {missing[0]}); the history has {len(recorded)} units")
    extra = [u for u in recorded if u not in set(units)]
    from gateway.historian import point_key

    power = [reader.series(point_key(site.name, u, "LoadPower")) for u in units]
    active = [reader.series(point_key(site.name, u, "ActiveSource")) for u in units]
    firsts = [ts[0] for ts, _ in power if len(ts)]
    lasts = [ts[-1] for ts, _ in power if len(ts)]
    if not firsts:
        raise HistoryError(f"{path}: the site's LoadPower variables hold no values")
    dt = SAMPLE_INTERVAL_S
    start, end = min(firsts), max(lasts)
    split = (None if holdout_days is False else
             split_history(SiteHistory(path, site.name, [], [], float(start), float(end), len(units)), holdout_days))
    grid = np.arange(math.ceil(start / dt) * dt, end + 1e-6, dt)
    if len(grid) < 2:
        raise HistoryError(f"{path}: {len(grid)} sample(s) of history; --history needs days")
    lp = np.column_stack([_hold(ts, v, grid) for ts, v in power])
    act = np.column_stack([_hold(ts, v, grid) for ts, v in active])
    # when was anything last recorded: gaps (the gateway down) split the history into segments
    all_ts = np.unique(np.concatenate([ts for ts, _ in power]))
    prev = np.maximum(np.searchsorted(all_ts, grid, side="right") - 1, 0)
    gap_after = np.diff(all_ts, append=all_ts[-1])[prev]  # from the last record to the next one
    alive = (all_ts[prev] == grid) | (gap_after <= GAP_S)
    lp[~alive] = np.nan
    act[~alive] = np.nan
    preferred = np.array([float(int(u.preferred_source)) for u in site.units])
    raw = {k: {p.name: np.full(len(site.units) if k in ("ats", "des") else (len(site.pdbs) if k == "pdb"
                                                                           else len(site.sources)), np.nan)
               for p in POINTS[k]} for k in POINTS}
    raw["ats"]["PreferredSource"] = preferred
    runs, epochs, x_index = [], [], []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], alive.astype(np.int8), [0]])))
    segments = list(zip(edges[::2], edges[1::2]))
    row_bytes = len(units) * len(FEATURE_NAMES["load"]) * 4
    x_stride = max(1, math.ceil(int(alive.sum()) * row_bytes / MAX_FEATURE_BYTES))
    from tqdm import tqdm

    bar = tqdm(total=int(sum(b - a for a, b in segments)), desc="history", unit="sample", disable=not progress,
               file=sys.stderr, miniters=2000)
    for a, b in segments:
        if b - a < 2:
            continue
        fs = FeatureState(site, dt)
        T = b - a
        kept = np.arange(0, T, x_stride)
        X = np.empty((len(kept), fs.n, len(FEATURE_NAMES["load"])), dtype=np.float32)
        m1 = np.empty((T, fs.n), dtype=np.float32)
        times = (grid[a:b] - grid[a]) + dt  # as a replay's: the first sample at one interval
        with np.errstate(all="ignore"):
            for j in range(T):
                raw["ats"]["LoadPower"] = lp[a + j]
                raw["ats"]["ActiveSource"] = act[a + j]
                feats = fs.update(float(times[j]), client_snapshot(raw))
                if j % x_stride == 0:
                    X[j // x_stride] = feats["load"]
                m1[j] = fs.load_level_kw
                if j % 2000 == 0:
                    bar.update(min(2000, T - j))
        names = fs.device_names
        runs.append(ScenarioRun(f"history-{site.name}-{len(runs)}", 0, site.name, times, names, {"load": X}, {}, {}, [],
                                lp[a:b].astype(np.float32), m1))
        epochs.append(grid[a:b])
        x_index.append(kept)
    bar.close()
    return SiteHistory(path, site.name, runs, epochs, float(start), float(end), len(units), extra, x_index,
                       read_s=time.perf_counter() - t0, split=split, feature_stride=x_stride)


# ---- split ------------------------------------------------------------------------------------------

@dataclass
class Split:
    holdout_days: float
    holdout_start_s: float  # epoch
    val_start_s: float
    train_end_s: float  # training and validation rows' targets end before the held-out days


def split_history(hist: SiteHistory, holdout_days: float | None = None) -> Split:
    """The held-out days and the training span before them; HistoryError if either is too short."""
    span = hist.days
    hd = max(DEFAULT_HOLDOUT_FRACTION * span, MIN_HOLDOUT_DAYS) if holdout_days is None else float(holdout_days)
    where = f"{hist.path} ({_iso(hist.start_s)} .. {_iso(hist.end_s)})"
    if not hd >= MIN_HOLDOUT_DAYS:
        raise HistoryError(f"--holdout-days {hd:g}: at least {MIN_HOLDOUT_DAYS:g} days must be held out to judge "
                           "the refinement")
    if span - hd < MIN_TRAIN_DAYS:
        raise HistoryError(f"{where}: {span:.2f} days of history, too few: --history needs at least "
                           f"{MIN_TRAIN_DAYS:g} day to train on before the {hd:.2f} held-out days "
                           f"(at least {MIN_TRAIN_DAYS + hd:.2f} days)")
    hold = hist.end_s - hd * 86400.0
    train_end = hold - max(LOAD_HORIZONS_S)
    val_start = hist.start_s + (1.0 - VAL_FRACTION) * (train_end - hist.start_s)
    return Split(hd, hold, val_start, train_end)


def _rows(hist: SiteHistory, lo: float, hi: float, stride: int, h: int | None = None):
    """Training-style rows (X, {h: ratio target}) of rows with epoch time in [lo, hi): strided, after the
    warm-up, every target defined (load_training_rows' rule)."""
    Xs, ys = [], {k: [] for k in LOAD_HORIZONS_S}
    step = max(1, round(stride / hist.feature_stride))  # in rows whose features are kept
    for run, ep, xi in zip(hist.runs, hist.epochs, hist.x_index):
        t, e, m1 = run.times[xi], ep[xi], run.load_m1[xi]
        keep = ((np.arange(len(xi)) % step == 0) & (t >= WARMUP_S) & (e >= lo) & (e + max(LOAD_HORIZONS_S) < hi))
        keep = np.broadcast_to(keep[:, None], m1.shape).copy()
        targets = {k: load_targets(run, k)[xi] for k in LOAD_HORIZONS_S}
        for k in LOAD_HORIZONS_S:
            keep &= np.isfinite(targets[k]) & (targets[k] > 0.5) & (m1 > 0.5)
        Xs.append(run.X["load"][keep])
        for k in LOAD_HORIZONS_S:
            ys[k].append((targets[k][keep] / m1[keep] - 1.0).astype(np.float32))
    F = len(FEATURE_NAMES["load"])
    X = np.concatenate(Xs) if Xs else np.zeros((0, F), np.float32)
    return X, {k: (np.concatenate(v) if v else np.zeros(0, np.float32)) for k, v in ys.items()}


# ---- refinement -------------------------------------------------------------------------------------

def refine_load(base, hist: SiteHistory, split: Split, stride: int | None = None, nthread: int = 1,
                rounds: int = REFINE_ROUNDS, eta: float = REFINE_ETA, method: str = "continue") -> tuple[dict, dict]:
    """New load boosters {h: Booster} refined on the history's training span, and what was done.

    method "continue": boosting continues from `base`'s boosters (xgb_model=) at learning rate `eta`;
    "scratch": new boosters from the site's rows alone (for comparison). A horizon whose validation MAE
    (the last VAL_FRACTION of the training span) is not better than the base's keeps the base booster."""
    import xgboost as xgb

    from cmcs import models

    stride = HISTORY_STRIDE if stride is None else stride
    Xt, yt = _rows(hist, -math.inf, split.val_start_s, stride)
    Xv, yv = _rows(hist, split.val_start_s, split.train_end_s, 1)
    if len(Xt) == 0 or len(Xv) == 0:
        raise HistoryError(f"{hist.path}: no usable load rows before the held-out days (units dark or no values?)")
    boosters, info = {}, {"method": method, "train_rows": int(len(Xt)), "val_rows": int(len(Xv)), "horizons": {}}
    for h in LOAD_HORIZONS_S:
        y, y_val = np.clip(yt[h], -0.6, 0.6), np.clip(yv[h], -0.6, 0.6)
        dtrain = xgb.DMatrix(Xt, label=y, missing=np.nan)
        dval = xgb.DMatrix(Xv, label=y_val, missing=np.nan)
        b0 = base.load_boosters[h]
        base_mae = float(np.mean(np.abs(b0.inplace_predict(Xv, missing=np.nan) - y_val)))
        params = dict(models.LOAD_PARAMS, nthread=nthread, seed=0)
        if method == "continue":
            params["eta"] = eta
            start = b0.copy()
            start.set_param({"nthread": nthread})
            n0 = int(b0.num_boosted_rounds())
            b = xgb.train(params, dtrain, num_boost_round=rounds, evals=[(dval, "val")], verbose_eval=False,
                          early_stopping_rounds=REFINE_PATIENCE, xgb_model=start)
        elif method == "scratch":
            n0 = 0
            b = xgb.train(params, dtrain, num_boost_round=rounds, evals=[(dval, "val")], verbose_eval=False,
                          early_stopping_rounds=REFINE_PATIENCE)
        else:
            raise ValueError(f"unknown refinement method {method!r}")
        b = b[: b.best_iteration + 1]
        mae = float(np.mean(np.abs(b.inplace_predict(Xv, missing=np.nan) - y_val)))
        kept = mae < base_mae
        boosters[h] = b if kept else b0
        info["horizons"][HORIZON_KEYS[h]] = {
            "base_trees": int(b0.num_boosted_rounds()), "trees": int(boosters[h].num_boosted_rounds()),
            "added_trees": int(b.num_boosted_rounds()) - n0 if kept else 0,
            "val_mae_ratio_base": round(base_mae, 6), "val_mae_ratio_refined": round(mae, 6),
            "refined": bool(kept)}
    return boosters, info


def refined_predictor(base, boosters: dict, meta_history: dict):
    """A Predictor with `base`'s risk models, calibration and thresholds and the refined load boosters."""
    from cmcs.models import Predictor

    meta = dict(base.meta)
    meta.pop("files", None)
    end = meta_history.get("to", "")[:10].replace("-", "")
    meta["version"] = f"{base.version}.hist-{end}"
    meta["history"] = meta_history
    return Predictor(meta, base.risk_boosters, boosters)


# ---- judgement ------------------------------------------------------------------------------------

def evaluate_holdout(hist: SiteHistory, split: Split, predictors: dict) -> dict:
    """Load MAPE (%) and MAE (kW) per horizon on the held-out days: each predictor, persistence (last
    sample and last minute's mean), on the same rows (normal operation, dataset.load_scored_rows)."""
    from cmcs.metrics import mae, mape_pct

    out = {}
    parts = []  # (run, rows mask over time, forecasts per predictor)
    for run, ep, xi in zip(hist.runs, hist.epochs, hist.x_index):
        sel = ep[xi] >= split.holdout_start_s
        if not sel.any():
            continue
        rows = xi[sel]  # held-out samples whose features are kept
        X = run.X["load"][sel]
        fc = {name: p.forecast({"load": X, "load_level_kw": run.load_m1[rows]}) for name, p in predictors.items()}
        parts.append((run, rows, fc))
    for h in LOAD_HORIZONS_S:
        T, P, PL, PM = [], {n: [] for n in predictors}, [], []
        for run, rows, fc in parts:
            ok = load_scored_rows(run, h)[rows]
            y = load_targets(run, h)[rows]
            T.append(y[ok])
            PL.append(run.load_last[rows][ok])
            PM.append(run.load_m1[rows][ok])
            for n in predictors:
                P[n].append(fc[n][h][ok])
        y = np.concatenate(T).astype(float) if T else np.zeros(0)
        m = {"rows": int(len(y))}
        if len(y):
            pl, pm = np.concatenate(PL).astype(float), np.concatenate(PM).astype(float)
            m.update({"mape_persistence": round(mape_pct(pl, y), 3), "mae_persistence_kw": round(mae(pl, y), 4),
                      "mape_persistence_minute_mean": round(mape_pct(pm, y), 3)})
            for n in predictors:
                p = np.concatenate(P[n]).astype(float)
                m[f"mape_{n}"] = round(mape_pct(p, y), 3)
                m[f"mae_{n}_kw"] = round(mae(p, y), 4)
        out[HORIZON_KEYS[h]] = m
    return out


def contract_load(ev: dict, name: str = "refined") -> dict:
    """The held-out figures of one predictor in the shape of `cmcs train --json`'s "load" (interface.md
    section 7: {"mape", "mape_persistence", "mae_kw"} per horizon)."""
    return {k: {"mape": m.get(f"mape_{name}"), "mape_persistence": m.get("mape_persistence"),
                "mae_kw": m.get(f"mae_{name}_kw"), "rows": m["rows"]} for k, m in ev.items()}


def print_history_table(ev: dict, names: dict, title: str, file=None) -> None:
    """MAPE per horizon: each predictor against persistence, on the held-out days."""
    file = file or sys.stdout
    cols = list(names)
    print(f"\nLoad forecast on the held-out days of the site's history, {title}", file=file)
    head = f"{'horizon':<8} {'rows':>8} | " + " ".join(f"{names[c]:>16}" for c in cols) + \
        f" | {'pers. last':>10} {'pers. minute':>12}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for key, m in ev.items():
        if not m.get("rows"):
            print(f"{key:<8} {0:>8} | (no rows)", file=file)
            continue
        print(f"{key:<8} {m['rows']:>8} | " + " ".join(f"{m[f'mape_{c}']:>15.3f}%" for c in cols) +
              f" | {m['mape_persistence']:>9.3f}% {m['mape_persistence_minute_mean']:>11.3f}%", file=file)
    print("(MAPE %, normal operation rows; persistence 'last' = the last sample, 'minute' = the last minute's "
          "mean)", file=file)
