"""Features for the CMCS models, computed from what an OPC UA client sees.

One streaming pipeline serves training, the mission benchmark and the live loop: a
`FeatureState(site)` is fed a snapshot of every device point every `SAMPLE_INTERVAL_S`
(snapshot-shaped dicts `{kind: {point: array over devices}}`, device order as in
`FeatureState.device_names`) and returns one feature matrix per component kind. It keeps
only the past: exponential filters, running minima/maxima and a ring of the last two hours
of minute-mean load. Everything is vectorised over devices (a 1,000-unit update is a few ms).

Features are scale-free where they can be (ratios to the device's own lowest/early reading,
to its peers on the same aisle, to its twin feed segment), so that a model trained on some
sites, loads and seeds carries over to others.

Thermal time constants used to compare a temperature with the heat that should cause it are
assumptions about the hardware, not read from the simulator: 15 min for a bolted busbar joint,
10 min for a contactor's contact set (typical orders of magnitude).
"""

from __future__ import annotations

import math

import numpy as np

# plausible_load_current is input validation the baselines share; it lives there (no import cycle)
from cmcs.baselines import DcimBaseline, plausible_load_current

FEATURE_VERSION = 3
SAMPLE_INTERVAL_S = 10.0  # the gateway's subscription/sampling interval the models are built for
WARMUP_S = 1800.0  # rows earlier than this are not scored: filters and baselines are still settling
BASELINE_START_S = 1200.0  # running minima/maxima ("own baseline") start once filters and start-up transients settle
SEASON_S = 3600.0  # the load's recurring pattern (hourly batch jobs) is read from the last 1 h and 2 h
LOAD_HORIZONS_S = (60, 300, 900)

JOINT_TAU_S = 900.0  # assumed thermal time constant of a busbar joint
CONTACT_TAU_S = 600.0  # assumed thermal time constant of a contact set
MIN_CURRENT_FRACTION = 0.2  # rise-per-I^2 ratios need at least this share of rated current
ITIC_STEADY_LOW_PU = 0.90  # a supply dip: below the ITIC steady-state band (>= 90 %)
RISE_AGE_CAP_S = 3 * 3600.0  # "how long has this indicator been above its own baseline", capped

KINDS = ("source", "pdb", "ats", "des")

FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "source": (
        "bbr_base", "bbr_trend", "bbr_trend_slow", "bbt_rise", "bbt_trend", "bbv_drop", "backup_not_ready",
        "has_backup", "loading", "available", "bbr_rise_age_h",
    ),
    "pdb": (
        "k_max", "k_asym", "k_base", "k_trend_fast", "k_trend", "k_trend_slow", "k_twin", "k_peer",
        "excess_rise_peer", "excess_rise_base", "thd_peer", "thd_trend",
        "loading", "loading_peer", "current_trend", "imbalance", "energized", "k_rise_age_h",
        "t_slope_asym", "t_slope_peer", "t_slope_rel",
    ),
    "ats": (
        "cr_base", "cr_base_max", "cr_trend", "cr_trend_slow", "cr_peer", "ct_k_peer", "ct_k_base", "act_base",
        "act_peer", "act_step", "act_step2", "ltt_peer", "loading", "on_alternate", "bridging", "offline",
        "cr_rise_age_h", "act_rise_age_h", "act_age_h",
    ),
    "des": (
        "ir_base", "ir_peer", "ir_trend", "ir_trend_slow", "soh_drop", "soh_peer", "soh_trend", "mdp_ratio",
        "soc", "charging", "bridging", "power_ratio", "ir_rise_age_h",
    ),
    "load": (
        "last_rel", "m1_rel_ema5", "m1_rel_ema15", "m1_rel_ema60", "m1_delta_1min", "m1_delta_5min",
        "m1_delta_15min", "cv_1min", "aisle_rel_ema5", "aisle_delta_1min", "aisle_delta_5min",
        "aisle_rel_min1h", "aisle_rel_max1h", "aisle_up_age_h", "aisle_down_age_h",
        "seas1h_60", "seas1h_300", "seas1h_900",
        "aisle_seas1h_60", "aisle_seas_max_60", "aisle_seas_min_60",
        "aisle_seas1h_300", "aisle_seas_max_300", "aisle_seas_min_300",
        "aisle_seas1h_900", "aisle_seas_max_900", "aisle_seas_min_900",
        "seas1h_level", "on_alternate", "share_rel_ema60", "share_rel_ema180", "share_delta_5min",
        "aisle_next_start_h",
        "aisle_last_rel", "aisle_last_delta_30s", "job_on", "job_age_h", "job_mag", "aisle_rel_base",
        "job_rate", "base_trend_1h", "job_due_60", "job_due_300", "job_due_900",
    ),
}

NAN = np.nan


def _ratio(a, b):
    """a / b where b is a positive finite number, else NaN."""
    b = np.asarray(b, dtype=float)
    ok = np.isfinite(b) & (b > 0)
    return np.where(ok, np.asarray(a, dtype=float) / np.where(ok, b, 1.0), NAN)


def _logratio(a, b):
    r = _ratio(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), NAN)


def _stack32(cols: list) -> np.ndarray:
    """np.column_stack(cols).astype(np.float32) for 1-d columns of one length, without the
    intermediate float64 matrix: each column is cast to float32 once (the same rounding)."""
    out = np.empty((len(cols[0]), len(cols)), dtype=np.float32)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


