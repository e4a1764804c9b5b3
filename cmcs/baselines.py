"""The baselines the models must beat, run on the same data.

Risk: static thresholds of the kind DCIM and maintenance tools apply, each normalised so that
a score >= 1 is an alarm at the nominal limit: `score = max over rules of reading / limit`.
Scanning a margin m (alarm when score >= m) scales every limit at once; that is how the
baseline gets its best shot at a false-alarm budget.

Load: persistence (the last sample; and, stronger, the last minute's mean) and seasonal-naive (the same minute
one hour earlier; the hourly batch jobs are the load's strongest recurring pattern).
"""

from __future__ import annotations

import numpy as np


NETA_DT_PROBABLE_K = 4.0  # NETA thermography: rise over ambient 4-15 K "probable deficiency" (docs/domain.md)
NETA_DT_MAJOR_K = 15.0  # > 15 K "major deficiency"
LOADING_LIMIT_PCT = 80.0  # NEC 210.20(A) 80 % rule for continuous load
THD_LIMIT_PCT = 5.0  # IEEE 519 voltage THD limit (<= 69 kV)
CONTACT_R_LIMIT = 1.5  # ATS contact resistance > 50 % above its lowest reading fails a test (docs/domain.md)
ACTUATOR_SPEC_MS = 3.0  # assumed datasheet limit of the actuator self-test response (healthy 1.4-2.4 ms)
DES_SOH_LIMIT_PCT = 80.0  # end of life at < 80 % capacity (VRLA; docs/domain.md)
BATTERY_R_LIMIT = 1.2  # internal resistance > 120 % of baseline: replacement trigger (docs/domain.md)
STATUS_ALARM_SCORE = 10.0  # a status alarm (backup not ready) is not a scalable limit: always above any margin


def plausible_load_current(ats: dict) -> np.ndarray:
    """LoadCurrent, NaN where it is physically implausible (> 5 x the unit's rating).

    Input validation as any pipeline needs (cmcs.features uses it too); it also keeps out the
    simulator's reading while a unit is islanded on its DES with both feeds dead (current
    computed at a feed voltage of ~0 V)."""
    i = np.asarray(ats["LoadCurrent"], float)
    return np.where(i <= 5.0 * np.asarray(ats["RatedCurrent"], float), i, np.nan)


def _ratio(a, b):
    b = np.asarray(b, dtype=float)
    ok = np.isfinite(b) & (b > 0)
    return np.where(ok, np.asarray(a, dtype=float) / np.where(ok, b, 1.0), np.nan)


def _max(*arrays):
    out = np.full(np.shape(arrays[0]), -np.inf)
    for a in arrays:
        out = np.fmax(out, a)
    return np.where(np.isfinite(out), out, 0.0)


class DcimBaseline:
    """Static threshold alarms; remembers only each device's lowest readings (as a DCIM tool does)."""

    def __init__(self, n_sources: int, n_pdbs: int, n_units: int):
        self.cr_lowest = np.full((n_units, 2), np.nan)  # per contact set (pole A, pole B)
        self.ir_lowest = np.full(n_units, np.nan)
        self.bbr_lowest = np.full(n_sources, np.nan)

    def update(self, snap: dict, ambient_unit_degc: np.ndarray) -> dict[str, np.ndarray]:
        """The normalised threshold score of every device now (>= 1: alarm at the nominal limits)."""
        out: dict[str, np.ndarray] = {}
        s = snap["source"]
        bbr = np.where(np.asarray(s["BackupBatteryResistance"], float) > 0, s["BackupBatteryResistance"], np.nan)
        self.bbr_lowest = np.fmin(self.bbr_lowest, bbr)
        has_backup = np.asarray(s["BackupBatteryVoltage"], float) > 0
        not_ready = has_backup & ~np.asarray(s["BackupReady"], bool)
        out["source"] = _max(_ratio(bbr, self.bbr_lowest) / BATTERY_R_LIMIT,
                             np.asarray(s["Loading"], float) / LOADING_LIMIT_PCT,
                             np.where(not_ready, STATUS_ALARM_SCORE, np.nan))
        p = snap["pdb"]
        rise = np.asarray(p["JointTemperature"], float) - np.asarray(p["AmbientTemperature"], float)
        out["pdb"] = _max(rise / NETA_DT_PROBABLE_K, np.asarray(p["Loading"], float) / LOADING_LIMIT_PCT,
                          np.asarray(p["VoltageThd"], float) / THD_LIMIT_PCT)
        a = snap["ats"]
        active = np.asarray(a["ActiveSource"], int)
        cr = np.asarray(a["ContactResistance"], float)
        cr_ratio = np.full(len(cr), np.nan)
        for pole in (0, 1):
            on = (active == pole + 1) & (cr > 0)
            self.cr_lowest[:, pole] = np.where(on, np.fmin(self.cr_lowest[:, pole], cr), self.cr_lowest[:, pole])
            cr_ratio = np.where(on, _ratio(cr, self.cr_lowest[:, pole]), cr_ratio)
        ct_rise = np.asarray(a["ContactTemperature"], float) - ambient_unit_degc
        out["ats"] = _max(cr_ratio / CONTACT_R_LIMIT,
                          np.asarray(a["ActuatorResponseTime"], float) / ACTUATOR_SPEC_MS,
                          ct_rise / NETA_DT_PROBABLE_K,
                          _ratio(plausible_load_current(a), np.asarray(a["RatedCurrent"], float)) * 100.0
                          / LOADING_LIMIT_PCT)
        d = snap["des"]
        ir = np.where(np.asarray(d["InternalResistance"], float) > 0, d["InternalResistance"], np.nan)
        self.ir_lowest = np.fmin(self.ir_lowest, ir)
        soh = np.asarray(d["StateOfHealth"], float)
        out["des"] = _max(np.where(soh > 0, (100.0 - soh) / (100.0 - DES_SOH_LIMIT_PCT), np.nan),
                          _ratio(ir, self.ir_lowest) / BATTERY_R_LIMIT)
        return out


# ---- load baselines ----------------------------------------------------------------------------
# Series are T x units arrays of samples every dt seconds; the target at row t is the minute mean
# at t + h (see dataset.load_targets).

def persistence(last_kw: np.ndarray) -> np.ndarray:
    """Persistence in its textbook sense: the last observed sample (10 s before t) for every horizon."""
    return np.asarray(last_kw)


def persistence_minute_mean(minute_mean_kw: np.ndarray) -> np.ndarray:
    """Persistence of the last minute's mean: the same quantity as the target, a stronger baseline
    than the last sample (it averages out the per-sample noise)."""
    return np.asarray(minute_mean_kw)


def seasonal_naive(minute_mean_kw: np.ndarray, dt_s: float, horizon_s: float, season_s: float = 3600.0) -> np.ndarray:
    """Seasonal-naive: the minute mean one season before the target time t + h (NaN without history)."""
    back = int(round((season_s - horizon_s) / dt_s))
    out = np.full_like(minute_mean_kw, np.nan)
    if back > 0:
        out[back:] = minute_mean_kw[:-back]
    return out
