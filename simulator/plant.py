"""The plant: a physical model of a data hall's power distribution.

Stepped where physics is slow (thermal, state of charge, loads: `Scenario.step_s`, 1 s by
default), event-driven where milliseconds matter (outages, sags, transfers, bridging): an event
is processed at its exact time, and the interruption each IT load sees is accounted in the ITIC
ledger to the millisecond. Vectorised with numpy so that a 1,000-unit hall runs far faster
than real time. Deterministic for a given scenario seed and step.

The plant knows nothing of Modbus or OPC UA: device endpoints read it with `read_device` and
command it with `command`, which refuses what the hardware itself would refuse.

Ground truth, for benchmarks and tests only (never shown to the CMCS, which sees `snapshot()`,
the noisy measurements a client reads): what really flows (`true_flows()`), which paths are
alive (`paths_alive()`), what each DES can deliver now (`des_available_kw()`,
`des_deliverable_kwh()`) and each unit's load (`unit_load_kw()`), when each failure really
happened (`failure_times`, `worn_contact_sets()`), every dropped IT load with why and the unit's
state at that moment (`dropped_loads`), and the energy totals (`totals()`). These names are the
plant's contract with `cmcs.mission` and the tests; what sits behind an underscore may change.

Physics choices worth knowing:
- A worn contact set (`contact_wear`) wears only while it carries current (I^2 R heating, fretting
  and film growth are driven by the load current; an open set is cold and idle): its precursor is
  measured in loaded seconds, so a set that sits open (the unit on its other source) neither wears
  nor fails, and fails once it has carried the load for its whole precursor. The unit reports the
  resistance of its closed set, so every contact-wear precursor is visible to a client. When each
  failure actually happened is recorded in `Plant.failure_times` (ground truth for labels).
- Joints, contact sets and cells start at their thermal steady state for the initial load and
  ambient (a hall that has been running), not at an offset that would settle over an hour.
- Islanded on its DES with both feeds dead, a unit's load is fed by the DES inverter at its output
  voltage (nominal): LoadCurrent is the load's current at that voltage.
- Every sensor has its own noise sample (PDB AmbientTemperature no longer shares JointTemperatureL3's).
- Joints and contact sets are sized for their rating: their resistance and thermal resistance
  scale with (reference rating / rating), 125 A for busway joints and 40 A for contact sets, so
  a 1,200 A segment's joints rise as much at a given loading as a 125 A segment's do.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from siteconfig.model import AtsState, Site, SourceSelection, StorageMode
from siteconfig.points import COMMANDS, POINTS
from simulator import constants as C
from simulator.itic import IticLedger, within_itic
from simulator.scenario import Fault, Scenario, quiet_day

NO_SOURCE = 0
# plain ints of the modes compared on every step (an IntEnum attribute lookup costs more than the comparison)
_BRIDGING = int(StorageMode.BRIDGING)
_SMOOTHING = int(StorageMode.SMOOTHING)
_CHARGING = int(StorageMode.CHARGING)
_STANDBY = int(StorageMode.STANDBY)


class InterlockRefused(Exception):
    """The device refuses the command (as the hardware would); nothing changed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TrueFlows:
    """The plant's true electrical state now (ground truth, not the noisy measurements).

    Arrays per unit (n), per PDB segment (np_) or per source (2); the plant's own arrays, valid
    until it next advances: read them, do not modify or keep them."""

    demand_kw: np.ndarray  # (n,) IT demand of each unit's racks, whether served or not
    unit_kw: np.ndarray  # (n,) power each unit delivers (its single-corded load and its dual-corded share)
    des_kw: np.ndarray  # (n,) DES power: > 0 discharging into the unit, < 0 charging
    grid_kw: np.ndarray  # (n,) what each unit draws from its feed (unit_kw - des_kw; 0 when unsupplied)
    it_kw: np.ndarray  # (n,) IT load served
    unserved_kw: np.ndarray  # (n,) IT demand not served (dropped or dark racks)
    contact_loss_kw: np.ndarray  # (n,) I^2 R loss in each unit's closed contact set
    pdb_i: np.ndarray  # (np_, 3) phase currents of each PDB segment, A
    pdb_kw: np.ndarray  # (np_,) power each segment carries, its joint losses included
    seg_loss_kw: np.ndarray  # (np_,) I^2 R loss in each segment's joints
    src_kw: np.ndarray  # (2,) power each source delivers


@dataclass(frozen=True)
class DroppedLoad:
    """One IT load (a unit's single- or dual-corded racks) that dropped, and its unit's state then."""

    t_s: float
    load: str  # "<unit>/single" or "<unit>/dual"
    unit: str
    cause: str  # the ledger's cause: "source outage", "joint failure PDB-..", "overload trip", ...
    duration_ms: float  # how long the load was dark or sagged (inf: until restored)
    residual_pu: float  # the voltage it saw, per unit of nominal
    active: int  # the unit's active source (0: none)
    feed_ok: tuple[bool, bool]  # were its paths from SourceA and SourceB alive?
    des: bool  # has a DES
    des_mode: int  # StorageMode
    des_soc: float
    des_soc_min: float
    des_fault: bool
    des_pmax_kw: float  # the power its DES could deliver then
    load_kw: float  # the unit's load then
    slow_ms: float  # its transfer time when slowed by a fault (0: nominal)
    unit_fault: bool
    des_could_carry_at_loss: bool | None  # with no path left: the local logic's verdict when it lost the last one

    def as_dict(self) -> dict:
        """The record as a plain dict (des_could_carry_at_loss only when the unit had no path)."""
        row = {**self.__dict__, "feed_ok": list(self.feed_ok)}
        if row["des_could_carry_at_loss"] is None:
            del row["des_could_carry_at_loss"]
        return row


@dataclass
class _Degradation:
    """A fault's precursor ramp: progress d(t) in 0..1 from precursor start to onset."""

    fault: Fault
    index: int  # device index in its kind's arrays
    gamma: float  # shape of the ramp (>1: slow start, fast finish, as self-reinforcing faults do)
    gain: float  # how far the degraded quantity moves at onset (multiplier - 1)
    sub: int = 0  # phase (joints), pole (contacts)
    joint: int = 0
    # contact wear advances only while the worn set carries current: progress is then measured in
    # loaded seconds since the precursor started (accumulated by Plant._integrate), not wall time
    load_gated: bool = False
    loaded_s: float = 0.0

    def progress(self, t_s: float) -> float:
        f = self.fault
        if f.precursor_s <= 0.0:
            return 0.0 if t_s < f.onset_s else 1.0
        if self.load_gated:
            x = self.loaded_s / f.precursor_s
        else:
            x = (t_s - f.precursor_start_s) / f.precursor_s
        if x <= 0.0:
            return 0.0
        return min(1.0, x) ** self.gamma