def _median_finite(x: np.ndarray):
    """np.nanmedian(np.where(np.isfinite(x), x, NaN)), NaN if there is no finite value, at less cost.

    nanmedian drops the NaN and calls np.median, which takes the middle value, or the mean of the two
    middle values ((lo + hi) / 2, as np.mean of two does); sorting finds the same ones."""
    v = np.sort(x[np.isfinite(x)])
    m = v.size
    if m == 0:
        return NAN
    if m % 2:
        return v[m // 2]
    return (v[m // 2 - 1] + v[m // 2]) / 2


def _median3(x: np.ndarray) -> np.ndarray:
    """Median of three columns (NaN if any is missing): sum - max - min, without nanmedian's cost."""
    return x.sum(axis=1) - x.max(axis=1) - x.min(axis=1)


class _GroupMedian:
    """Median of x over each member's group (the member included): robust to a few degraded peers."""

    def __init__(self, group: np.ndarray, n_groups: int):
        group = np.asarray(group, dtype=np.int64)
        size = np.bincount(group, minlength=n_groups)
        self.index = np.full((n_groups, max(int(size.max(initial=0)), 1)), -1, dtype=np.int64)
        fill = np.zeros(n_groups, dtype=np.int64)
        for i, g in enumerate(group):
            self.index[g, fill[g]] = i
            fill[g] += 1
        self.group = group
        # index arrays of __call__, built once (it runs dozens of times per sample on small arrays)
        self.pad = self.index < 0  # slots beyond a group's size
        self.any_pad = bool(self.pad.any())
        self.safe_index = np.maximum(self.index, 0)
        self.rows = np.arange(n_groups)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        v = np.asarray(x, float)[self.safe_index]
        if self.any_pad:
            v[self.pad] = NAN
        v.sort(axis=1)  # NaN sort last
        cnt = np.isfinite(v).sum(axis=1)
        lo = v[self.rows, np.maximum((cnt - 1) // 2, 0)]
        hi = v[self.rows, np.maximum(cnt // 2, 0)]
        med = np.where(cnt > 0, 0.5 * (lo + hi), NAN)
        return med[self.group]


class _Ema:
    """Exponential filters of one quantity at several time constants; NaN inputs leave them unchanged."""

    def __init__(self, shape: tuple[int, ...], taus_s: tuple[float, ...]):
        self.taus = np.asarray(taus_s, dtype=float)
        self.v = np.full(tuple(shape) + (len(taus_s),), NAN)
        self._dt = None  # the gains of the last dt (samples come at a fixed interval)
        self._a = None

    def update(self, x: np.ndarray, dt_s: float) -> np.ndarray:
        if dt_s != self._dt:
            self._a = 1.0 - np.exp(-dt_s / self.taus)
            self._dt = dt_s
        x = np.asarray(x, dtype=float)[..., None]
        v = self.v
        new = v + self._a * (x - v)
        # unset filters take the input, NaN inputs leave the filters as they are (the np.wheres are
        # skipped when they would change nothing)
        v_nan = np.isnan(v)
        if v_nan.any():
            new = np.where(v_nan, x, new)
        x_nan = np.isnan(x)
        if x_nan.any():
            new = np.where(x_nan, v, new)
        self.v = new
        return new

    def __getitem__(self, k: int) -> np.ndarray:
        return self.v[..., k]


class _RunningExtreme:
    """Running minimum (or maximum) of a quantity from `start_s` on: the device's own baseline."""

    def __init__(self, shape, kind: str = "min", start_s: float = BASELINE_START_S):
        self.v = np.full(shape, NAN)
        self.f = np.fmin if kind == "min" else np.fmax
        self.start_s = start_s

    def update(self, x: np.ndarray, t_s: float) -> np.ndarray:
        if t_s >= self.start_s:
            self.v = self.f(self.v, x)  # fmin/fmax ignore NaN on either side
        return self.v


class _Ring:
    """The last `length` samples of a vector, addressed by sample number (a missed sample is a gap)."""

    def __init__(self, length: int, width: int):
        self.v = np.full((length, width), NAN)
        self.k = np.full(length, -1, dtype=np.int64)
        self._offsets: dict[int, np.ndarray] = {}  # steps -> arange(1 - steps, 1), for window

    def put(self, k: int, x: np.ndarray) -> None:
        j = k % len(self.k)
        self.v[j] = x
        self.k[j] = k

    def get(self, k: int) -> np.ndarray:
        j = k % len(self.k)
        if k < 0 or self.k[j] != k:
            return np.full(self.v.shape[1], NAN)
        return self.v[j]

    def window(self, k: int, steps: int) -> np.ndarray:
        """Samples k - steps + 1 .. k (rows of missing samples are NaN)."""
        offsets = self._offsets.get(steps)
        if offsets is None:
            offsets = self._offsets[steps] = np.arange(1 - steps, 1)
        idx = offsets + k
        j = idx % len(self.k)
        ok = (self.k[j] == idx) & (idx >= 0)
        return np.where(ok[:, None], self.v[j], NAN)


def _nanmax1(x: np.ndarray) -> np.ndarray:
    """Maximum over axis 1 ignoring NaN; NaN where a row has no value (no warning)."""
    return np.fmax.reduce(x, axis=1)


def _nanmin0(x: np.ndarray) -> np.ndarray:
    """Minimum over axis 0 ignoring NaN; NaN where a column has no value (no warning)."""
    out = np.fmin.reduce(x, axis=0)
    return out


def _nanmax0(x: np.ndarray) -> np.ndarray:
    return np.fmax.reduce(x, axis=0)


class _DecayingCount:
    """Events counted with a 1 h exponential memory (an 'events in the last hour')."""

    def __init__(self, shape, tau_s: float = 3600.0):
        self.v = np.zeros(shape)
        self.tau = tau_s

    def update(self, events: np.ndarray, dt_s: float) -> np.ndarray:
        self.v = self.v * math.exp(-dt_s / self.tau) + events
        return self.v


class _RiseAge:
    """Time since an indicator (a ratio to the device's own baseline) was last at or below a level:
    how long a degradation has been under way. A missing reading (NaN) neither resets nor starts it."""

    def __init__(self, shape, level: float):
        self.last_low = np.full(shape, NAN)
        self.level = level

    def update(self, x: np.ndarray, t_s: float) -> np.ndarray:
        x = np.asarray(x, float)
        self.last_low = np.where(np.isfinite(x) & (x <= self.level), t_s, self.last_low)
        return np.minimum(t_s - self.last_low, RISE_AGE_CAP_S) / 3600.0


class FeatureState:
    """Streaming features of one site; `update(t_s, snapshot)` once per sample, using past data only.

    Device order (rows of each matrix) is that of `device_names[kind]`: sources by selection
    (A, B), PDB segments and micro-ATS units in site order; DES rows are indexed by micro-ATS
    unit (a unit without storage has a row of NaN, `has_des` is False)."""

    def __init__(self, site, sample_interval_s: float = SAMPLE_INTERVAL_S):
        self.site = site
        self.dt_nominal = float(sample_interval_s)
        units = site.units
        self.n = n = len(units)
        aisle_of = {a.name: i for i, a in enumerate(site.aisles)}
        self.n_aisles = len(site.aisles)
        self.unit_aisle = np.array([aisle_of[u.aisle] for u in units], dtype=np.int64)
        pdbs = site.pdbs
        self.np_ = len(pdbs)
        self.pdb_aisle = np.array([aisle_of[p.aisle] for p in pdbs], dtype=np.int64)
        self.pdb_feed = np.array([int(p.feed) for p in pdbs], dtype=np.int64)
        lookup = {(int(a), int(f)): i for i, (a, f) in enumerate(zip(self.pdb_aisle, self.pdb_feed))}
        self.pdb_twin = np.array([lookup.get((int(a), 3 - int(f)), i)
                                  for i, (a, f) in enumerate(zip(self.pdb_aisle, self.pdb_feed))], dtype=np.int64)
        self.pdb_per_aisle = np.maximum(np.bincount(self.pdb_aisle, minlength=self.n_aisles), 1)
        sources = sorted(site.sources, key=lambda s: int(s.selection))
        self.ns = len(sources)
        self.has_des = np.array([u.storage is not None for u in units])
        self.unit_rated_a = np.array([u.rated_current_a for u in units], dtype=float)
        self.pdb_rated_a = np.array([p.rated_current_a for p in pdbs], dtype=float)
        self.v_nominal = float(site.nominal_voltage_v)
        self.aisle_median = _GroupMedian(self.unit_aisle, self.n_aisles)
        self.site_median = _GroupMedian(np.zeros(n, dtype=np.int64), 1)
        self.pdb_median = _GroupMedian(np.zeros(self.np_, dtype=np.int64), 1)
        self.device_names = {
            "source": [s.name for s in sources], "pdb": [p.name for p in pdbs], "ats": [u.name for u in units],
            "des": [u.storage.name if u.storage else "" for u in units],
        }
        self.t_s: float | None = None
        self.t0_s: float | None = None
        self.baseline = DcimBaseline(self.ns, self.np_, n)
        self.baseline_scores: dict[str, np.ndarray] = {}
        self.load_level_kw = np.full(n, NAN)
        self._init_state()

    # ---------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        n, np_, ns = self.n, self.np_, self.ns
        # sources: backup battery monitor
        self.s_bbr = _Ema((ns,), (120.0, 900.0, 3600.0))
        self.s_bbr_min = _RunningExtreme(ns)
        self.s_bbt = _Ema((ns,), (120.0, 900.0))
        self.s_bbt_min = _RunningExtreme(ns)
        self.s_bbv = _Ema((ns,), (120.0, 900.0))
        self.s_bbv_max = _RunningExtreme(ns, "max")
        self.s_bbr_age = _RiseAge(ns, 1.05)
        # PDB joints: rise over the lag-filtered ambient against the lag-filtered I^2, per phase
        self.p_amb = _Ema((np_,), (JOINT_TAU_S,))
        self.p_rise = _Ema((np_, 3), (60.0,))
        self.p_i2 = _Ema((np_, 3), (JOINT_TAU_S,))
        self.p_k_min = _RunningExtreme((np_, 3))
        self.p_k_ph = _Ema((np_, 3), (900.0,))
        self.p_k = _Ema((np_,), (300.0, 1800.0, 5400.0))
        self.p_thd = _Ema((np_,), (60.0, 900.0))
        self.p_cur = _Ema((np_,), (60.0, 900.0))
        self.p_k_age = _RiseAge(np_, 1.15)
        self.p_rise_slope = _Ema((np_, 3), (60.0, 300.0))  # their difference: the rise's slope over ~4 min
        # micro-ATS: contact sets (per pole), contact heating, actuator, transfers
        self.a_cr = [_Ema((n,), (120.0, 900.0, 3600.0)) for _ in range(2)]
        self.a_cr_min = [_RunningExtreme(n) for _ in range(2)]
        self.a_amb = _Ema((n,), (CONTACT_TAU_S,))
        self.a_rise = _Ema((n,), (60.0,))
        self.a_k = _Ema((n,), (900.0,))
        self.a_i2 = _Ema((n,), (CONTACT_TAU_S,))
        self.a_k_min = _RunningExtreme(n)
        self.a_act_min = _RunningExtreme(n, start_s=0.0)
        self.a_act_last = np.full(n, NAN)
        self.a_act_prev = np.full(n, NAN)  # the self-test reading before the last one, and the one before that
        self.a_act_prev2 = np.full(n, NAN)
        self.a_act_t = np.full(n, NAN)
        self.a_tc_last = np.full(n, NAN)
        self.a_cr_age = _RiseAge(n, 1.1)
        self.a_act_age = _RiseAge(n, 1.15)
        self.a_transfers = _DecayingCount(n)
        self.a_dips = _DecayingCount(n)
        self.a_site_dips = _DecayingCount(1)
        # DES
        self.d_ir = _Ema((n,), (120.0, 900.0, 3600.0))
        self.d_ir_min = _RunningExtreme(n)
        self.d_soh = _Ema((n,), (120.0, 900.0))
        self.d_soh_max = _RunningExtreme(n, "max")  # of the 2-min filter: SoH is reported without noise
        self.d_mdp_max = _RunningExtreme(n, "max", start_s=0.0)
        self.d_ir_age = _RiseAge(n, 1.05)
        # load: raw samples of the last minute, EMAs, minute means of the last 2 h (unit and aisle)
        self.l_raw = np.full((int(round(60.0 / self.dt_nominal)), n), NAN)  # the last minute's samples
        self.l_raw_i = 0
        self.l_ema = _Ema((n,), (300.0, 900.0, 3600.0))
        self.l_aisle_ema = _Ema((self.n_aisles,), (300.0,))
        season = int(round(SEASON_S / self.dt_nominal))
        self.l_ring = _Ring(season + 1, n)  # minute means of each unit, 1 h back
        self.l_aisle_ring = _Ring(3 * season + 1, self.n_aisles)  # of each aisle, 3 h back
        self.l_up_t = np.full(self.n_aisles, -np.inf)
        self.l_down_t = np.full(self.n_aisles, -np.inf)
        self.l_up_first_t = np.full(self.n_aisles, NAN)  # start of the aisle's last step up (batch job start)
        self.l_up_on = np.zeros(self.n_aisles, dtype=bool)
        # the unit's share of its aisle's load (removes the aisle's batch jobs and the hall's diurnal
        # swing) against its long-run level: the unit's own drift, which reverts to its mean
        self.l_share = _Ema((n,), (3600.0, 3 * 3600.0))
        self.l_share_ring = _Ring(int(round(300.0 / self.dt_nominal)) + 1, n)
        # batch jobs of each aisle, tracked from steps of the median unit (a unit dropping out or
        # returning moves its aisle's sum, not the median of its units' changes)
        na = self.n_aisles
        self.l_aisle_last_ring = _Ring(int(round(30.0 / self.dt_nominal)) + 1, na)
        self.l_aisle_first = np.unique(self.unit_aisle, return_index=True)[1]  # one unit of each aisle
        self.l_job_on = np.zeros(na, dtype=bool)
        self.l_odd_t = np.full(n, -np.inf)  # last sign of a unit going dark or restarting
        self.l_job_up = np.zeros(na, dtype=bool)
        self.l_job_down = np.zeros(na, dtype=bool)
        self.l_job_start_t = np.full(na, NAN)  # the start of the aisle's last job (kept after it ends)
        self.l_job_pre = np.full(na, NAN)  # the aisle's level just before its current job
        self.l_job_count = 0.0  # job starts seen on the site since the first sample
        self.l_base = _Ema((na,), (1200.0,))  # the aisle's level outside its jobs (diurnal x its drift)
        self.l_base_ring = _Ring(season + 1, 1)  # the site's sum of those levels, 1 h back

    @property
    def ready(self) -> bool:
        """True once filters and baselines have settled (WARMUP_S after the first sample)."""
        return self.t_s is not None and self.t_s - self.t0_s >= WARMUP_S

    # ---------------------------------------------------------------------------------------------
    def update(self, t_s: float, snapshot: dict) -> dict[str, np.ndarray]:
        """Take one sample of every point; returns {kind: float32 matrix (devices x FEATURE_NAMES[kind])}
        for kind in source, pdb, ats, des, load, and "load_level_kw" (per unit)."""
        t_s = float(t_s)
        if self.t_s is None:
            dt = self.dt_nominal
            self.t0_s = t_s
        else:
            dt = t_s - self.t_s
            if dt <= 0:
                raise ValueError(f"samples must move forward in time (got t={t_s} after {self.t_s})")
        self.t_s = t_s
        tr = t_s - self.t0_s  # time since the first sample: baselines start relative to it
        pdb = snapshot["pdb"]
        amb_pdb = np.asarray(pdb["AmbientTemperature"], float)
        valid = np.isfinite(amb_pdb)
        amb_aisle = _ratio(np.bincount(self.pdb_aisle, weights=np.where(valid, amb_pdb, 0.0), minlength=self.n_aisles),
                           np.bincount(self.pdb_aisle, weights=valid.astype(float), minlength=self.n_aisles))
        amb_unit = amb_aisle[self.unit_aisle]
        out = {
            "source": self._source(snapshot["source"], dt, tr),
            "pdb": self._pdb(pdb, amb_pdb, dt, tr),
            "ats": self._ats(snapshot["ats"], amb_unit, dt, tr),
            "des": self._des(snapshot["des"], amb_unit, dt, tr),
            "load": self._load(snapshot["ats"], t_s, dt),
        }
        out["load_level_kw"] = self.load_level_kw  # the last minute's mean LoadPower: forecasts scale it
        self.baseline_scores = self.baseline.update(snapshot, amb_unit)
        return out

    # ---------------------------------------------------------------------------------------------
    def _source(self, s: dict, dt: float, tr: float) -> np.ndarray:
        bbv_raw = np.asarray(s["BackupBatteryVoltage"], float)
        has_backup = bbv_raw > 0
        # own baselines: extremes of the 15-min filters (a fast filter's extreme would be biased by noise)
        bbr = self.s_bbr.update(np.where(has_backup, s["BackupBatteryResistance"], NAN), dt)
        bbr_min = self.s_bbr_min.update(bbr[:, 1], tr)
        bbt = self.s_bbt.update(np.where(has_backup, s["BackupBatteryTemperature"], NAN), dt)
        bbt_min = self.s_bbt_min.update(bbt[:, 1], tr)
        bbv = self.s_bbv.update(np.where(has_backup, bbv_raw, NAN), dt)
        bbv_max = self.s_bbv_max.update(bbv[:, 1], tr)
        cols = [
            _ratio(bbr[:, 0], bbr_min), _logratio(bbr[:, 0], bbr[:, 1]), _logratio(bbr[:, 1], bbr[:, 2]),
            bbt[:, 0] - bbt_min, bbt[:, 0] - bbt[:, 1], 1.0 - _ratio(bbv[:, 0], bbv_max),
            (has_backup & ~np.asarray(s["BackupReady"], bool)).astype(float), has_backup.astype(float),
            np.asarray(s["Loading"], float) / 100.0, np.asarray(s["Available"], float),
            self.s_bbr_age.update(_ratio(bbr[:, 0], bbr_min), self.t_s),
        ]
        return _stack32(cols)

    def _pdb(self, p: dict, amb: np.ndarray, dt: float, tr: float) -> np.ndarray:
        live = np.asarray(p["Energized"], bool)
        i_ph = np.empty((self.np_, 3))  # phases as columns (np.column_stack, without its overhead)
        t_ph = np.empty((self.np_, 3))
        for ph, name in enumerate(("L1", "L2", "L3")):
            i_ph[:, ph] = p["Current" + name]
            t_ph[:, ph] = p["JointTemperature" + name]
        amb_lag = self.p_amb.update(amb, dt)[:, 0]
        rise = self.p_rise.update(t_ph - amb_lag[:, None], dt)[..., 0]
        i2 = self.p_i2.update(i_ph ** 2, dt)[..., 0]
        # K per kA^2: a thermal-resistance x R estimate; meaningless on a dead segment or at a current
        # too small to heat the joint above the sensors' noise (after an outage, before loads return)
        enough = i2 >= ((MIN_CURRENT_FRACTION * self.pdb_rated_a) ** 2)[:, None]
        k_ph = np.where(live[:, None] & enough, rise / np.where(enough, i2, 1.0) * 1000.0, NAN)
        k_min = self.p_k_min.update(self.p_k_ph.update(k_ph, dt)[..., 0], tr)
        # excess rise (K) over what the peers' (or its own early) rise per I^2 gives at this current: has
        # the sensors' noise scale at any current, where the ratio k blows noise up at small currents
        k_ref = _median_finite(k_ph)
        live_rise = np.where(live[:, None], rise, NAN)
        excess_peer = _nanmax1(live_rise - k_ref * i2 / 1000.0)
        excess_base = _nanmax1(live_rise - k_min * i2 / 1000.0)
        k_max = np.fmax.reduce(np.where(np.isfinite(k_ph), k_ph, -np.inf), axis=1)  # np.nanmax's reduction
        k_max = np.where(np.isfinite(k_max), k_max, NAN)
        k_med = _median3(k_ph)
        k_ratio = _ratio(k_ph, k_min)
        k_base = np.fmax.reduce(np.where(np.isfinite(k_ratio), k_ratio, -np.inf), axis=1)
        k_base = np.where(np.isfinite(k_base), k_base, NAN)
        k_ema = self.p_k.update(k_max, dt)
        thd = self.p_thd.update(np.where(live, np.asarray(p["VoltageThd"], float), NAN), dt)
        cur = self.p_cur.update(np.asarray(p["Current"], float), dt)
        loading = np.where(live, np.asarray(p["Loading"], float) / 100.0, NAN)
        # how fast each phase's joints warm (K/min): a joint whose resistance steps up warms at once at
        # (new steady rise - rise) / tau, long before the rise itself stands out; on one phase only, where
        # a load change warms all three phases and the peers alike
        rs = self.p_rise_slope.update(t_ph - amb_lag[:, None], dt)
        slope = np.where(live[:, None], (rs[..., 0] - rs[..., 1]) / (300.0 - 60.0) * 60.0, NAN)
        slope_max = _nanmax1(slope)
        slope_med = _median3(slope)
        # peers: live segments only (a dead one has no THD, no current and a cooling joint); absolute
        # temperature rises are left out on purpose: they follow the load, k (rise per I^2) does not
        med = self.pdb_median
        cols = [
            k_max, _ratio(k_max, k_med), k_base, _logratio(k_max, k_ema[:, 0]), _logratio(k_ema[:, 0], k_ema[:, 1]),
            _logratio(k_ema[:, 1], k_ema[:, 2]), _ratio(k_max, k_max[self.pdb_twin]),
            _ratio(k_max, med(k_max)), excess_peer, excess_base, thd[:, 0] - med(thd[:, 0]), thd[:, 0] - thd[:, 1],
            loading, loading - med(loading), _logratio(cur[:, 0], cur[:, 1]),
            np.asarray(p["PhaseImbalance"], float) / 100.0, np.asarray(p["Energized"], float),
            self.p_k_age.update(k_base, self.t_s),
            slope_max - slope_med, slope_max - med(slope_max),
            _ratio(slope_max - slope_med, np.maximum(_median3(np.where(live[:, None], rise, NAN)), 0.5)),
        ]
        return _stack32(cols)

    def _ats(self, a: dict, amb_unit: np.ndarray, dt: float, tr: float) -> np.ndarray:
        n = self.n
        active = np.asarray(a["ActiveSource"], int)
        cr = np.asarray(a["ContactResistance"], float)
        cr_fast = np.full(n, NAN)
        cr_mid = np.full(n, NAN)
        cr_slow = np.full(n, NAN)
        cr_base = np.full(n, NAN)
        cr_base_max = np.full(n, -np.inf)
        for pole in (0, 1):
            on = (active == pole + 1) & (cr > 0)
            ema = self.a_cr[pole].update(np.where(on, cr, NAN), dt)
            # the baseline of a pole only moves while that pole carries the load
            lo = self.a_cr_min[pole]
            if tr >= lo.start_s:
                lo.v = np.where(on, np.fmin(lo.v, ema[:, 1]), lo.v)
            ratio = _ratio(ema[:, 0], lo.v)
            cr_base_max = np.fmax(cr_base_max, ratio)
            cr_fast = np.where(on, ema[:, 0], cr_fast)
            cr_mid = np.where(on, ema[:, 1], cr_mid)
            cr_slow = np.where(on, ema[:, 2], cr_slow)
            cr_base = np.where(on, ratio, cr_base)
        cr_base_max = np.where(np.isfinite(cr_base_max), cr_base_max, NAN)
        state = np.asarray(a["State"], int)
        working = (active > 0) & (state != 3) & (state != 4)  # carrying load from a feed, not in Fault/Offline
        amb_lag = self.a_amb.update(amb_unit, dt)[:, 0]
        rise = self.a_rise.update(np.asarray(a["ContactTemperature"], float) - amb_lag, dt)[:, 0]
        rise = np.where(working, rise, NAN)
        i_load = plausible_load_current(a)
        i2 = self.a_i2.update(i_load ** 2, dt)[:, 0]
        enough = i2 >= (MIN_CURRENT_FRACTION * self.unit_rated_a) ** 2
        k = np.where(enough, rise / np.where(enough, i2, 1.0) * 1000.0, NAN)
        k_min = self.a_k_min.update(self.a_k.update(k, dt)[:, 0], tr)
        act = np.asarray(a["ActuatorResponseTime"], float)
        act_peers = np.where(state != 3, act, NAN)
        changed = np.isfinite(act) & (act != self.a_act_last)
        self.a_act_prev2 = np.where(changed & np.isfinite(self.a_act_prev), self.a_act_prev, self.a_act_prev2)
        self.a_act_prev = np.where(changed & np.isfinite(self.a_act_last), self.a_act_last, self.a_act_prev)
        self.a_act_last = np.where(np.isfinite(act), act, self.a_act_last)
        self.a_act_t = np.where(changed, self.t_s, self.a_act_t)  # when the self-test last reported
        act_min = self.a_act_min.update(act, tr)
        tc = np.asarray(a["TransferCount"], float)
        transfers = np.where(np.isfinite(self.a_tc_last), np.maximum(tc - self.a_tc_last, 0.0), 0.0)
        if not np.isfinite(transfers).all():  # (np.nan_to_num copies even when nothing is to replace)
            transfers = np.nan_to_num(transfers)
        self.a_tc_last = np.where(np.isfinite(tc), tc, self.a_tc_last)
        v_low = ITIC_STEADY_LOW_PU * self.v_nominal
        va = np.asarray(a["SourceAVoltage"], float)
        vb = np.asarray(a["SourceBVoltage"], float)
        dip = ((va < v_low) & (va > 0.05 * self.v_nominal)) | ((vb < v_low) & (vb > 0.05 * self.v_nominal))
        unit_events = (dip | (transfers > 0)).astype(float)
        t_count = self.a_transfers.update(transfers, dt)
        d_count = self.a_dips.update(unit_events, dt)
        site_event = float((transfers > 0).sum() >= 2 or dip.any())
        s_count = self.a_site_dips.update(np.array([site_event]), dt)
        ltt = np.asarray(a["LastTransferTime"], float)
        preferred = np.asarray(a["PreferredSource"], int)
        med = self.aisle_median
        # transfers and supply dips are counted (self.sag_counts) but not given to the risk model: in
        # the plant they neither cause nor announce a failure, so they could only carry artefacts of
        # how training scenarios were generated
        self.sag_counts = {"unit_transfers_1h": t_count, "unit_dips_1h": d_count, "site_dips_1h": float(s_count[0])}
        cols = [
            cr_base, cr_base_max, _logratio(cr_fast, cr_mid), _logratio(cr_mid, cr_slow), _ratio(cr_fast, med(cr_fast)),
            _ratio(k, med(k)), _ratio(k, k_min),
            _ratio(act, act_min), _ratio(act, med(act_peers)), _ratio(act, self.a_act_prev),
            _ratio(self.a_act_prev, self.a_act_prev2),
            _ratio(ltt, med(ltt)),
            _ratio(i_load, self.unit_rated_a), ((active > 0) & (active != preferred)).astype(float),
            (state == 2).astype(float), (state == 4).astype(float),
            self.a_cr_age.update(cr_base, self.t_s), self.a_act_age.update(_ratio(act, act_min), self.t_s),
            np.minimum(self.t_s - self.a_act_t, RISE_AGE_CAP_S) / 3600.0,
        ]
        return _stack32(cols)

    def _des(self, d: dict, amb_unit: np.ndarray, dt: float, tr: float) -> np.ndarray:
        has = self.has_des
        mode = np.asarray(d["Mode"], int)
        live = has & (mode != 4)  # peers: storage not in Fault
        ir = self.d_ir.update(np.where(has, d["InternalResistance"], NAN), dt)
        ir_min = self.d_ir_min.update(ir[:, 1], tr)
        soh = self.d_soh.update(np.where(has, d["StateOfHealth"], NAN), dt)
        soh_max = self.d_soh_max.update(soh[:, 0], tr)
        mdp = np.where(has, np.asarray(d["MaxDischargePower"], float), NAN)
        mdp_max = self.d_mdp_max.update(mdp, tr)
        power = np.asarray(d["ActivePower"], float)
        pl = lambda x: np.where(live, x, NAN)  # noqa: E731
        med = self.site_median
        # cell temperature follows the unit's own power (charging, bridging): left out as a risk signal
        cols = [
            _ratio(ir[:, 0], ir_min), _ratio(ir[:, 0], med(pl(ir[:, 0]))),
            _logratio(ir[:, 0], ir[:, 1]), _logratio(ir[:, 1], ir[:, 2]),
            soh_max - soh[:, 0], soh[:, 0] - med(pl(soh[:, 0])), soh[:, 0] - soh[:, 1],
            _ratio(mdp, mdp_max),
            np.asarray(d["StateOfCharge"], float) / 100.0, (mode == 1).astype(float), (mode == 2).astype(float),
            _ratio(np.abs(power), mdp_max), self.d_ir_age.update(_ratio(ir[:, 0], ir_min), self.t_s),
        ]
        m = _stack32(cols)
        m[~has] = NAN
        return m

    def _load(self, a: dict, t_s: float, dt: float) -> np.ndarray:
        lp = np.asarray(a["LoadPower"], float)
        self.l_raw[self.l_raw_i % len(self.l_raw)] = lp
        self.l_raw_i += 1
        valid_raw = np.isfinite(self.l_raw)
        cnt = valid_raw.sum(axis=0)
        raw0 = np.where(valid_raw, self.l_raw, 0.0)
        m1 = _ratio(raw0.sum(axis=0), cnt)
        sd = np.sqrt(np.maximum(_ratio((raw0 ** 2).sum(axis=0), cnt) - m1 ** 2, 0.0))
        self.load_level_kw = m1
        ema = self.l_ema.update(m1, dt)
        valid = np.isfinite(m1)
        aisle_m1 = np.bincount(self.unit_aisle, weights=np.where(valid, m1, 0.0), minlength=self.n_aisles)
        aisle_ema = self.l_aisle_ema.update(aisle_m1, dt)[:, 0]
        # rings of minute means, slot by sample number so that a missed sample leaves a gap, not a shift
        k = int(round(t_s / self.dt_nominal))
        self.l_ring.put(k, m1)
        self.l_aisle_ring.put(k, aisle_m1)
        step = lambda s_: int(round(s_ / self.dt_nominal))  # noqa: E731
        rel = lambda a_, b_: _ratio(a_, b_) - 1.0  # noqa: E731
        ur, ar_ = self.l_ring, self.l_aisle_ring
        season = step(SEASON_S)
        # batch-like steps of the aisle's load: how long ago it last stepped up / down
        a2min = ar_.get(k - step(120))
        jump = rel(aisle_m1, a2min)
        self.l_up_t = np.where(jump > 0.05, t_s, self.l_up_t)
        self.l_down_t = np.where(jump < -0.05, t_s, self.l_down_t)
        up = jump > 0.05  # (NaN compares False, as np.nan_to_num's 0 would)
        self.l_up_first_t = np.where(up & ~self.l_up_on, t_s, self.l_up_first_t)  # first sample of the step
        self.l_up_on = up
        # the next start if the aisle's job recurs at the same minute past the hour (cron-like)
        next_start = np.where(np.isfinite(self.l_up_first_t),
                              (SEASON_S - (t_s - self.l_up_first_t) % SEASON_S) / 3600.0, NAN)
        n_aisle = np.bincount(self.unit_aisle, weights=valid.astype(float), minlength=self.n_aisles)
        share = _ratio(m1, _ratio(aisle_m1, n_aisle)[self.unit_aisle])
        share_ema = self.l_share.update(share, dt)
        self.l_share_ring.put(k, share)
        hour = ar_.window(k, season)
        ua = self.unit_aisle
        cols = [
            rel(lp, m1), rel(m1, ema[:, 0]), rel(m1, ema[:, 1]), rel(m1, ema[:, 2]),
            rel(m1, ur.get(k - step(60))), rel(m1, ur.get(k - step(300))), rel(m1, ur.get(k - step(900))),
            _ratio(sd, m1),
            rel(aisle_m1, aisle_ema)[ua], rel(aisle_m1, ar_.get(k - step(60)))[ua],
            rel(aisle_m1, ar_.get(k - step(300)))[ua],
            rel(aisle_m1, _nanmin0(hour))[ua], rel(aisle_m1, _nanmax0(hour))[ua],
            np.minimum((t_s - self.l_up_t) / 3600.0, 3.0)[ua], np.minimum((t_s - self.l_down_t) / 3600.0, 3.0)[ua],
        ]
        u_then = ur.get(k - season)
        for h in LOAD_HORIZONS_S:
            cols.append(rel(ur.get(k - season + step(h)), u_then))
        for h in LOAD_HORIZONS_S:
            lags = np.stack([rel(ar_.get(k - L * season + step(h)), ar_.get(k - L * season)) for L in (1, 2, 3)])
            cols += [lags[0][ua], _nanmax0(lags)[ua], _nanmin0(lags)[ua]]
        cols.append(rel(m1, u_then))
        active = np.asarray(a["ActiveSource"], int)
        cols.append(((active > 0) & (active != np.asarray(a["PreferredSource"], int))).astype(float))
        cols += [rel(share, share_ema[:, 0]), rel(share, share_ema[:, 1]),
                 rel(share, self.l_share_ring.get(k - step(300))), next_start[ua]]
        cols += self._jobs(lp, m1, aisle_m1, valid, k, t_s, dt, step, rel)
        return _stack32(cols)

    def _jobs(self, lp, m1, aisle_m1, valid, k, t_s, dt, step, rel) -> list:
        """Batch-job state of each aisle (broadcast to its units) and the hall's slow trend.

        A job is a step of the whole aisle: its start and end are read from the median over the aisle's
        units of their minute-mean change over 2 min; while it runs, its age and its size over the
        level before it; outside jobs, the aisle's level is tracked (its drift and the diurnal swing),
        and the hall's sum of those levels against 1 h ago gives the diurnal trend. `job_rate` is the
        share of aisle-hours with a job so far (the chance that a scheduled job runs)."""
        ua, na = self.unit_aisle, self.n_aisles
        u_jump = rel(m1, self.l_ring.get(k - step(120)))
        # a unit going dark or restarting is no job: it is left out for 3 min after any sign of it (a
        # sample off its minute mean by half, a 2-min change of half, a level under half its 1-h mean);
        # an aisle with fewer than half its units left is "disturbed": its job state and level stay put
        with np.errstate(invalid="ignore"):
            odd = ~(np.abs(rel(lp, m1)) < 0.5) | ~(np.abs(u_jump) < 0.5) | ~(m1 > 0.5 * self.l_ema[2])
        self.l_odd_t = np.where(odd, t_s, self.l_odd_t)
        clean = (t_s - self.l_odd_t) > 180.0
        n_clean = np.bincount(ua, weights=clean.astype(float), minlength=na)
        calm = n_clean >= 0.5 * np.bincount(ua, minlength=na)
        med_jump = self.aisle_median(np.where(clean, u_jump, NAN))
        jump_a = np.full(na, NAN)
        jump_a[ua[self.l_aisle_first]] = med_jump[self.l_aisle_first]
        up = jump_a > 0.05  # (NaN compares False, as np.nan_to_num's 0 would)
        down = jump_a < -0.05
        start = up & ~self.l_job_up & ~self.l_job_on & calm
        end = down & ~self.l_job_down & self.l_job_on & calm
        self.l_job_up, self.l_job_down = up, down
        before = self.l_aisle_ring.get(k - step(150))
        self.l_job_pre = np.where(start, before, self.l_job_pre)
        self.l_job_start_t = np.where(start, t_s - 60.0, self.l_job_start_t)  # the step is seen ~1 min in
        self.l_job_count += float(start.sum())
        # a recurring job ends within its period: a step up not followed by a step down (missed, or a
        # lasting change of the load) stops counting as a job after one season
        too_long = (t_s - self.l_job_start_t) > SEASON_S
        self.l_job_on = (self.l_job_on | start) & ~end & ~too_long
        on = self.l_job_on
        # the level outside jobs: updated only when no job runs and no step is under way
        quiet = ~on & ~up & ~down & calm
        base = self.l_base.update(np.where(quiet, aisle_m1, NAN), dt)[:, 0]
        # np.nansum: the sum with NaN as 0
        site_base = np.add.reduce(np.where(np.isnan(base), 0.0, base)) if np.isfinite(base).any() else NAN
        self.l_base_ring.put(k, np.array([site_base]))
        trend = rel(site_base, self.l_base_ring.get(k - step(SEASON_S))[0])
        # fast view of the aisle: the sum of its last samples against the minute mean and 30 s ago
        aisle_last = np.bincount(ua, weights=np.where(valid & np.isfinite(lp), lp, 0.0), minlength=na)
        self.l_aisle_last_ring.put(k, aisle_last)
        hours = max((t_s - self.t0_s) / 3600.0, 0.0) if self.t0_s is not None else 0.0
        job_rate = (self.l_job_count + 1.1) / (na * hours + 2.0)
        # share of the target minute after the aisle's next start, if its jobs recur every season at the
        # minute of the last one (cron-like); NaN before any job was seen on the aisle
        next_s = SEASON_S - (t_s - self.l_job_start_t) % SEASON_S
        due = [np.clip((h - next_s) / 60.0, 0.0, 1.0)[ua] for h in LOAD_HORIZONS_S]
        return [
            rel(aisle_last, aisle_m1)[ua], rel(aisle_last, self.l_aisle_last_ring.get(k - step(30)))[ua],
            on.astype(float)[ua], np.where(on, (t_s - self.l_job_start_t) / 3600.0, NAN)[ua],
            np.where(on, rel(aisle_m1, self.l_job_pre), NAN)[ua], rel(aisle_m1, base)[ua],
            np.full(self.n, job_rate), np.full(self.n, trend), *due,
        ]


def feature_names(kind: str) -> tuple[str, ...]:
    return FEATURE_NAMES[kind]