def _hash_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class Plant:
    """A data hall: two sources, PDB segments, micro-ATS units with DES, IT loads, faults."""

    def __init__(self, site: Site, scenario: Scenario | None = None, seed: int | None = None,
                 measurement_noise: bool = True):
        self.site = site
        self.scenario = scenario or quiet_day(seed or 0)
        self.seed = self.scenario.seed if seed is None else seed
        self.step_s = float(self.scenario.step_s)
        self.measurement_noise = measurement_noise
        rng = np.random.default_rng(self.seed)
        self.ledger = IticLedger()
        self.t_s = 0.0
        self._events: list[tuple[float, int, str, tuple]] = []
        self._event_seq = 0
        self._snapshot_cache: dict | None = None

        # ---- index the site ----------------------------------------------------------------
        units = site.units
        self.n = n = len(units)
        self.unit_names = [u.name for u in units]
        self.aisle_names = [a.name for a in site.aisles]
        aisle_of = {a.name: i for i, a in enumerate(site.aisles)}
        self.unit_aisle = np.array([aisle_of[u.aisle] for u in units], dtype=np.int64)
        self.pdbs = site.pdbs
        self.pdb_names = [p.name for p in self.pdbs]
        self.np_ = len(self.pdbs)
        self.pdb_aisle = np.array([aisle_of[p.aisle] for p in self.pdbs], dtype=np.int64)
        self.pdb_feed = np.array([int(p.feed) for p in self.pdbs], dtype=np.int64)
        pdb_lookup = {(aisle_of[p.aisle], int(p.feed)): i for i, p in enumerate(self.pdbs)}
        self.pdb_of = np.array([[pdb_lookup[(self.unit_aisle[i], 1)], pdb_lookup[(self.unit_aisle[i], 2)]]
                                for i in range(n)], dtype=np.int64).reshape(n, 2)
        # dual-corded racks: cord 1 on this unit, cord 2 on the next unit of the same aisle
        self.partner = np.arange(n)
        for a in site.aisles:
            idx = [self.unit_names.index(u.name) for u in a.units]
            for k, i in enumerate(idx):
                self.partner[i] = idx[(k + 1) % len(idx)]
        self.sources = sorted(site.sources, key=lambda s: int(s.selection))
        self.source_names = [s.name for s in self.sources]
        self.src_rated_kw = np.array([s.rated_power_kw for s in self.sources])
        self.v_nom_ll = float(site.nominal_voltage_v)
        self.v_nom_ln = self.v_nom_ll / C.SQRT3
        self.freq_nom = float(site.frequency_hz)

        # ---- unit parameters -----------------------------------------------------------------
        self.base_kw = np.array([u.it_load_kw for u in units]) * self.scenario.load.scale
        self.dual_frac = np.array([u.dual_corded_fraction for u in units])
        self.transfer_ms_nominal = np.array([u.transfer_time_ms for u in units])
        self.unit_rated_a = np.array([u.rated_current_a for u in units])
        self.position_ft = np.array([u.position_ft for u in units])
        w = 1.0 / 3.0 + rng.uniform(-0.04, 0.04, size=(n, 3))  # rack PDUs spread over the phases
        self.phase_w = w / w.sum(axis=1, keepdims=True)
        # joints and contact sets are sized for their rating: resistance and thermal resistance both
        # scale with reference rating / rating, so the temperature rise at rated current is the same
        # for a 40 A or a 1,200 A part (the nominal figures in constants.py are the reference ones)
        self.contact_scale = C.CONTACT_REF_RATING_A / np.maximum(self.unit_rated_a, 1e-9)
        self.contact_r0 = rng.uniform(*C.CONTACT_R_NOMINAL_UOHM, size=(n, 2)) * self.contact_scale[:, None]
        self.actuator_ms0 = rng.uniform(1.4, 2.4, size=n)
        self.pdb_rated_a = np.array([p.rated_current_a for p in self.pdbs])
        jpp = max(p.joints_per_phase for p in self.pdbs) if self.pdbs else 1
        self.joint_scale = C.JOINT_REF_RATING_A / np.maximum(self.pdb_rated_a, 1e-9)
        self.joint_r0 = rng.uniform(*C.JOINT_R_NOMINAL_UOHM, size=(self.np_, 3, jpp)) * self.joint_scale[:, None, None]
        for i, p in enumerate(self.pdbs):  # segments with fewer joints: unused slots carry no resistance
            self.joint_r0[i, :, p.joints_per_phase:] = 0.0
        self.seg_r_ohm = C.SEGMENT_DROP_AT_RATED * self.v_nom_ln / self.pdb_rated_a

        # ---- DES parameters ------------------------------------------------------------------
        self.has_des = np.array([u.storage is not None for u in units])
        self.des_names = [u.storage.name if u.storage else "" for u in units]
        self.des_cap_kwh = np.array([u.storage.capacity_kwh if u.storage else 0.0 for u in units])
        self.des_pmax_kw = np.array([u.storage.max_power_kw if u.storage else 0.0 for u in units])
        self.des_soc_min = np.array([u.storage.soc_min_pct / 100 if u.storage else 0.0 for u in units])
        self.des_soc_max = np.array([u.storage.soc_max_pct / 100 if u.storage else 0.0 for u in units])
        self.des_r0 = rng.uniform(*C.DES_R_INT_NOMINAL_MOHM, size=n)

        # ---- state ---------------------------------------------------------------------------
        self.src_breaker = np.ones(2, dtype=bool)
        self.src_v_pu = np.ones(2)  # voltage factor set by outages, sags, swells
        self.src_theta = np.zeros(2)
        self.pdb_breaker = np.ones(self.np_, dtype=bool)
        self.pdb_failed = np.zeros(self.np_, dtype=bool)
        self.pdb_theta = np.zeros(self.np_)
        self.preferred = np.array([int(u.preferred_source) for u in units], dtype=np.int64)
        self.active = self.preferred.copy()
        self.unit_fault = np.zeros(n, dtype=bool)
        self.pole_failed = np.zeros((n, 2), dtype=bool)
        self.supplied = np.ones(n, dtype=bool)  # fed from a source (not dark, not on DES alone)
        self.dark_since = np.full(n, np.inf)
        self.dark_cause = [""] * n
        self.transfer_count = rng.integers(0, 40, size=n).astype(np.int64)
        self.last_transfer_ms = self.transfer_ms_nominal.copy()
        self.last_transfer_t = np.full(n, -1e9)
        self.slow_transfer_ms = np.zeros(n)  # > 0 once an ats_slow_transfer fault has struck
        self.actuator_measured_ms = self.actuator_ms0.copy()
        self.selftest_phase = rng.uniform(0, C.ATS_SELFTEST_PERIOD_S, size=n)
        self.retransfer_token = np.zeros(n, dtype=np.int64)
        self.single_up = np.ones(n, dtype=bool)
        self.dual_up = np.ones(n, dtype=bool)
        self.single_restart_at = np.full(n, np.inf)
        self.dual_restart_at = np.full(n, np.inf)
        self.des_soc = np.where(self.has_des, self.des_soc_max - C.DES_SOC_STANDBY_TARGET_MARGIN_PCT / 100, 0.0)
        self.des_soh = np.where(self.has_des, rng.uniform(0.93, 0.99, size=n), 0.0)
        self.des_mode = np.where(self.has_des, int(StorageMode.STANDBY), int(StorageMode.FAULT)).astype(np.int64)
        self.des_fault = ~self.has_des
        self.des_auto = np.zeros(n, dtype=bool)  # bridging because the unit has no source
        # the local logic's verdict when the unit last lost every path: could its DES carry the load then
        # (a diagnostic for loss attribution; by the time a dark load's drop is decided its state has moved)
        self.des_could_carry_at_loss = np.zeros(n, dtype=bool)
        self.des_bridge_kw = np.zeros(n)
        self.des_bridge_until = np.zeros(n)
        self.des_p_kw = np.zeros(n)
        self.des_temp = np.full(n, C.AMBIENT_MEAN_DEGC)
        self.load_ema_kw = self.base_kw.copy()
        n_aisles = len(self.aisle_names)
        self.aisle_ambient_offset = rng.uniform(-1.5, 1.5, size=n_aisles)
        self.aisle_ambient_walk = np.zeros(n_aisles)
        self.joint_T = np.full((self.np_, 3, jpp), C.AMBIENT_MEAN_DEGC)  # set to steady state below
        self.contact_T = np.full((n, 2), C.AMBIENT_MEAN_DEGC)
        self.ar_load = np.zeros(n)
        self.white_load = np.zeros(n)
        self._tick_rng = np.random.default_rng(self.seed + 7919)
        self._noise: dict[str, np.ndarray] = {}
        self._batch_cache: dict[int, tuple[np.ndarray, ...]] = {}  # hour -> (runs, start, dur, mag)
        self.backup_kind = [s.backup for s in self.sources]
        self.backup_v0 = np.array([C.BACKUP_BATTERY[b][0] for b in self.backup_kind])
        self.backup_r0 = np.array([C.BACKUP_BATTERY[b][1] for b in self.backup_kind]) * rng.uniform(0.9, 1.1, 2)
        self._distribution_losses_kwh = 0.0  # distribution: I^2 R of segments and contact sets
        self._conversion_losses_kwh = 0.0  # DES: converter (each way) and cell (coulombic) losses
        self._energy_it_kwh = 0.0
        self._des_throughput_kwh = 0.0
        # constant arrays of the per-step physics, computed once (the arrays are small: numpy's
        # per-call overhead, not the arithmetic, is what a step costs)
        self._idx_n = np.arange(n)
        self._selftest_check_t = -math.inf  # see _tick
        self._has_partner = self.partner != self._idx_n
        self._all_partnered = bool(self._has_partner.all())
        self._single_frac = 1.0 - self.dual_frac
        self._pdb_src = self.pdb_feed - 1
        self._ph_of_pdb = np.arange(3)
        self._joint_rth = (C.JOINT_RTH_K_PER_W * self.joint_scale)[:, None, None]
        self._contact_rth = (C.CONTACT_RTH_K_PER_W * self.contact_scale)[:, None]
        self._des_pmax_floor = np.maximum(self.des_pmax_kw, 1e-9)
        self._overload_cool = 1 - math.exp(-self.step_s / C.OVERLOAD_COOL_TAU_S)
        self._r_joint_const: tuple[np.ndarray, np.ndarray] | None = None  # see _joint_r_and_sum
        # failures as they happened: (fault kind, target, scheduled onset) -> time (ground truth for
        # labels; a worn contact set that sat open fails later than its scheduled onset, or not at all)
        self.failure_times: dict[tuple[str, str, float], float] = {}
        self.dropped_loads: list[DroppedLoad] = []  # every IT load that dropped, in order (ground truth)

        # ---- faults -------------------------------------------------------------------------
        self._degradations: dict[str, list[_Degradation]] = {k: [] for k in
                                                              ("joint", "contact", "actuator", "battery", "backup")}
        self._excursions: list[tuple[int, float, float, float]] = []  # (aisle, start, end, degC)
        frng = np.random.default_rng(self.seed + 104729)
        for f in self.scenario.faults:
            self._install_fault(f, frng)
        self._schedule(0.0, "tick", ())
        self._compute()
        # a hall that has been running: joints, contacts and cells start at their thermal steady
        # state for the initial load and ambient, not at an arbitrary offset that settles over an hour
        self.joint_T, self.contact_T, self.des_temp = self._thermal_steady_state(self._ambient(0.0))

    # ------------------------------------------------------------------------------------------
    # public API
    def device_kind(self, name: str) -> str:
        kind = self._device_index().get(name)
        if kind is None:
            raise KeyError(f"no device named {name!r}")
        return kind[0]

    def device_names(self) -> list[str]:
        return list(self._device_index())

    def advance(self, dt_s: float) -> None:
        self.advance_to(self.t_s + dt_s)

    def advance_to(self, t_s: float) -> None:
        """Run the plant up to time t_s, processing every event at its own time."""
        while self._events and self._events[0][0] <= t_s:
            t_ev, _, kind, args = heapq.heappop(self._events)
            self._integrate_to(t_ev)
            getattr(self, f"_ev_{kind}")(t_ev, *args)
        self._integrate_to(t_s)

    def read_device(self, name: str) -> dict[str, float | int | bool]:
        """Every point of the device, in engineering units, as its sensors report them now."""
        kind, i = self._device_index()[name]
        snap = self.snapshot()[kind]
        return {p.name: _py(snap[p.name][i]) for p in POINTS[kind]}

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """All points of all devices as arrays, indexed by kind, then point name."""
        if self._snapshot_cache is None:
            self._snapshot_cache = self._measure()
        return self._snapshot_cache

    def command(self, name: str, command: str, **args) -> dict:
        """Execute a device command now; raises InterlockRefused or ValueError and changes nothing then."""
        kind, i = self._device_index()[name]
        allowed = COMMANDS[kind]
        if command not in allowed:
            raise ValueError(f"{name} does not accept {command}")
        missing = set(allowed[command]) - set(args)
        if missing:
            raise ValueError(f"{command} needs {', '.join(sorted(missing))}")
        handler = getattr(self, f"_cmd_{command}")
        result = handler(self.t_s, i, **args)
        self._compute()  # what the command changed (a transfer, a DES set-point) shows at once
        return result

    @property
    def efficiency(self) -> float:
        e = self._elec
        out = e["src_kw"].sum()
        return float(e["it_kw"].sum() / out) if out > 0 else 1.0

    # ------------------------------------------------------------------------------------------
    # commands (the hardware's own interlocks)
    def _cmd_SwitchSource(self, t: float, i: int, Target) -> dict:
        target = _selection(Target)
        if self.unit_fault[i]:
            raise InterlockRefused("unit in Fault")
        if not self.supplied[i] and not self.des_auto[i]:
            raise InterlockRefused("unit offline")
        feed_ok = self._feed_ok()
        if not feed_ok[i, target - 1]:
            raise InterlockRefused(f"target source {SourceSelection(target).name} unavailable or out of tolerance")
        if target == self.active[i]:
            self.preferred[i] = target
            return {"TransferTime": 0.0}
        if t - self.last_transfer_t[i] < C.ATS_ACTUATOR_RECOVERY_S:
            raise InterlockRefused("actuator recovering from the last transfer")
        self.preferred[i] = target  # a commanded transfer makes the target the preferred source
        gap_ms = self._transfer_time_ms(i)
        self._transfer(t, i, target, gap_ms, cause="commanded transfer")
        return {"TransferTime": float(gap_ms)}

    def _cmd_SetPreferredSource(self, t: float, i: int, Source) -> dict:
        source = _selection(Source)
        if self.unit_fault[i]:
            raise InterlockRefused("unit in Fault")
        self.preferred[i] = source
        self._schedule_retransfer(t, i)
        return {}

    def _cmd_StartBridging(self, t: float, i: int, Power, Duration) -> dict:
        power, duration = float(Power), float(Duration)
        if not (0.0 < duration <= 3600.0):
            raise ValueError("Duration must be in (0, 3600] s")
        if not (0.0 < power <= self.des_pmax_kw[i]):
            raise ValueError(f"Power must be in (0, {self.des_pmax_kw[i]:g}] kW")
        if self.des_fault[i]:
            raise InterlockRefused("storage in Fault")
        if self.des_soc[i] <= self.des_soc_min[i] + 0.01:
            raise InterlockRefused("state of charge at its lower limit")
        self.des_mode[i] = int(StorageMode.BRIDGING)
        self.des_bridge_kw[i] = power
        self.des_bridge_until[i] = t + duration
        self._schedule(t + duration, "bridge_end", (i, t + duration))
        return {}

    def _cmd_StopBridging(self, t: float, i: int) -> dict:
        if self.des_mode[i] == StorageMode.BRIDGING and not self.des_auto[i]:
            self.des_mode[i] = int(StorageMode.STANDBY)
            self.des_bridge_kw[i] = 0.0
            self.des_bridge_until[i] = 0.0
        return {}

    # ------------------------------------------------------------------------------------------
    # faults
    def _install_fault(self, f: Fault, rng: np.random.Generator) -> None:
        gamma = float(rng.uniform(1.5, 3.0))
        sev = float(np.clip(f.severity, 0.0, 1.0))
        if f.kind in ("source_outage", "voltage_sag", "voltage_swell"):
            s = self.source_names.index(f.target)
            if f.kind == "source_outage":
                if f.precursor_s > 0 and self.backup_kind[s] != "none":
                    self._degradations["backup"].append(_Degradation(f, s, gamma, 1.0 + 2.0 * sev))
                self._schedule(f.onset_s, "source_voltage", (s, 0.0, "source outage"))
                self._schedule(f.onset_s + max(f.duration_s, 0.001), "source_voltage", (s, 1.0, "source restored"))
            else:
                depth = f.depth_pu if f.depth_pu > 0 else (0.6 if f.kind == "voltage_sag" else 1.25)
                self._schedule(f.onset_s, "source_voltage", (s, depth, f.kind.replace("_", " ")))
                self._schedule(f.onset_s + max(f.duration_s, 0.001), "source_voltage", (s, 1.0, "voltage restored"))
        elif f.kind == "joint_degradation":
            p = self.pdb_names.index(f.target)
            phase = int(rng.integers(0, 3))
            joint = int(rng.integers(0, max(1, self.pdbs[p].joints_per_phase)))
            d = _Degradation(f, p, gamma, 6.0 + 14.0 * sev, phase, joint, load_gated=f.precursor_s > 0)
            self._degradations["joint"].append(d)
            self._schedule(f.onset_s, "joint_fail", (p, len(self._degradations["joint"]) - 1))
        elif f.kind == "contact_wear":
            u = self.unit_names.index(f.target)
            pole = (f.pole or int(self.preferred[u])) - 1
            d = _Degradation(f, u, gamma, 3.0 + 7.0 * sev, pole, load_gated=f.precursor_s > 0)
            self._degradations["contact"].append(d)
            self._schedule(f.onset_s, "contact_fail", (u, pole, len(self._degradations["contact"]) - 1))
        elif f.kind == "ats_slow_transfer":
            u = self.unit_names.index(f.target)
            self._degradations["actuator"].append(_Degradation(f, u, gamma, 2.0 + 6.0 * sev))
            self._schedule(f.onset_s, "ats_slow", (u, 25.0 + 100.0 * sev))
        elif f.kind == "battery_fade":
            u = self.des_names.index(f.target)
            self._degradations["battery"].append(_Degradation(f, u, gamma, 1.0 + 2.0 * sev))
            self._schedule(f.onset_s, "des_fail", (u,))
        elif f.kind == "ambient_excursion":
            a = self.aisle_names.index(f.target)
            self._excursions.append((a, f.onset_s, f.onset_s + f.duration_s, 3.0 + 5.0 * sev))
        else:  # pragma: no cover - the scenario loader rejects unknown kinds
            raise ValueError(f"unknown fault kind {f.kind}")

    # ------------------------------------------------------------------------------------------
    # events
    def _schedule(self, t: float, kind: str, args: tuple) -> None:
        self._event_seq += 1
        heapq.heappush(self._events, (float(t), self._event_seq, kind, args))

    def _ev_tick(self, t: float) -> None:
        self._tick(t)
        self._schedule(t + self.step_s, "tick", ())

    def _ev_source_voltage(self, t: float, s: int, v_pu: float, cause: str) -> None:
        if cause == "source outage":
            self._record_failure(t, self._fault_of("source_outage", self.source_names[s], t))
        self.src_v_pu[s] = v_pu
        self._resolve_supply(t, cause)

    def _ev_breaker_reset(self, t: float, what: str, i: int) -> None:
        if what == "source":
            self.src_breaker[i] = True
            self.src_theta[i] = 0.0
        else:
            self.pdb_breaker[i] = True
            self.pdb_theta[i] = 0.0
        self._resolve_supply(t, f"{what} breaker reset")

    def _record_failure(self, t: float, f: Fault | None) -> None:
        if f is not None:
            self.failure_times.setdefault((f.kind, f.target, float(f.onset_s)), float(t))

    def _fault_of(self, kind: str, target: str, onset_s: float) -> Fault | None:
        for f in self.scenario.faults:
            if f.kind == kind and f.target == target and f.onset_s == onset_s:
                return f
        return None

    def _ev_joint_fail(self, t: float, p: int, k: int | None = None) -> None:
        d = self._degradations["joint"][k] if k is not None else None
        if d is not None and d.load_gated and d.loaded_s < d.fault.precursor_s - 1e-6:
            # the loosening joint has not carried current for its whole precursor (its load was moved
            # off, or the segment was dead): no I^2 R, no thermal runaway; it degrades on under load
            remaining = d.fault.precursor_s - d.loaded_s
            self._schedule(t + max(remaining, self.step_s), "joint_fail", (p, k))
            return
        self._record_failure(t, d.fault if d is not None else
                             self._fault_of("joint_degradation", self.pdb_names[p], t))
        self.pdb_failed[p] = True
        # an opening joint arcs: the voltage chatters before the unit can tell it is gone
        arcing = {u: self._arc(u) for u in np.flatnonzero(self.pdb_of[np.arange(self.n), self.active - 1] == p)
                  if self.active[u] != NO_SOURCE}
        self._resolve_supply(t, f"joint failure {self.pdb_names[p]}", arcing)

    def _ev_contact_fail(self, t: float, u: int, pole: int, k: int | None = None) -> None:
        d = self._degradations["contact"][k] if k is not None else None
        if d is not None and d.load_gated and d.loaded_s < d.fault.precursor_s - 1e-6:
            # the worn set has not carried current for its whole precursor (it sat open while the unit
            # was on its other source): it wears on while it carries current again, and fails then
            remaining = d.fault.precursor_s - d.loaded_s
            self._schedule(t + max(remaining, self.step_s), "contact_fail", (u, pole, k))
            return
        if d is not None:
            self._record_failure(t, d.fault)
        self.pole_failed[u, pole] = True
        self.unit_fault[u] = True
        arcing = {u: self._arc(u)} if self.active[u] == pole + 1 else {}
        self._resolve_supply(t, f"contact failure {self.unit_names[u]}", arcing)

    def _ev_ats_slow(self, t: float, u: int, slow_ms: float) -> None:
        self._record_failure(t, self._fault_of("ats_slow_transfer", self.unit_names[u], t))
        self.slow_transfer_ms[u] = slow_ms

    def _ev_des_fail(self, t: float, u: int) -> None:
        self._record_failure(t, self._fault_of("battery_fade", self.des_names[u], t))
        self.des_fault[u] = True
        self.des_mode[u] = int(StorageMode.FAULT)
        self.des_bridge_kw[u] = 0.0
        if self.des_auto[u]:
            self.des_auto[u] = False
            self._go_dark(t, u, "storage failure")
        self._snapshot_cache = None

    def _ev_bridge_end(self, t: float, u: int, until: float) -> None:
        if self.des_bridge_until[u] == until and self.des_mode[u] == StorageMode.BRIDGING and not self.des_auto[u]:
            self.des_mode[u] = int(StorageMode.STANDBY)
            self.des_bridge_kw[u] = 0.0

    def _ev_retransfer(self, t: float, u: int, token: int) -> None:
        if token != self.retransfer_token[u] or self.unit_fault[u] or not self.supplied[u]:
            return
        target = int(self.preferred[u])
        if self.active[u] == target or not self._feed_ok()[u, target - 1]:
            return
        self._transfer(t, u, target, self._transfer_time_ms(u), cause="return to preferred source")

    def _ev_restart(self, t: float, u: int, group: str, token: float) -> None:
        if group == "single" and self.single_restart_at[u] == token:
            self.single_up[u] = True
            self.single_restart_at[u] = np.inf
        elif group == "dual" and self.dual_restart_at[u] == token:
            self.dual_up[u] = True
            self.dual_restart_at[u] = np.inf
        self._snapshot_cache = None

    # ------------------------------------------------------------------------------------------
    # supply logic
    def _src_ok(self) -> np.ndarray:
        v = self.src_v_pu
        return self.src_breaker & (v >= C.ATS_TOLERANCE_LOW_PU) & (v <= C.ATS_TOLERANCE_HIGH_PU)

    def _seg_ok(self) -> np.ndarray:
        return self._src_ok()[self.pdb_feed - 1] & self.pdb_breaker & ~self.pdb_failed

    def _feed_ok(self) -> np.ndarray:
        return self._seg_ok()[self.pdb_of] & ~self.pole_failed

    def _transfer_time_ms(self, u: int) -> float:
        if self.slow_transfer_ms[u] > 0:
            return float(self.slow_transfer_ms[u])
        # contact wear and actuator ageing add a little; the nominal figure is detection + switching + gap
        return float(self.transfer_ms_nominal[u] * (self.actuator_measured_ms[u] / self.actuator_ms0[u]) ** 0.3)

    def _arc(self, u: int) -> tuple[float, float]:
        r = _hash_rng(self.seed, int(u), int(self.t_s * 1000))
        return float(r.uniform(*C.ARC_DETECT_DELAY_MS)), float(r.uniform(*C.ARC_RESIDUAL_PU))

    def _des_can_carry(self, u: int) -> bool:
        load = self._unit_load_now(u)
        return bool(self.has_des[u] and not self.des_fault[u] and self.des_soc[u] > self.des_soc_min[u] + 0.005
                    and self._des_pmax_now()[u] >= load)

    def _des_online(self, u: int) -> bool:
        """Commanded bridging keeps the inverter online: the load rides through any interruption."""
        return bool(self.des_mode[u] == StorageMode.BRIDGING and self._des_can_carry(u))

    def _unit_load_now(self, u: int) -> float:
        e = self._elec
        return float(e["unit_kw"][u]) if e["unit_kw"][u] > 0 else float(e["demand_kw"][u])

    def _transfer(self, t: float, u: int, target: int, gap_ms: float, cause: str,
                  arc: tuple[float, float] | None = None) -> None:
        """Move unit u to `target`: the load is dark for gap_ms (plus arcing time)."""
        dark_ms = gap_ms + (arc[0] if arc else 0.0)
        protected = self._des_online(u)
        self.active[u] = target
        self.transfer_count[u] += 1
        self.last_transfer_ms[u] = dark_ms
        self.last_transfer_t[u] = t
        # each operation wears the contact set a little (arc erosion)
        self.contact_r0[u, target - 1] *= 1.0005
        self._disturb(t, u, 0.0, dark_ms, cause, protected)
        self.retransfer_token[u] += 1
        self._snapshot_cache = None
        self._schedule_retransfer(t, u)

    def _schedule_retransfer(self, t: float, u: int) -> None:
        if self.active[u] != self.preferred[u]:
            self.retransfer_token[u] += 1
            self._schedule(t + C.ATS_RETRANSFER_DELAY_S, "retransfer", (u, int(self.retransfer_token[u])))

    def _disturb(self, t: float, u: int, residual_pu: float, dark_ms: float, cause: str, protected: bool,
                 partner_dark_ms: float = 0.0) -> None:
        """Account a disturbance on unit u's loads in the ledger and drop what leaves ITIC."""
        name = self.unit_names[u]
        if self.single_up[u] and self.dual_frac[u] < 1.0:
            if self._ledger_record(t, u, f"{name}/single", residual_pu, dark_ms, cause, protected):
                self._drop(t, u, "single")
        if self.dual_up[u] and self.dual_frac[u] > 0.0:
            # dual-corded racks ride on their second cord, unless that one is dark at the same time
            p = int(self.partner[u])
            second_cord_ok = p != u and bool(self.supplied[p] or self.des_auto[p])
            both_dark_ms = min(dark_ms, partner_dark_ms) if second_cord_ok else dark_ms
            if both_dark_ms > 0.0:
                if self._ledger_record(t, u, f"{name}/dual", residual_pu, both_dark_ms, cause, protected):
                    self._drop(t, u, "dual")

    def _ledger_record(self, t: float, u: int, load: str, residual_pu: float, duration_ms: float, cause: str,
                       protected: bool = False) -> bool:
        """Account one disturbance of unit u's load in the ITIC ledger; a drop is also kept, with the
        unit's state at this moment, in `dropped_loads`. True when the load dropped."""
        dropped = self.ledger.record(t, load, residual_pu, duration_ms, cause, protected)
        if dropped:
            feed_ok = self._feed_ok()[u]
            self.dropped_loads.append(DroppedLoad(
                t_s=float(t), load=load, unit=self.unit_names[u], cause=cause, duration_ms=float(duration_ms),
                residual_pu=float(residual_pu), active=int(self.active[u]),
                feed_ok=(bool(feed_ok[0]), bool(feed_ok[1])), des=bool(self.has_des[u]),
                des_mode=int(self.des_mode[u]), des_soc=float(self.des_soc[u]),
                des_soc_min=float(self.des_soc_min[u]), des_fault=bool(self.des_fault[u]),
                des_pmax_kw=float(self._des_pmax_now()[u]), load_kw=float(self._unit_load_now(u)),
                slow_ms=float(self.slow_transfer_ms[u]), unit_fault=bool(self.unit_fault[u]),
                des_could_carry_at_loss=None if feed_ok.any() else bool(self.des_could_carry_at_loss[u])))
        return dropped

    def _drop(self, t: float, u: int, group: str) -> None:
        if group == "single":
            self.single_up[u] = False
            self.single_restart_at[u] = np.inf
        else:
            self.dual_up[u] = False
            self.dual_restart_at[u] = np.inf
        if self.supplied[u] or self.des_auto[u]:
            self._schedule_restart(t, u, group)

    def _schedule_restart(self, t: float, u: int, group: str) -> None:
        at = t + C.LOAD_RESTART_S
        if group == "single" and not self.single_up[u] and not math.isfinite(self.single_restart_at[u]):
            self.single_restart_at[u] = at
            self._schedule(at, "restart", (u, "single", at))
        if group == "dual" and not self.dual_up[u] and not math.isfinite(self.dual_restart_at[u]):
            self.dual_restart_at[u] = at
            self._schedule(at, "restart", (u, "dual", at))

    def _go_dark(self, t: float, u: int, cause: str) -> None:
        """Unit u has no supply at all. Its loads ride through up to ITIC's 20 ms at 0 V; whether they
        drop is decided when that time has passed or when power returns, whichever comes first."""
        self.supplied[u] = False
        self.des_auto[u] = False
        if self.des_mode[u] == StorageMode.BRIDGING:
            self.des_mode[u] = int(StorageMode.STANDBY)
        self.dark_since[u] = t
        self.dark_cause[u] = cause
        self._schedule(t + C.ITIC_ZERO_VOLT_RIDE_THROUGH_S + 1e-6, "dark_check", (u, t))
        self._snapshot_cache = None

    def _ev_dark_check(self, t: float, u: int, since: float) -> None:
        if self.dark_since[u] == since and not self.supplied[u]:
            partner_ms = math.inf if not self.supplied[self.partner[u]] else 0.0
            self._disturb(since, u, 0.0, math.inf, self.dark_cause[u], False, partner_ms)

    def _end_dark(self, t: float, u: int) -> None:
        if math.isfinite(self.dark_since[u]):
            ms = (t - self.dark_since[u]) * 1000.0
            if ms <= C.ITIC_ZERO_VOLT_RIDE_THROUGH_S * 1000.0:
                self._ledger_record(self.dark_since[u], u, f"{self.unit_names[u]}/single", 0.0, ms,
                                    self.dark_cause[u])
            self.dark_since[u] = math.inf

    def _resolve_supply(self, t: float, cause: str, arcing: dict[int, tuple[float, float]] | None = None) -> None:
        """After a change upstream: transfer, bridge or go dark, unit by unit, as the local logic would."""
        arcing = arcing or {}
        self._compute()
        feed_ok = self._feed_ok()
        on_ok = np.zeros(self.n, dtype=bool)
        has_active = self.active != NO_SOURCE
        on_ok[has_active] = feed_ok[np.flatnonzero(has_active), self.active[has_active] - 1]
        lost = np.flatnonzero((self.supplied & ~on_ok) | (np.isin(np.arange(self.n), list(arcing)) & self.supplied))
        dark_ms: dict[int, float] = {}
        plan: list[tuple[int, str, float]] = []
        for u in lost:
            other = 3 - int(self.active[u])
            arc_ms = arcing.get(u, (0.0, 0.0))[0]
            if not on_ok[u] or u in arcing:
                if feed_ok[u, other - 1]:
                    ms = arc_ms + self._transfer_time_ms(u)
                    plan.append((u, "transfer", ms))
                elif self._des_can_carry(u):
                    ms = arc_ms + C.DES_AUTO_BRIDGE_RESPONSE_MS
                    plan.append((u, "bridge", ms))
                    self.des_could_carry_at_loss[u] = True
                else:
                    ms = math.inf
                    plan.append((u, "dark", ms))
                    self.des_could_carry_at_loss[u] = False
                dark_ms[u] = 0.0 if self._des_online(u) else ms
        for u, action, ms in plan:
            protected = self._des_online(u)
            partner_ms = dark_ms.get(int(self.partner[u]), 0.0)
            if action == "transfer":
                other = 3 - int(self.active[u])
                self.active[u] = other
                self.transfer_count[u] += 1
                self.last_transfer_ms[u] = ms
                self.last_transfer_t[u] = t
                self._disturb(t, u, 0.0, ms, cause, protected, partner_ms)
                self._schedule_retransfer(t, u)
            elif action == "bridge":
                self.supplied[u] = False
                self.des_auto[u] = True
                self.des_mode[u] = int(StorageMode.BRIDGING)
                self._disturb(t, u, 0.0, ms, cause, protected, partner_ms)
            else:
                self._go_dark(t, u, cause)
        # units without a source get one back as soon as either feed returns
        for u in np.flatnonzero(~self.supplied):
            ok = feed_ok[u]
            if not ok.any():
                continue
            target = int(self.active[u]) if ok[self.active[u] - 1] else (1 if ok[0] else 2)
            if target != self.active[u]:
                self.transfer_count[u] += 1
                self.last_transfer_t[u] = t
            self.active[u] = target
            self.supplied[u] = True
            self._end_dark(t, u)
            if self.des_auto[u]:  # the DES hands the load back without a break
                self.des_auto[u] = False
                self.des_mode[u] = int(StorageMode.STANDBY)
            self._schedule_restart(t, u, "single")
            self._schedule_restart(t, u, "dual")
            self._schedule_retransfer(t, u)
        # sources back: units away from their preferred source go home after the delay
        for u in np.flatnonzero(self.supplied & (self.active != self.preferred)):
            if feed_ok[u, self.preferred[u] - 1]:
                self._schedule_retransfer(t, u)
        self._snapshot_cache = None
        self._compute()

    # ------------------------------------------------------------------------------------------
    # continuous physics
    def _tick(self, t: float) -> None:
        """Once per step: new load and noise samples, protection, self-tests."""
        r = self._tick_rng
        n = self.n
        na = len(self.aisle_names)
        # the step's normal samples in one draw, cut in order into the load AR, white load, ambient
        # walk and sensor noise samples: a Generator's standard_normal(a + b) is standard_normal(a)
        # followed by standard_normal(b), so the values are those of one draw per use
        noise_size = 8 * n + 9 * self.np_ + 16 if self.measurement_noise else 0
        z = r.standard_normal(2 * n + na + noise_size)
        a = math.exp(-self.step_s / C.LOAD_AR_TAU_S)
        drift = self.scenario.load.drift_pct / 100.0
        self.ar_load = a * self.ar_load + drift * math.sqrt(1 - a * a) * z[:n]
        self.white_load = self.scenario.load.noise_pct / 100.0 * z[n:2 * n]
        self.aisle_ambient_walk = 0.999 * self.aisle_ambient_walk + 0.03 * z[2 * n:2 * n + na]
        if self.measurement_noise:
            o = 2 * n + na
            self._noise = {
                "u": z[o:o + 8 * n].reshape(n, 8), "p": z[o + 8 * n:o + 8 * n + 9 * self.np_].reshape(self.np_, 9),
                "s": z[o + 8 * n + 9 * self.np_:].reshape(2, 8),
            }
        # actuator self-test results appear once per period. Further than two steps from any unit's next
        # self-test, `due` is all False: it is only evaluated from then on (the floors are monotone in t)
        if t < self._selftest_check_t:
            due = None
        else:
            cycle = np.floor((t - self.selftest_phase) / C.ATS_SELFTEST_PERIOD_S)
            due = cycle != np.floor((t - self.step_s - self.selftest_phase) / C.ATS_SELFTEST_PERIOD_S)
            next_test = self.selftest_phase + (cycle + 1.0) * C.ATS_SELFTEST_PERIOD_S
            self._selftest_check_t = float(next_test.min(initial=math.inf)) - 2.0 * self.step_s
        if due is not None and due.any():
            act = self.actuator_ms0.copy()
            for d in self._degradations["actuator"]:
                act[d.index] *= 1.0 + d.gain * d.progress(t)
            jitter = 1.0 + 0.04 * r.standard_normal(n)
            self.actuator_measured_ms[due] = (act * jitter)[due]
        self._compute()
        self._protection(t)
        self._des_limits(t)

    def _protection(self, t: float) -> None:
        e = self._elec
        dt = self.step_s
        L_src = e["src_kw"] / self.src_rated_kw
        L_pdb = np.maximum.reduce(e["pdb_i"], axis=1) / self.pdb_rated_a
        cool = self._overload_cool  # 1 - exp(-dt / OVERLOAD_COOL_TAU_S)
        for theta, L in ((self.src_theta, L_src), (self.pdb_theta, L_pdb)):
            heat = (L * L - 1.0) / C.OVERLOAD_TAU_S
            theta += np.where(L > 1.0, heat * dt, -theta * cool)
            np.maximum(theta, 0.0, out=theta)
        trip_src = (self.src_theta >= 1.0) & self.src_breaker
        trip_pdb = (self.pdb_theta >= 1.0) & self.pdb_breaker
        if not (trip_src.any() or trip_pdb.any()):
            return
        for s in np.flatnonzero(trip_src):
            self.src_breaker[s] = False
            self._schedule(t + C.BREAKER_RESET_S, "breaker_reset", ("source", int(s)))
        for p in np.flatnonzero(trip_pdb):
            self.pdb_breaker[p] = False
            self._schedule(t + C.BREAKER_RESET_S, "breaker_reset", ("pdb", int(p)))
        self._resolve_supply(t, "overload trip")

    def _des_limits(self, t: float) -> None:
        if self.des_auto.any():
            empty = self.des_auto & (self.des_soc <= self.des_soc_min + 0.002)
            for u in np.flatnonzero(empty):
                self._go_dark(t, u, "storage exhausted")
        bridging = self.des_mode == _BRIDGING
        if bridging.any():
            low = bridging & ~self.des_auto & (self.des_soc <= self.des_soc_min + 0.002)
            self.des_mode[low] = _STANDBY

    def _demand_kw(self, t: float) -> np.ndarray:
        lp = self.scenario.load
        tod = (self.scenario.start_time_of_day_s + t) % 86400.0
        diurnal = 1.0 + lp.diurnal_amplitude * math.cos(2 * math.pi * (tod - 15 * 3600.0) / 86400.0)
        batch = self._batch_factor(t)[self.unit_aisle]
        # base * diurnal * (1 + batch) * (1 + ar) * (1 + white), left to right, in place
        demand = self.base_kw * diurnal
        demand *= 1.0 + batch
        demand *= 1.0 + self.ar_load
        demand *= 1.0 + self.white_load
        return demand

    def _batch_factor(self, t: float) -> np.ndarray:
        """Scheduled batch jobs: each aisle's job starts at its own minute past the hour (cron-like)."""
        abs_t = self.scenario.start_time_of_day_s + t
        hour = int(abs_t // 3600.0)
        out = np.zeros(len(self.aisle_names))
        for h in (hour - 1, hour):
            table = self._batch_cache.get(h)
            if table is None:
                r = _hash_rng(self.seed, 31337, h)
                na = len(self.aisle_names)
                runs = r.random(na) < self.scenario.load.batch_probability
                start = h * 3600.0 + (np.arange(na) * 17 % 60) * 60.0
                dur = r.uniform(600.0, 2400.0, na)
                mag = self.scenario.load.batch_magnitude * r.uniform(0.7, 1.3, na)
                # a window (abs. time) holding every job of the hour that runs, with a margin: outside
                # it the exact test below is all False and is skipped
                lo = float(start[runs].min()) if runs.any() else math.inf
                hi = float((start + dur)[runs].max()) + 1.0 if runs.any() else -math.inf
                table = (runs, start, dur, mag, lo, hi)
                self._batch_cache[h] = table
                if len(self._batch_cache) > 8:
                    self._batch_cache.pop(min(self._batch_cache))
            runs, start, dur, mag, lo, hi = table
            if not lo <= abs_t <= hi:
                continue  # no job of this hour runs: it would add exactly 0.0
            x = abs_t - start
            on = runs & (x >= 0) & (x <= dur)
            if not on.any():
                continue  # no job of this hour runs: it would add exactly 0.0
            # clip(v, 0, 1) as minimum(maximum(v, 0), 1): the same values (v is never NaN or -0.0 here)
            ramp = np.minimum(np.maximum(x / 60.0, 0.0), 1.0) * np.minimum(np.maximum((dur - x) / 60.0, 0.0), 1.0)
            out += np.where(on, mag * ramp, 0.0)
        return out

    def _des_pmax_now(self) -> np.ndarray:
        r = self._battery_r()
        return np.where(self.des_fault | (self.des_soc <= self.des_soc_min + 0.005), 0.0,
                        self.des_pmax_kw * np.minimum(1.0, self.des_r0 / np.maximum(r, 1e-9)) ** 0.5)

    def _battery_r(self) -> np.ndarray:
        r = self.des_r0.copy()
        for d in self._degradations["battery"]:
            r[d.index] *= 1.0 + d.gain * d.progress(self.t_s)
        return r

    def _compute(self) -> None:
        """Electrical state now: who carries what, currents, losses, powers.

        Runs once per step on arrays of a few hundred elements, where numpy's per-call overhead is
        the cost: rules that concern no unit now (bridging, smoothing, charging, islanding, dark
        units) are skipped rather than applied as no-op `np.where`s. The results are the same."""
        t = self.t_s
        n = self.n
        idx = self._idx_n
        demand = self._demand_kw(t)
        single_kw = demand * self._single_frac  # demand * (1 - dual_frac)
        dual_kw = demand * self.dual_frac
        single = single_kw * self.single_up
        dual = dual_kw * self.dual_up
        supplied = self.supplied
        des_auto = self.des_auto
        alive = supplied | des_auto
        all_supplied = supplied.all()  # (then every np.where(supplied, x, 0.0) below is x itself)
        if self._all_partnered and (all_supplied or alive.all()):
            # the usual state: every unit and its partner alive, each cord carries half the dual-corded
            # load (shares of 0.5 everywhere), the single-corded load is all served
            half = dual * 0.5
            unit_kw = single + half
            unit_kw += np.bincount(self.partner, weights=half, minlength=n)
            served_it = single + dual
            unserved = single_kw * ~self.single_up + dual_kw * ~self.dual_up
        else:
            partner_alive = alive[self.partner] & self._has_partner
            both = alive & partner_alive
            either = alive | partner_alive
            share1 = np.where(both, 0.5, np.where(alive, 1.0, 0.0))
            share2 = np.where(both, 0.5, np.where(partner_alive, 1.0, 0.0))
            alive_single = np.where(alive, single, 0.0)
            unit_kw = alive_single + dual * share1
            unit_kw += np.bincount(self.partner, weights=dual * share2, minlength=n)
            served_it = alive_single + dual * np.where(either, 1.0, 0.0)
            unserved = single_kw * ~(self.single_up & alive) + dual_kw * ~(self.dual_up & either)
        # storage
        des_mode = self.des_mode
        des_ok = ~self.des_fault
        bridging = (des_mode == _BRIDGING) & des_ok
        smoothing = (des_mode == _SMOOTHING) & des_ok
        any_smoothing = smoothing.any()
        p_des = np.zeros(n)
        if any_smoothing or bridging.any():
            pmax = self._des_pmax_now()
            p_des = np.where(bridging & ~des_auto, np.minimum(np.minimum(self.des_bridge_kw, unit_kw), pmax), p_des)
        if des_auto.any():
            p_des = np.where(des_auto, unit_kw, p_des)
        if any_smoothing:
            p_des = np.where(smoothing, np.clip(unit_kw - self.load_ema_kw, -pmax, pmax), p_des)
        target_soc = self.des_soc_max - C.DES_SOC_STANDBY_TARGET_MARGIN_PCT / 100
        idle = self.has_des & des_ok & (des_mode != _BRIDGING) & ~smoothing
        charging = idle & (self.des_soc < target_soc - 0.005) & supplied  # (a subset of idle)
        if charging.any():
            p_des = np.where(charging, -C.DES_CHARGE_C_RATE * self.des_cap_kwh * self.des_soh, p_des)
            des_mode[charging] = _CHARGING
        des_mode[idle & ~charging] = _STANDBY
        grid_kw = unit_kw - p_des if all_supplied else np.where(supplied, unit_kw - p_des, 0.0)
        # currents: unit phase currents (A) on its active feed
        act = np.maximum(self.active, 1) - 1
        v_ln = self.v_nom_ln * self.src_v_pu[act]
        i_ph = grid_kw[:, None] * self.phase_w * 1000.0 / (np.maximum(v_ln, 1.0)[:, None] * C.IT_POWER_FACTOR)
        i2 = (i_ph ** 2).sum(axis=1)
        r_contact = self._contact_r()[idx, act] * 1e-6
        contact_loss_kw = i2 * r_contact / 1000.0
        unit_in_kw = grid_kw + contact_loss_kw
        if not all_supplied:
            unit_in_kw = np.where(supplied, unit_in_kw, 0.0)
        # the segment of each unit on a feed (dark and islanded units are on none)
        seg = self.pdb_of[idx, act]
        if all_supplied:
            i_on, in_on = i_ph, unit_in_kw
        else:
            seg, i_on, in_on = seg[supplied], i_ph[supplied], unit_in_kw[supplied]
        np_ = self.np_
        # the three phases in one bincount (bin 3 * segment + phase): each bin still adds its units'
        # currents in unit order, as one bincount per phase does
        pdb_i = np.bincount((3 * seg[:, None] + self._ph_of_pdb).ravel(), weights=i_on.ravel(),
                            minlength=3 * np_).reshape(np_, 3)
        pdb_i2 = pdb_i ** 2
        r_joint, r_phase = self._joint_r_and_sum()
        seg_loss_kw = (pdb_i2 * r_phase).sum(axis=1) / 1000.0
        pdb_kw = np.bincount(seg, weights=in_on, minlength=np_) + seg_loss_kw
        src_kw = np.bincount(self._pdb_src, weights=pdb_kw, minlength=2)
        self._elec = {
            "demand_kw": demand, "unit_kw": unit_kw, "des_kw": p_des, "grid_kw": grid_kw, "i_ph": i_ph,
            "contact_loss_kw": contact_loss_kw, "pdb_i": pdb_i, "pdb_kw": pdb_kw, "seg_loss_kw": seg_loss_kw,
            "src_kw": src_kw, "it_kw": served_it, "r_joint": r_joint, "unserved_kw": unserved,
            "i2": i2, "pdb_i2": pdb_i2,  # squares reused by _thermal_steady_state
        }
        self.des_p_kw = p_des
        self._snapshot_cache = None

    def _contact_r(self) -> np.ndarray:
        r = self.contact_r0.copy()
        for d in self._degradations["contact"]:
            r[d.index, d.sub] *= 1.0 + d.gain * d.progress(self.t_s)
        return r

    def _joint_r(self) -> np.ndarray:
        r = self.joint_r0.copy()
        for d in self._degradations["joint"]:
            r[d.index, d.sub, d.joint] *= 1.0 + d.gain * d.progress(self.t_s)
        return r

    def _joint_r_and_sum(self) -> tuple[np.ndarray, np.ndarray]:
        """Joint resistances (ohm, np_ x 3 x joints) and each segment phase's resistance (segment + its
        joints, np_ x 3). Constant, hence computed once, when no joint degrades (faults are installed
        before the first step)."""
        if not self._degradations["joint"]:
            if self._r_joint_const is None:
                r = self._joint_r() * 1e-6
                self._r_joint_const = (r, self.seg_r_ohm[:, None] + r.sum(axis=2))
            return self._r_joint_const
        r = self._joint_r() * 1e-6
        return r, self.seg_r_ohm[:, None] + r.sum(axis=2)

    def _ambient(self, t: float) -> np.ndarray:
        tod = (self.scenario.start_time_of_day_s + t) % 86400.0
        amb = (C.AMBIENT_MEAN_DEGC + C.AMBIENT_DIURNAL_DEGC * math.cos(2 * math.pi * (tod - 16 * 3600.0) / 86400.0)
               + self.aisle_ambient_offset + self.aisle_ambient_walk)
        for a, start, end, rise in self._excursions:
            if start <= t <= end:
                ramp = min(1.0, (t - start) / 600.0, (end - t) / 600.0)
                amb[a] += rise * ramp
        return amb

    def _integrate_to(self, t_target: float) -> None:
        # tick events split the time into steps; between them the continuous state evolves exactly
        if t_target > self.t_s:
            self._integrate(t_target - self.t_s)
            self.t_s = t_target
            self._snapshot_cache = None

    def _integrate(self, dt: float) -> None:
        e = self._elec
        amb = self._ambient(self.t_s)
        # the wear of a contact set advances while it carries current (I^2 R heating, fretting)
        t_end = self.t_s + dt
        for d in self._degradations["contact"]:
            if d.load_gated and t_end > d.fault.precursor_start_s and self.supplied[d.index] \
                    and self.active[d.index] == d.sub + 1 and e["grid_kw"][d.index] > 0.0:
                d.loaded_s += t_end - max(self.t_s, d.fault.precursor_start_s)
        # a loosening joint degrades through its own I^2 R heating: it advances while its phase
        # carries current (above JOINT_WEAR_MIN_LOADING of the segment's rating)
        for d in self._degradations["joint"]:
            if d.load_gated and t_end > d.fault.precursor_start_s \
                    and e["pdb_i"][d.index, d.sub] > C.JOINT_WEAR_MIN_LOADING * self.pdb_rated_a[d.index]:
                d.loaded_s += t_end - max(self.t_s, d.fault.precursor_start_s)
        # joints and contacts: I^2 R heating with a first-order thermal lag (exact exponential update);
        # the closed contact set heats, the open one cools
        t_ss, t_ss_c, t_ss_b = self._thermal_steady_state(amb)
        self.joint_T = t_ss + (self.joint_T - t_ss) * math.exp(-dt / C.JOINT_TAU_S)
        self.contact_T = t_ss_c + (self.contact_T - t_ss_c) * math.exp(-dt / C.CONTACT_TAU_S)
        self.des_temp = t_ss_b + (self.des_temp - t_ss_b) * math.exp(-dt / C.DES_CELL_TAU_S)
        # storage: coulomb counting with converter and coulombic efficiency
        p = e["des_kw"]
        cap = np.maximum(self.des_cap_kwh * self.des_soh, 1e-9)
        dc_kw = np.where(p >= 0, p / C.DES_CONVERTER_EFFICIENCY,
                         p * C.DES_CONVERTER_EFFICIENCY * C.LI_ION_COULOMBIC_EFFICIENCY)
        # clip(soc, 0, 1) as minimum(maximum(soc, 0), 1): the same values (soc is never -0.0)
        soc = np.minimum(np.maximum(self.des_soc - dc_kw * dt / 3600.0 / cap, 0.0), 1.0)
        self.des_soc = np.where(self.has_des, soc, 0.0)
        ema_a = math.exp(-dt / 900.0)
        self.load_ema_kw = ema_a * self.load_ema_kw + (1 - ema_a) * e["unit_kw"]
        # totals (np.add.reduce: what ndarray.sum does, without its Python-level wrapper)
        total = np.add.reduce
        self.ledger.unserved_kwh += float(total(e["unserved_kw"])) * dt / 3600.0
        self._distribution_losses_kwh += float(total(e["seg_loss_kw"]) + total(e["contact_loss_kw"])) * dt / 3600.0
        self._energy_it_kwh += float(total(e["it_kw"])) * dt / 3600.0
        self._des_throughput_kwh += float(total(np.abs(p))) * dt / 3600.0
        # what the DES path wastes: discharging, the cells give p / eta for p delivered; charging, of
        # |p| drawn only |p| * eta * coulombic reaches the cells (the same factors as dc_kw above)
        self._conversion_losses_kwh += float(total(np.where(
            p >= 0, p * (1.0 / C.DES_CONVERTER_EFFICIENCY - 1.0),
            -p * (1.0 - C.DES_CONVERTER_EFFICIENCY * C.LI_ION_COULOMBIC_EFFICIENCY)))) * dt / 3600.0

    def _thermal_steady_state(self, amb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Temperatures that joints, contact sets and cells tend to at the present currents and ambient."""
        e = self._elec
        n = self.n
        p_joint = e["pdb_i2"][:, :, None] * e["r_joint"]
        t_joint = amb[self.pdb_aisle][:, None, None] + self._joint_rth * p_joint
        closed = np.zeros((n, 2), dtype=bool)
        closed[self._idx_n, np.maximum(self.active, 1) - 1] = self.supplied
        p_c = np.where(closed, e["i2"][:, None] * self._contact_r() * 1e-6, 0.0)
        amb_unit = amb[self.unit_aisle]
        t_contact = amb_unit[:, None] + self._contact_rth * p_c
        heat = (e["des_kw"] / self._des_pmax_floor) ** 2 * 6.0 * (self._battery_r() / self.des_r0)
        t_cell = amb_unit + 2.0 + heat
        return t_joint, t_contact, t_cell

    # ------------------------------------------------------------------------------------------
    # measurement
    def _measure(self) -> dict[str, dict[str, np.ndarray]]:
        e = self._elec
        t = self.t_s
        n = self.n
        nz = self._noise if self.measurement_noise else {}

        def noisy(values: np.ndarray, key: str, col: int, rel: float = 0.0, abs_: float = 0.0) -> np.ndarray:
            if not nz:
                return values
            z = nz[key][:, col] if values.ndim == 1 else nz[key][:, col][:, None]
            return values * (1.0 + rel * z) + abs_ * z

        # sources
        src_ok = self._src_ok()
        v_src = np.where(self.src_breaker, self.v_nom_ll * self.src_v_pu, 0.0)
        backup_d = np.zeros(2)
        for d in self._degradations["backup"]:
            backup_d[d.index] = max(backup_d[d.index], d.gain * d.progress(t))
        has_backup = self.backup_v0 > 0
        src = {
            "Voltage": noisy(v_src, "s", 0, rel=0.002),
            "Frequency": np.where(v_src > 0, noisy(np.full(2, self.freq_nom), "s", 1, abs_=0.01), 0.0),
            "ActivePower": noisy(e["src_kw"], "s", 2, rel=0.003),
            "RatedPower": self.src_rated_kw,
            "Loading": noisy(100.0 * e["src_kw"] / self.src_rated_kw, "s", 2, rel=0.003),
            "Available": src_ok,
            "BackupBatteryVoltage": noisy(self.backup_v0 * (1.0 - 0.03 * backup_d), "s", 3, rel=0.002),
            "BackupBatteryResistance": noisy(self.backup_r0 * (1.0 + backup_d), "s", 4, rel=0.03),
            "BackupBatteryTemperature": noisy(np.where(has_backup, 24.0 + 3.0 * backup_d, 0.0), "s", 5, abs_=0.3),
            "BackupReady": has_backup & (backup_d < 1.5),
        }
        # PDB segments
        seg_ok = self._seg_ok()
        pdb_i = e["pdb_i"]
        v_seg = np.where(seg_ok, self.v_nom_ll * self.src_v_pu[self.pdb_feed - 1], 0.0)
        v_seg = v_seg * (1.0 - pdb_i.max(axis=1) * self.seg_r_ohm / self.v_nom_ln)
        i_meas = noisy(pdb_i, "p", 0, rel=0.005)
        i_max = i_meas.max(axis=1)
        i_mean = i_meas.mean(axis=1)
        imbalance = np.where(i_mean > 0.5, 100.0 * np.abs(i_meas - i_mean[:, None]).max(axis=1)
                             / np.maximum(i_mean, 1e-9), 0.0)
        joint_phase_T = self.joint_T.max(axis=2)
        loading = 100.0 * pdb_i.max(axis=1) / self.pdb_rated_a
        thd = C.FEED_THD_BASE_PCT + C.FEED_THD_PER_LOADING_PCT * loading / 100.0
        for d in self._degradations["joint"]:  # an arcing joint adds harmonics late in its decline
            thd[d.index] += 1.5 * max(0.0, d.progress(t) - 0.5)
        amb = self._ambient(t)
        pdb = {
            "Feed": self.pdb_feed,
            "Voltage": noisy(v_seg, "p", 1, rel=0.002),
            "Current": i_max,
            "CurrentL1": i_meas[:, 0], "CurrentL2": i_meas[:, 1], "CurrentL3": i_meas[:, 2],
            "ActivePower": noisy(e["pdb_kw"], "p", 2, rel=0.004),
            "RatedCurrent": self.pdb_rated_a,
            "Loading": 100.0 * i_max / self.pdb_rated_a,
            "VoltageThd": np.where(seg_ok, noisy(thd, "p", 3, abs_=0.05), 0.0),
            "JointTemperature": noisy(joint_phase_T.max(axis=1), "p", 4, abs_=0.3),
            "JointTemperatureL1": noisy(joint_phase_T[:, 0], "p", 5, abs_=0.3),
            "JointTemperatureL2": noisy(joint_phase_T[:, 1], "p", 6, abs_=0.3),
            "JointTemperatureL3": noisy(joint_phase_T[:, 2], "p", 7, abs_=0.3),
            "PhaseImbalance": imbalance,
            "AmbientTemperature": noisy(amb[self.pdb_aisle], "p", 8, abs_=0.2),  # its own sensor's noise
            "Energized": seg_ok,
        }
        # micro-ATS
        state = np.full(n, int(AtsState.NORMAL))
        state[(self.des_mode == StorageMode.BRIDGING) & self.has_des] = int(AtsState.BRIDGING)
        state[~self.supplied & ~self.des_auto] = int(AtsState.OFFLINE)
        state[self.unit_fault] = int(AtsState.FAULT)
        v_units = np.where(seg_ok[self.pdb_of], v_seg[self.pdb_of], 0.0)
        active_idx = np.maximum(self.active, 1) - 1
        load_kw = e["unit_kw"]
        # the load bus voltage: the active feed's, or, islanded on the DES (no feed), the inverter's output
        v_bus = np.where(self.supplied, v_units[np.arange(n), active_idx],
                         np.where(self.des_auto, self.v_nom_ll * C.DES_INVERTER_OUTPUT_PU, self.v_nom_ll))
        load_a = load_kw * 1000.0 / (C.SQRT3 * np.maximum(v_bus, 1.0) * C.IT_POWER_FACTOR)
        r_c = self._contact_r()[np.arange(n), active_idx]
        ats = {
            "ActiveSource": np.where(self.supplied, self.active, NO_SOURCE),
            "PreferredSource": self.preferred,
            "State": state,
            "SourceAVoltage": noisy(v_units[:, 0], "u", 0, rel=0.002),
            "SourceBVoltage": noisy(v_units[:, 1], "u", 1, rel=0.002),
            "LoadPower": noisy(load_kw, "u", 2, rel=0.005),
            "LoadCurrent": noisy(load_a, "u", 2, rel=0.005),
            "ContactTemperature": noisy(self.contact_T[np.arange(n), active_idx], "u", 3, abs_=0.3),
            "ContactResistance": noisy(np.where(self.supplied, r_c, 0.0), "u", 4, rel=0.03),
            "TransferCount": self.transfer_count,
            "LastTransferTime": self.last_transfer_ms,
            "ActuatorResponseTime": self.actuator_measured_ms,
            "Position": self.position_ft,
            "RatedCurrent": self.unit_rated_a,
        }
        # DES
        fade = np.zeros(n)
        for d in self._degradations["battery"]:
            fade[d.index] = (0.12 + 0.1 * d.fault.severity) * d.progress(t)
        soh = np.clip(self.des_soh - fade, 0.0, 1.0)
        r_b = self._battery_r()
        remaining = np.where((self.des_mode == StorageMode.BRIDGING) & ~self.des_auto,
                             np.maximum(self.des_bridge_until - t, 0.0), 0.0)
        des = {
            "StateOfCharge": noisy(100.0 * self.des_soc, "u", 5, abs_=0.2),
            "EnergyCapacity": self.des_cap_kwh * soh,
            "ActivePower": self.des_p_kw,
            "MaxDischargePower": self._des_pmax_now(),
            "Mode": self.des_mode,
            "CellTemperature": noisy(self.des_temp, "u", 6, abs_=0.3),
            "StateOfHealth": 100.0 * soh,
            "InternalResistance": noisy(r_b, "u", 7, rel=0.02),
            "BridgeTimeRemaining": remaining,
        }
        return {"source": src, "pdb": pdb, "ats": ats, "des": des}

    def _device_index(self) -> dict[str, tuple[str, int]]:
        idx = getattr(self, "_devidx", None)
        if idx is None:
            idx = {name: ("source", i) for i, name in enumerate(self.source_names)}
            idx.update({name: ("pdb", i) for i, name in enumerate(self.pdb_names)})
            idx.update({name: ("ats", i) for i, name in enumerate(self.unit_names)})
            idx.update({name: ("des", i) for i, name in enumerate(self.des_names) if name})
            self._devidx = idx
        return idx

    # ------------------------------------------------------------------------------------------
    # ground truth (benchmarks and tests; see the module docstring)
    def true_flows(self) -> TrueFlows:
        """What really flows now: powers, currents, losses and unserved demand (no measurement noise)."""
        e = self._elec
        return TrueFlows(demand_kw=e["demand_kw"], unit_kw=e["unit_kw"], des_kw=e["des_kw"], grid_kw=e["grid_kw"],
                         it_kw=e["it_kw"], unserved_kw=e["unserved_kw"], contact_loss_kw=e["contact_loss_kw"],
                         pdb_i=e["pdb_i"], pdb_kw=e["pdb_kw"], seg_loss_kw=e["seg_loss_kw"], src_kw=e["src_kw"])

    def paths_alive(self, *, breakers: bool = True) -> np.ndarray:
        """(n, 2) bool: is each unit's path from SourceA / SourceB alive now (source in its ITIC
        steady-state band, segment's joint not open, contact set not failed, breakers closed)?

        breakers=False leaves tripped breakers out (counts them closed): then only faults kill a
        path, which no policy could have avoided; an overload trip is a policy's (or the local
        logic's) doing."""
        if breakers:
            return self._feed_ok()
        v = self.src_v_pu
        src = (v >= C.ATS_TOLERANCE_LOW_PU) & (v <= C.ATS_TOLERANCE_HIGH_PU)
        seg = src[self.pdb_feed - 1] & ~self.pdb_failed
        return seg[self.pdb_of] & ~self.pole_failed

    def des_available_kw(self) -> np.ndarray:
        """(n,) the power each DES could deliver now (0 without one, failed, or at its SoC floor;
        less as its internal resistance grows with battery fade)."""
        return self._des_pmax_now()

    def des_deliverable_kwh(self) -> np.ndarray:
        """(n,) the energy each DES could still deliver to its unit now: its charge above the SoC
        floor at its state of health, after converter and coulombic losses (0 without a DES)."""
        return (np.maximum(self.des_soc - self.des_soc_min, 0.0) * self.des_cap_kwh * self.des_soh
                * (C.DES_CONVERTER_EFFICIENCY * C.LI_ION_COULOMBIC_EFFICIENCY))

    def batch_job_factor(self, t_s: float) -> np.ndarray:
        """(aisles,) how far each aisle's scheduled batch job raises its load at plant time t_s,
        as a fraction of its base load (0 while none runs): the truth behind the load the CMCS sees."""
        return self._batch_factor(t_s)

    def unit_load_kw(self, u: int) -> float:
        """Unit u's load now: what it delivers, or its demand while it delivers nothing (dark)."""
        return self._unit_load_now(u)

    def worn_contact_sets(self) -> dict[tuple[str, float], int]:
        """Ground truth for benchmarks: (unit, scheduled onset) of each contact_wear fault -> the
        contact set (1 | 2, the source it connects) that it wears."""
        return {(d.fault.target, float(d.fault.onset_s)): d.sub + 1 for d in self._degradations["contact"]}

    def totals(self) -> dict:
        """Energy and ledger totals since start (for benchmarks)."""
        return {
            **self.ledger.summary(),
            # every loss the policies can change: distribution (I^2 R) plus DES conversion
            "losses_kwh": round(self._distribution_losses_kwh + self._conversion_losses_kwh, 6),
            "distribution_losses_kwh": round(self._distribution_losses_kwh, 6),
            "conversion_losses_kwh": round(self._conversion_losses_kwh, 6),
            "it_energy_kwh": round(self._energy_it_kwh, 6),
            "des_throughput_kwh": round(self._des_throughput_kwh, 6),
            "transfers": int(self.transfer_count.sum()),
        }


def _selection(value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a SourceSelection: {value!r}") from None
    if v not in (1, 2):
        raise ValueError(f"SourceSelection must be 1 (SourceA) or 2 (SourceB), got {v}")
    return v


def _py(v):
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


__all__ = ["DroppedLoad", "InterlockRefused", "Plant", "TrueFlows", "within_itic"]
