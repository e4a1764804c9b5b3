"""The CMCS decision: observations in, actions out (docs/design.md: one pure function, two thin adapters).

`decide(obs, state, config)` is deterministic and does no I/O; its only memory is the
`PolicyState` the caller hands back each cycle. The mission benchmark (cmcs/mission.py) calls
it in simulated time with observations built from `Plant.snapshot()`; the live loop calls it
with observations built from OPC UA values (the same `{kind: {point: array}}` shape, device
order as in `Topology`, a `fresh` flag per device from the StatusCodes).

What it does, in order of priority:
1. Safe start: no action until the site's data has been fresh for `safe_start_cycles` cycles
   and one dwell time after a (re)start or a loss of the sources' / segments' data, and never an
   action that involves a device whose data is not fresh (its risk score is ignored too).
2. Mitigation: a component whose risk crosses its threshold is latched "at risk" (released
   only after its risk stayed below `release_fraction` x threshold for `release_hold_s`, 2 h:
   a degrading joint or contact does not heal, and a 15-min risk dips during a long precursor).
   - PDB segment: its units move to the twin feed, those whose DES cannot carry them first (a
     transfer is their only protection), then the smallest loads; where the twin (or its source)
     would pass the derated limit, the unit's DES is put online instead. The twin's source being
     at risk does not stop the move: a source outage is a clean < 5 ms transfer, an opening joint
     arcs for 15-80 ms before the unit can tell;
   - micro-ATS (worn contact set or slow actuator): DES online first, then, for a healthy
     actuator, moved to its other pole;
   - source: units moved to the other source within derating (never onto an at-risk segment),
     DES online on those that stay;
   - slow actuator (self-test far above its aisle's median, whether or not a model flagged it):
     never switched unless its DES is online and can carry it, DES kept online, and its preferred
     source set to the one it is on, so that no automatic return transfer drops the load;
   - DES: nothing a transfer can fix; left to the operator (its unit is not relied upon).
   A DES is only put online where it can carry its unit's load (MaxDischargePower >=
   `arm_carry_ratio` x LoadPower; once online it is kept so down to `keep_carry_ratio`, as a
   load swings by a batch job within minutes): power binds, and a too small DES protects
   nothing. A unit in FAULT (one contact set failed) still carrying its load on the other pole
   has a single path left and gets its DES online like any other.
   Every moved unit gets SetPreferredSource so that it does not return by itself onto the
   at-risk path, and balancing never moves a unit onto an at-risk component.
3. Overload relief: a source or segment whose loading (measured, or forecast if higher) passes
   `relief_start_pct` with no transfer to help (one source out and the hall above the other's
   rating; an aisle on one segment) is brought back under `relief_target_pct`: DES recharging on
   it are held online at the token power (no stored energy spent), then DES of the units it feeds
   discharge at real power (segments first, from their own units; a source from units on its least
   loaded segments; units protecting nothing first, the fullest first), down to
   `relief_min_soc_pct`; its breaker's inverse-time trip would drop every load on it. They are
   kept while the feed would be above the target without them, then handed back like any DES (as
   far as the feed has room for the recharge; a feed still under relief has none).
4. Balancing: when a segment's or source's forecast loading exceeds `balance_high_pct`, one unit
   per aisle and cycle moves to the lighter feed if that brings the two closer and keeps the
   target under `balance_target_pct`; a unit moved by the balancer is left alone for
   `balance_hold_s`, an aisle for `balance_cooldown_s` (hysteresis: it never flaps); slow units
   are never balanced.

Every SwitchSource is filtered through `siteconfig.interlocks.check_switch` with the loads
projected after the actions already chosen this cycle, at a planning derating a little below
the command service's, so that the command service never refuses what the policy proposes.
Cost: per-unit work is vectorised or runs on plain lists converted once per cycle; a 1,000-unit
site decides in a few ms (see `cmcs bench mission`, cycle_ms_*_1000_units).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from siteconfig.interlocks import check_preferred, check_start_bridging, check_switch
from siteconfig.model import AtsState, StorageMode

KINDS = ("source", "pdb", "ats", "des")


# ---- actions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SwitchSource:
    unit: str
    target: int  # SourceSelection 1 | 2
    reason: str = ""
    component: str = ""  # the at-risk component that prompted it ("" for balancing)


@dataclass(frozen=True)
class SetPreferredSource:
    unit: str
    source: int
    reason: str = ""
    component: str = ""


@dataclass(frozen=True)
class StartBridging:
    des: str
    power_kw: float
    duration_s: float
    reason: str = ""
    component: str = ""


@dataclass(frozen=True)
class StopBridging:
    des: str
    reason: str = ""
    component: str = ""


Action = SwitchSource | SetPreferredSource | StartBridging | StopBridging


# ---- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    """The static shape of the site, in the device order of observations."""

    source_names: tuple[str, ...]
    pdb_names: tuple[str, ...]
    unit_names: tuple[str, ...]
    des_names: tuple[str, ...]  # per unit; "" where the unit has no DES
    unit_aisle: np.ndarray  # (n,) aisle index
    pdb_of: np.ndarray  # (n, 2) PDB segment index of each unit on feed A / feed B
    pdb_feed: np.ndarray  # (np,) 1 | 2
    des_rated_kw: np.ndarray  # (n,) 0 where none
    des_soc_min_pct: np.ndarray  # (n,) the DES's lower SoC limit (the device refuses to bridge near it)
    des_capacity_kwh: np.ndarray  # (n,) 0 where none
    nominal_voltage_v: float
    dwell_time_s: float
    derating: float

    @classmethod
    def from_site(cls, site) -> "Topology":
        sources = sorted(site.sources, key=lambda s: int(s.selection))
        units = site.units
        aisle_of = {a.name: i for i, a in enumerate(site.aisles)}
        lookup = {(p.aisle, int(p.feed)): i for i, p in enumerate(site.pdbs)}
        return cls(
            source_names=tuple(s.name for s in sources),
            pdb_names=tuple(p.name for p in site.pdbs),
            unit_names=tuple(u.name for u in units),
            des_names=tuple(u.storage.name if u.storage else "" for u in units),
            unit_aisle=np.array([aisle_of[u.aisle] for u in units], dtype=np.int64),
            pdb_of=np.array([[lookup[(u.aisle, 1)], lookup[(u.aisle, 2)]] for u in units],
                            dtype=np.int64).reshape(len(units), 2),
            pdb_feed=np.array([int(p.feed) for p in site.pdbs], dtype=np.int64),
            des_rated_kw=np.array([u.storage.max_power_kw if u.storage else 0.0 for u in units]),
            des_soc_min_pct=np.array([u.storage.soc_min_pct if u.storage else 100.0 for u in units]),
            des_capacity_kwh=np.array([u.storage.capacity_kwh if u.storage else 0.0 for u in units]),
            nominal_voltage_v=float(site.nominal_voltage_v),
            dwell_time_s=float(site.gateway.dwell_time_s),
            derating=float(site.gateway.derating),
        )

    @property
    def n(self) -> int:
        return len(self.unit_names)


@dataclass
class Observation:
    """What the client sees this cycle.

    values: `{kind: {point: array over devices}}` (kinds source, pdb, ats, des; DES rows indexed
    by unit, as `Plant.snapshot()` and `FeatureState` use them); fresh: `{kind: bool array}`,
    True where every value of the device is Good and recent (missing: all fresh); risk:
    `{kind: array}` of risk scores (None: no risk information, e.g. models still warming up);
    forecast_kw: per-unit forecast load (None: use LoadPower)."""

    t_s: float
    values: dict[str, dict[str, np.ndarray]]
    fresh: dict[str, np.ndarray] | None = None
    risk: dict[str, np.ndarray] | None = None
    forecast_kw: np.ndarray | None = None


@dataclass
class PolicyConfig:
    topology: Topology | None = None  # the site's shape (Topology.from_site)
    variant: str = "ml"  # "threshold" | "ml" (only labels: the thresholds below carry the difference)
    thresholds: dict[str, float] = field(default_factory=lambda: {k: 0.5 for k in KINDS})
    release_fraction: float = 0.5  # release an at-risk latch below this share of the threshold ...
    release_hold_s: float = 7200.0  # ... held this long (a degrading joint or contact does not heal: the
    # 15-min risk of a long precursor dips between its rises, and a latch released then flaps back)
    act_on: tuple[str, ...] = ("source", "pdb", "ats")  # risk kinds that prompt actions
    confirm_cycles: int = 3  # risk must stay above the threshold this many cycles in a row (debounce)
    safe_start_cycles: int = 3
    planning_margin: float = 0.03  # plan transfers at derating - margin: measurement noise never trips the service
    prearm_power_kw: float = 0.1  # inverter online and synchronised, sharing a token load
    prearm_duration_s: float = 900.0
    rearm_before_s: float = 60.0  # re-arm when this little bridging time is left
    arm_soc_margin_pct: float = 15.0  # arm only above soc_min + this (a drained DES protects nothing)
    actuator_suspect_ratio: float = 1.3  # actuator response / aisle median above this: a slow actuator
    des_carry_margin: float = 1.05  # a DES "can carry" its unit when MaxDischargePower >= this x LoadPower
    guard_slow_units: bool = True  # slow actuator: DES kept online, no commanded or return transfer unprotected
    arm_carry_ratio: float = 0.9  # arm a DES whose MaxDischargePower >= this x LoadPower (it may carry at the moment)
    keep_carry_ratio: float = 0.75  # a DES the policy already keeps online stays online (re-armed) down to this
    # ratio: a unit's load swings by a batch job's +20-30 % within minutes, and the path may open when it is back
    # under the DES's power (hysteresis: a load peak at the moment of re-arming does not take the DES offline)
    move_off_at_risk_source: bool = False  # a source outage is a clean < 5 ms transfer for a healthy unit with a
    # live second path: moving every unit beforehand only adds transfers and loads the other source
    shave: bool = True  # DES on the twin discharge to make room there for units whose own DES cannot carry them
    shave_fraction: float = 0.8  # of min(MaxDischargePower, LoadPower)
    shave_min_soc_pct: float = 50.0  # a shaving DES stops below this SoC (it keeps enough to protect its own
    # unit), and starts only 10 points above it
    relieve: bool = True  # a source or segment heading past its rating with no transfer to help (the whole hall
    # on one source during an outage, at a load above one source's rating): DES of the units it feeds discharge
    relief_start_pct: float = 90.0  # ... when its loading (measured, or forecast if higher) passes this ...
    relief_target_pct: float = 85.0  # ... until it is back under this; they stay on while, without them, it
    # would be above this (hysteresis: a load just under the start does not switch them on and off)
    relief_min_soc_pct: float = 35.0  # a relieving DES stops below this SoC: a reserve for its own unit, lower than
    # shaving's (50 %), as the alternative is a trip that drops every load on the feed
    max_mitigation_moves: int = 64  # per cycle
    recharge_c_rate: float = 0.3  # a DES handed back to the grid recharges from its unit's feed at up to this
    # many kW per kWh of capacity (the simulated units: 0.3 C x health, simulator/constants.py; set it to the
    # site's chargers); it is released only where that fits under the planning limit (after a
    # source outage the whole hall sits on one source, and a dozen DES recharging at once pushed it past
    # its rating), else kept online at the token power until there is room
    balance: bool = True
    balance_high_pct: float = 75.0  # a feed above this forecast loading is relieved ...
    balance_target_pct: float = 65.0  # ... onto a twin that stays below this
    balance_hold_s: float = 3600.0  # a unit moved by the balancer stays put this long
    balance_cooldown_s: float = 300.0  # one balancing move per aisle (and per source pair) per this long
    max_balance_moves: int = 4  # per cycle, site-wide


@dataclass
class PolicyState:
    """The policy's memory between cycles (owned by the adapter, changed only by `decide`)."""

    fresh_cycles: int = 0
    fresh_since_t: float | None = None  # start of the current run of fresh cycles
    last_transfer_count: np.ndarray | None = None
    last_transfer_t: np.ndarray | None = None  # per unit, the time a transfer was last seen or commanded
    at_risk: dict[tuple[str, int], float] = field(default_factory=dict)  # (kind, index) -> time latched
    above: dict[str, np.ndarray] = field(default_factory=dict)  # consecutive cycles above threshold
    risky_pole: dict[int, int] = field(default_factory=dict)  # at-risk micro-ATS -> pole it was on when latched
    calm_since: dict[tuple[str, int], float] = field(default_factory=dict)
    balance_hold_until: np.ndarray | None = None
    aisle_cooldown_until: dict[int, float] = field(default_factory=dict)
    armed: set[int] = field(default_factory=set)  # units whose DES the policy keeps bridging
    shaving: dict[int, int] = field(default_factory=dict)  # unit -> at-risk segment its DES makes room for
    relieving: dict[int, tuple[int, int, str]] = field(default_factory=dict)  # unit -> (source, segment) its DES
    # was on when it started relieving an overload, and the source or segment it relieves
    worn_pole: dict[int, int] = field(default_factory=dict)  # unit -> contact set (pole) once found at risk: it
    # stays suspect after the latch is released (a worn contact set does not heal; only maintenance resets it)

    def active_mitigations(self) -> int:
        """Components latched at risk, plus sources and segments DES are relieving of an overload now."""
        return len(self.at_risk) + len({component for _, _, component in self.relieving.values()})

    def ensure(self, n: int) -> None:
        if self.last_transfer_t is None or len(self.last_transfer_t) != n:
            self.last_transfer_t = np.full(n, -1e18)
            self.balance_hold_until = np.full(n, -1e18)
            self.last_transfer_count = None


# ---- the decision ---------------------------------------------------------------------------------

def device_row(d: dict[str, np.ndarray], i: int) -> dict:
    """Device i's values out of one kind's columns of a snapshot ({point: array}), as plain Python
    numbers: the shape the interlock checks (siteconfig.interlocks) take."""
    return {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in d.items()}


def _group_nanmedian(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Median of x per group index (NaN ignored; NaN for an empty group), vectorised."""
    if len(x) == 0:
        return np.zeros(0)
    ng = int(group.max()) + 1
    order = np.lexsort((x, group))  # by group, then value; NaN last within a group
    xs = x[order]
    counts = np.bincount(group, minlength=ng)
    valid = np.bincount(group, weights=np.isfinite(x).astype(float), minlength=ng).astype(np.int64)
    starts = np.cumsum(counts) - counts
    lo = starts + np.maximum(valid - 1, 0) // 2
    hi = starts + np.maximum(valid, 1) // 2
    hi = np.where(valid > 0, starts + valid // 2, lo)
    med = 0.5 * (xs[np.minimum(lo, len(xs) - 1)] + xs[np.minimum(hi, len(xs) - 1)])
    return np.where(valid > 0, med, np.nan)


class _Rows:
    """Per-device point dicts for the interlock checks, built lazily from plain lists (a 1,000-unit
    site's arrays are converted once per cycle, only for the points the checks read)."""

    def __init__(self, d: dict[str, np.ndarray] | None, points: tuple[str, ...]):
        self.cols = {k: np.asarray(d[k]).tolist() for k in points if d is not None and k in d}
        self.cache: dict[int, dict] = {}

    def __getitem__(self, i: int) -> dict:
        r = self.cache.get(i)
        if r is None:
            r = self.cache[i] = {k: v[i] for k, v in self.cols.items()}
        return r


_UNIT_POINTS = ("State", "ActiveSource", "SourceAVoltage", "SourceBVoltage", "LoadPower", "LoadCurrent",
                "PreferredSource")
_DES_POINTS = ("Mode", "MaxDischargePower", "ActivePower", "StateOfCharge", "BridgeTimeRemaining")


class _Plan:
    """Projected loads as actions are added within one decision."""

    def __init__(self, topo: Topology, obs: Observation, cfg: PolicyConfig, state: PolicyState):
        v = obs.values
        self.topo, self.obs, self.cfg, self.state = topo, obs, cfg, state
        self.src = v["source"]
        self.pdb = v["pdb"]
        self.ats = v["ats"]
        self.des = v.get("des")
        self.src_kw = np.asarray(self.src["ActivePower"], float).copy()
        self.pdb_a = np.asarray(self.pdb["Current"], float).copy()
        self.active = np.asarray(self.ats["ActiveSource"], np.int64).copy()
        self.preferred = np.asarray(self.ats["PreferredSource"], np.int64).copy()
        fr = obs.fresh or {}
        self.fresh = {k: np.asarray(fr[k], bool) if k in fr else np.ones(len(self._names(k)), bool) for k in KINDS}
        self.actions: list[Action] = []
        self.moved: set[int] = set()
        self.switched: list[int] = []
        self.bridging_started: set[int] = set()
        self.unit_rows = _Rows(self.ats, _UNIT_POINTS)
        self.des_rows = _Rows(self.des, _DES_POINTS)
        self.src_available = np.asarray(self.src["Available"], bool).tolist()
        self.src_rated = np.asarray(self.src["RatedPower"], float).tolist()
        self.pdb_rated = np.asarray(self.pdb["RatedCurrent"], float).tolist()
        n = topo.n
        self.load_kw = np.asarray(self.ats["LoadPower"], float)
        self.has_des = np.array([bool(x) for x in topo.des_names]) & (self.des is not None)
        if self.des is not None:
            des_p = np.where(self.has_des, np.asarray(self.des["ActivePower"], float), 0.0)
            self.des_mode = np.asarray(self.des["Mode"], np.int64)
            self.des_pmax = np.where(self.has_des, np.asarray(self.des["MaxDischargePower"], float), 0.0)
        else:
            des_p = np.zeros(n)
            self.des_mode = np.full(n, int(StorageMode.FAULT))
            self.des_pmax = np.zeros(n)
        self.des_p = des_p
        self.draw = self.load_kw - des_p
        # a DES that can carry its unit's whole load (else bridging protects nothing: power binds)
        self.des_can_carry = self.has_des & self.fresh["des"] & (self.des_pmax >= cfg.des_carry_margin
                                                                 * np.maximum(self.load_kw, 0.0))
        self.des_online = self.des_can_carry & (self.des_mode == StorageMode.BRIDGING)
        self.des_may_carry = self.has_des & self.fresh["des"] & (self.des_pmax >= cfg.arm_carry_ratio
                                                                 * np.maximum(self.load_kw, 0.0))
        self.des_keep_carry = self.has_des & self.fresh["des"] & (self.des_pmax >= cfg.keep_carry_ratio
                                                                  * np.maximum(self.load_kw, 0.0))
        self.load_a_list = np.asarray(self.ats["LoadCurrent"], float).tolist()
        # each unit's current per kW of load, to project what its DES takes off or puts back onto its segment
        # (the site's figure where the unit's own is unknown)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.amps_per_kw = float(np.nan_to_num(np.nansum(self.ats["LoadCurrent"]) / np.nansum(self.load_kw)))
            a_per_kw = np.asarray(self.ats["LoadCurrent"], float) / np.maximum(self.load_kw, 0.1)
        self.a_per_kw = np.where((self.load_kw > 0.1) & np.isfinite(a_per_kw), a_per_kw, self.amps_per_kw)
        # each unit's forecast load (LoadPower where there is none)
        fc = obs.forecast_kw
        self.forecast_kw = self.load_kw if fc is None else np.where(np.isfinite(fc), fc, self.load_kw)
        self.has_des_list = self.has_des.tolist()
        self.des_fresh_list = self.fresh["des"].tolist()
        self.draw_list = self.draw.tolist()
        self.limit = t_limit = topo.derating - cfg.planning_margin
        self.src_limit = [t_limit * r for r in np.asarray(self.src["RatedPower"], float).tolist()]
        self.pdb_limit = [t_limit * r for r in np.asarray(self.pdb["RatedCurrent"], float).tolist()]
        # slow actuator (periodic self-test far above its aisle's median): any transfer may drop the load
        act = np.asarray(self.ats["ActuatorResponseTime"], float)
        med = _group_nanmedian(act, topo.unit_aisle)
        self.act_med = med
        with np.errstate(invalid="ignore"):
            self.slow = (act > cfg.actuator_suspect_ratio * med[topo.unit_aisle]) & self.fresh["ats"] if n \
                else np.zeros(0, bool)

    def _names(self, kind):
        t = self.topo
        return {"source": t.source_names, "pdb": t.pdb_names, "ats": t.unit_names, "des": t.des_names}[kind]

    def draw_kw(self, u: int) -> float:
        return float(self.draw[u])

    def unit_ok(self, u: int) -> bool:
        return bool(self.fresh["ats"][u])

    def can_switch(self, u: int, target: int, avoid_pdb: set[int], avoid_src: set[int]) -> bool:
        """check_switch with projected loads, at the planning derating; never onto an at-risk path."""
        t = self.topo
        if u in self.moved or not self.unit_ok(u):
            return False
        s, p = target - 1, int(t.pdb_of[u, target - 1])
        if p in avoid_pdb or s in avoid_src or not (self.fresh["source"][s] and self.fresh["pdb"][p]):
            return False
        if int(self.active[u]) == target or int(self.active[u]) not in (1, 2):
            return False
        if self.cfg.guard_slow_units and self.slow[u] and not self.des_online[u]:
            return False  # a slow actuator's transfer drops the load unless its DES is online
        des_ok = bool(t.des_names[u]) and self.des is not None
        if des_ok and not self.fresh["des"][u]:
            return False
        since = self.obs.t_s - float(self.state.last_transfer_t[u])
        # the cheap numeric checks first (the same as check_switch's), the full check for the survivors
        if since < t.dwell_time_s or self.src_kw[s] + self.draw_list[u] > self.src_limit[s] \
                or self.pdb_a[p] + self.load_a_list[u] > self.pdb_limit[p]:
            return False
        unit = self.unit_rows[u]
        storage = self.des_rows[u] if des_ok else None
        source = {"Available": self.src_available[s], "ActivePower": float(self.src_kw[s]),
                  "RatedPower": self.src_rated[s]}
        pdb = {"Current": float(self.pdb_a[p]), "RatedCurrent": self.pdb_rated[p]}
        verdict = check_switch(unit, target, source=source, pdb=pdb, storage=storage,
                               nominal_voltage_v=t.nominal_voltage_v,
                               derating=t.derating - self.cfg.planning_margin,
                               since_last_transfer_s=since, dwell_time_s=t.dwell_time_s)
        return verdict.ok

    def switch(self, u: int, target: int, reason: str, component: str = "") -> None:
        t = self.topo
        old = int(self.active[u])
        draw, amps = self.draw_kw(u), float(self.ats["LoadCurrent"][u])
        self.src_kw[target - 1] += draw
        self.src_kw[old - 1] -= draw
        self.pdb_a[t.pdb_of[u, target - 1]] += amps
        self.pdb_a[t.pdb_of[u, old - 1]] -= amps
        self.active[u] = target
        self.moved.add(u)
        self.switched.append(u)
        name = t.unit_names[u]
        self.actions.append(SwitchSource(name, target, reason, component))
        self.prefer(u, target, reason, component)

    def prefer(self, u: int, source: int, reason: str, component: str = "") -> None:
        if int(self.preferred[u]) == source or not self.unit_ok(u):
            return
        if not check_preferred(self.unit_rows[u], source).ok:
            return
        self.preferred[u] = source
        self.actions.append(SetPreferredSource(self.topo.unit_names[u], source, reason, component))

    def release(self, u: int, reason: str) -> bool:
        """Hand unit u's bridging DES back to the grid where its feed has room, under the planning limit, for
        what comes back: a shaving DES's output and the recharge (recharge_c_rate x capacity); a feed under
        overload relief has none. Where it has not,
        or the unit's data is stale, the DES stays online at the token power (a shaving DES is set back to it
        now); one that cannot (below its arming floor) is stopped anyway. True when it stays online."""
        t, cfg = self.topo, self.cfg
        token = min(cfg.prearm_power_kw, float(t.des_rated_kw[u]))
        out_kw = max(float(self.des_p[u]), 0.0)
        shaving = out_kw > token + 0.05  # discharging at real power; a token output is within the noise
        back_kw = (out_kw if shaving else 0.0) + cfg.recharge_c_rate * float(t.des_capacity_kwh[u])
        a = int(self.active[u])
        s, p = a - 1, int(t.pdb_of[u, max(a, 1) - 1])
        on_feed = a in (1, 2)
        # a feed under overload relief has no room, whatever its measured loading: that is the relievers'
        # output, and a recharge taken from it would only move energy from one DES to another (a reliever whose
        # data is stale is not counted: nothing says it still discharges, and it would block the feed for good)
        relieved = on_feed and any(f[2] in (t.source_names[s], t.pdb_names[p]) and self.fresh["des"][v]
                                   and self.fresh["ats"][v] for v, f in self.state.relieving.items())
        room = not on_feed or back_kw <= 0.0 or (not relieved and self.src_kw[s] + back_kw <= self.src_limit[s]
                                                 and self.pdb_a[p] + back_kw * self.a_per_kw[u] <= self.pdb_limit[p])
        kept = not (room and self.unit_ok(u)) and self.arm(
            u, "no room on its feed for the recharge: DES kept online", t.unit_names[u], protect=False, force=shaving)
        if not kept:
            self.actions.append(StopBridging(t.des_names[u], reason))
        returned_kw = (out_kw - token if shaving else 0.0) if kept else back_kw
        if on_feed:
            self.src_kw[s] += returned_kw
            self.pdb_a[p] += returned_kw * self.a_per_kw[u]
        return kept

    def discharge(self, u: int, reason: str, component: str) -> float:
        """Unit u's DES bridging at real power (shave_fraction of what it can give, at most its unit's load), to
        take load off its feed; the power commanded (0: none)."""
        t, cfg = self.topo, self.cfg
        power = round(cfg.shave_fraction * min(float(self.des_pmax[u]), float(self.load_kw[u])), 2)
        if power < 0.5 or u in self.bridging_started:
            return 0.0
        if self.unit_rows[u]["State"] in (AtsState.FAULT, AtsState.OFFLINE):
            return 0.0
        if not check_start_bridging(self.des_rows[u], power, cfg.prearm_duration_s,
                                    rated_power_kw=float(t.des_rated_kw[u])).ok:
            return 0.0
        self.actions.append(StartBridging(t.des_names[u], power, cfg.prearm_duration_s, reason, component))
        self.bridging_started.add(u)
        self.state.armed.add(u)
        return power

    def _token(self, u: int, reason: str, component: str) -> bool:
        """Command unit u's DES online at the token power (if the service would accept it)."""
        t, cfg = self.topo, self.cfg
        power = min(cfg.prearm_power_kw, float(t.des_rated_kw[u]))
        if not check_start_bridging(self.des_rows[u], power, cfg.prearm_duration_s,
                                    rated_power_kw=float(t.des_rated_kw[u])).ok:
            return False
        self.actions.append(StartBridging(t.des_names[u], power, cfg.prearm_duration_s, reason, component))
        self.bridging_started.add(u)
        self.state.armed.add(u)
        return True

    def hold(self, u: int, reason: str, component: str) -> bool:
        """Unit u's DES online at the token power only to stop its recharge (as long as it can give that)."""
        t = self.topo
        if not self.has_des_list[u] or not self.des_fresh_list[u] or u in self.bridging_started:
            return False
        if self.unit_rows[u]["State"] == AtsState.OFFLINE:
            return False
        if float(self.des_rows[u]["StateOfCharge"]) < float(t.des_soc_min_pct[u]) + 3.0:
            return False  # the device refuses to bridge within 1 point of its lower limit (margin for the noise)
        return self._token(u, reason, component)

    def arm(self, u: int, reason: str, component: str = "", protect: bool = True, force: bool = False) -> bool:
        """Keep unit u's DES online (bridging at a token power); True when it is or will be armed.
        protect=False: only to keep it from recharging (no need that it can carry the unit); force: command the
        token power now even if it is bridging with time left (a shaving DES back to the token power)."""
        t, cfg = self.topo, self.cfg
        if not self.has_des_list[u] or not self.des_fresh_list[u] or u in self.bridging_started:
            return False
        row = self.des_rows[u]
        remaining = float(row.get("BridgeTimeRemaining", 0.0))
        if row["Mode"] == StorageMode.BRIDGING and not force and (remaining > cfg.rearm_before_s
                                                                    or u in self.state.relieving):
            # online; a DES relieving an overload is re-armed at its discharge power by the relief (_relieve)
            self.state.armed.add(u)
            return True
        unit = self.unit_rows[u]
        # a unit in FAULT (one contact set failed) that still carries its load on the other pole has a single
        # path left: its DES is its only protection, so it is armed (only a unit with no supply is not)
        if unit["State"] == AtsState.OFFLINE or (unit["State"] == AtsState.FAULT
                                                 and int(unit["ActiveSource"]) not in (1, 2)):
            return False
        if protect and not (self.des_may_carry[u] or (u in self.state.armed and self.des_keep_carry[u])):
            return False  # too small (or derated) for the load: online, it would protect nothing
        if float(row["StateOfCharge"]) < float(t.des_soc_min_pct[u]) + cfg.arm_soc_margin_pct:
            return False
        return self._token(u, reason, component)


def _update_memory(topo: Topology, obs: Observation, state: PolicyState, cfg: PolicyConfig, fresh: dict) -> None:
    """Transfers seen (automatic ones count for the dwell time too) and the at-risk latches."""
    tc = np.asarray(obs.values["ats"]["TransferCount"], float)
    if state.last_transfer_count is not None:
        changed = (tc != state.last_transfer_count) & fresh["ats"]
        state.last_transfer_t[changed] = obs.t_s
    state.last_transfer_count = np.where(fresh["ats"], tc, state.last_transfer_count
                                         if state.last_transfer_count is not None else tc)
    if obs.risk is None:
        return
    for kind in cfg.act_on:
        r = obs.risk.get(kind)
        if r is None:
            continue
        r = np.asarray(r, float)
        thr = cfg.thresholds.get(kind, 0.5)
        ok = fresh[kind] if kind in fresh else np.ones(len(r), bool)
        above = (r >= thr) & ok & np.isfinite(r)
        prev = state.above.get(kind)
        count = np.where(above, (prev if prev is not None and len(prev) == len(r) else 0) + 1, 0)
        state.above[kind] = count
        for i in np.flatnonzero(count >= cfg.confirm_cycles):
            key = (kind, int(i))
            if key not in state.at_risk:
                state.at_risk[key] = obs.t_s
                if kind == "ats":
                    state.risky_pole[int(i)] = int(obs.values["ats"]["ActiveSource"][i])
                    if state.risky_pole[int(i)] in (1, 2):
                        state.worn_pole[int(i)] = state.risky_pole[int(i)]
            state.calm_since.pop(key, None)
        for key in list(state.at_risk):
            if key[0] != kind:
                continue
            ri = r[key[1]]
            if ok[key[1]] and np.isfinite(ri) and ri < cfg.release_fraction * thr:
                since = state.calm_since.setdefault(key, obs.t_s)
                if obs.t_s - since >= cfg.release_hold_s:
                    del state.at_risk[key]
                    del state.calm_since[key]
                    if kind == "ats":
                        state.risky_pole.pop(key[1], None)
            else:
                state.calm_since.pop(key, None)


def decide(obs: Observation, state: PolicyState, config: PolicyConfig) -> list[Action]:
    """The actions to take now, each one the command service would accept."""
    topo = config.topology
    if topo is None:
        raise ValueError("PolicyConfig.topology is not set (Topology.from_site(site))")
    n = topo.n
    state.ensure(n)
    plan = _Plan(topo, obs, config, state)
    fresh = plan.fresh
    site_fresh = bool(fresh["source"].all() and fresh["pdb"].all() and fresh["ats"].any())
    state.fresh_cycles = state.fresh_cycles + 1 if site_fresh else 0
    if not site_fresh or state.fresh_since_t is None:
        state.fresh_since_t = obs.t_s if site_fresh else None
    _update_memory(topo, obs, state, config, fresh)
    # advisory after a (re)start: N fresh cycles, and at least one dwell time, so that a transfer
    # made just before the start (which the policy could not see) has left its dwell time
    if (state.fresh_cycles <= config.safe_start_cycles
            or obs.t_s - state.fresh_since_t < topo.dwell_time_s):
        return []

    at_risk_pdb = {i for k, i in state.at_risk if k == "pdb"}
    at_risk_src = {i for k, i in state.at_risk if k == "source"}
    at_risk_ats = {i for k, i in state.at_risk if k == "ats"}
    active = plan.active
    on_pdb = np.where(active > 0, topo.pdb_of[np.arange(n), np.maximum(active, 1) - 1], -1)
    mitigation_moves = 0
    keep_armed: set[int] = set()

    def move_or_arm(units, target_of, reason, component, avoid_pdb, avoid_src):
        nonlocal mitigation_moves
        # units whose DES cannot carry them first (a transfer is their only protection), then the smallest
        # loads first (more units fit under the derated limit); the rest ride on their DES
        for u in sorted(units, key=lambda u: (bool(plan.des_can_carry[u]), float(plan.load_kw[u]))):
            target = target_of(u)
            if (mitigation_moves < config.max_mitigation_moves
                    and plan.can_switch(u, target, avoid_pdb, avoid_src)):
                plan.switch(u, target, reason, component)
                mitigation_moves += 1
            elif int(active[u]) in (1, 2) and int(active[u]) != target:
                if plan.arm(u, reason + " (no safe transfer: DES bridging)", component):
                    keep_armed.add(u)
            if int(active[u]) == target:
                plan.prefer(u, target, reason, component)

    # micro-ATS at risk: DES online first (a slow actuator's transfer would drop the load); a worn
    # contact set (the actuator is not the suspect) then leaves its pole for the other one
    for u in sorted(at_risk_ats):
        name = topo.unit_names[u]
        if plan.arm(u, "at-risk micro-ATS: DES pre-armed", name):
            keep_armed.add(u)
        slow_actuator = bool(plan.slow[u])
        if not slow_actuator and int(active[u]) in (1, 2) and int(active[u]) == state.risky_pole.get(u):
            target = 3 - int(active[u])
            # an at-risk source is acceptable here: its outage is a clean transfer (< 5 ms), a failing
            # contact set arcs (15-80 ms)
            if plan.can_switch(u, target, at_risk_pdb, set()):
                plan.switch(u, target, "at-risk micro-ATS: moved to its other pole", name)
    # a contact set once found worn, carrying the load again (e.g. after an automatic transfer while the
    # other source was out): its DES online, and back to the other pole as soon as that is safe
    for u, pole in sorted(state.worn_pole.items()):
        if u in at_risk_ats or int(active[u]) != pole or plan.slow[u] or not plan.unit_ok(u):
            continue
        name = topo.unit_names[u]
        if plan.arm(u, "worn contact set carrying the load again: DES online", name):
            keep_armed.add(u)
        if plan.can_switch(u, 3 - pole, at_risk_pdb, set()):
            plan.switch(u, 3 - pole, "worn contact set: back to the other pole", name)
    # PDB segment at risk: its units to the twin feed
    for p in sorted(at_risk_pdb):
        units = [int(u) for u in np.flatnonzero(on_pdb == p)]
        feed = int(topo.pdb_feed[p])
        # onto the twin even where the twin's source is at risk: a source outage is a clean transfer
        # (< 5 ms, inside ITIC), an opening joint arcs for 15-80 ms before the unit can tell
        move_or_arm(units, lambda u, f=feed: 3 - f, "at-risk PDB segment: moved to the twin feed",
                    topo.pdb_names[p], at_risk_pdb, set())
        if config.shave:
            _shave(plan, topo, config, state, p, units, on_pdb, keep_armed)
        # units already away whose preferred source points back onto the segment
        for u in np.flatnonzero((topo.pdb_of[np.arange(n), feed - 1] == p) & (plan.preferred == feed)
                                & (active == 3 - feed)):
            plan.prefer(int(u), 3 - feed, "at-risk PDB segment: keep away", topo.pdb_names[p])
    # source at risk: units to the other source within derating, DES pre-armed on those that stay
    # (slow actuators are only moved once their DES is online: can_switch)
    # (slow actuators are only moved once their DES is online: can_switch). By default only the units
    # for which the local transfer would not be clean act: no live second path -> DES online
    if at_risk_src:
        other = 3 - np.clip(active, 1, 2)
        v_other = np.where(other == 1, np.asarray(plan.ats["SourceAVoltage"], float),
                           np.asarray(plan.ats["SourceBVoltage"], float)) / topo.nominal_voltage_v
        seg_other = topo.pdb_of[np.arange(n), other - 1]
        energized = np.asarray(plan.pdb.get("Energized", np.ones(len(topo.pdb_names), bool)), bool)
        available = np.asarray(plan.src["Available"], bool)
        single_path = ~((v_other >= 0.9) & (v_other <= 1.1) & energized[seg_other] & available[other - 1])
    for s in sorted(at_risk_src):
        units = [int(u) for u in np.flatnonzero(active == s + 1) if int(u) not in plan.moved]
        if config.move_off_at_risk_source:
            move_or_arm(units, lambda u, s=s: 2 - s, "at-risk source: moved to the other source",
                        topo.source_names[s], at_risk_pdb, at_risk_src)
            continue
        for u in units:
            if single_path[u] and plan.arm(u, "at-risk source, no live second path: DES online",
                                           topo.source_names[s]):
                keep_armed.add(u)
    # slow actuator (measured by its self-test): keep its DES online so that any transfer the local
    # logic makes (a sag, an outage) rides through, and keep it where it is: its preferred source is set
    # to the present one, so that no "return to preferred source" transfer drops the load later
    if config.guard_slow_units:
        for u in np.flatnonzero(plan.slow & plan.fresh["ats"] & (plan.active > 0)):
            u = int(u)
            name = topo.unit_names[u]
            if plan.arm(u, "slow micro-ATS: DES kept online", name):
                keep_armed.add(u)
            if u not in plan.moved and int(plan.preferred[u]) != int(active[u]):
                plan.prefer(u, int(active[u]), "slow micro-ATS: stay on the present source", name)
    # shaving DES whose segment is no longer at risk, or that reached their floor, stop (below)
    for u, p in list(state.shaving.items()):
        if u not in keep_armed:
            del state.shaving[u]
    if config.relieve:
        _relieve(plan, topo, config, state, keep_armed)
    else:
        state.relieving.clear()
    # bridging no longer needed: hand the load back to the grid, as far as the feeds have room for the
    # DES's recharge (smallest first: more of them fit); the others stay online at the token power
    release = sorted(state.armed - keep_armed, key=lambda u: (float(topo.des_capacity_kwh[u]), u))
    for u in release:
        state.armed.discard(u)
        if plan.des is not None and int(plan.des["Mode"][u]) == StorageMode.BRIDGING and fresh["des"][u] \
                and float(plan.des["BridgeTimeRemaining"][u]) > 0:
            if plan.release(u, "risk released"):  # kept online at the token power
                keep_armed.add(u)
    state.armed |= keep_armed

    if config.balance:
        _balance(plan, topo, obs, state, config, at_risk_pdb, at_risk_src)
    for u in plan.switched:
        state.last_transfer_t[u] = obs.t_s
    return plan.actions


def _shave(plan: _Plan, topo: Topology, cfg: PolicyConfig, state: PolicyState, p: int, units: list,
           on_pdb: np.ndarray, keep_armed: set) -> None:
    """At-risk segment p still carries units whose DES cannot carry them and that found no room on
    the twin: DES of units on the twin discharge (bridging at real power) so that the twin's measured
    current and its source's power drop and the move passes the derated limit next cycle. Shaving
    DES stay on while p is at risk and above `shave_min_soc_pct`."""
    feed = int(topo.pdb_feed[p])
    target = 3 - feed
    s = target - 1
    active = plan.active
    left = [u for u in units if int(active[u]) == feed and not plan.des_can_carry[u] and plan.unit_ok(u)
            and u not in plan.moved and not (plan.slow[u] and not plan.des_online[u])]
    aisle_units = np.flatnonzero(topo.pdb_of[:, feed - 1] == p)
    if len(aisle_units) == 0:
        return
    twin = int(topo.pdb_of[aisle_units[0], target - 1])
    current = [u for u, q in state.shaving.items() if q == p]
    need_a = need_kw = 0.0
    if left:
        u0 = min(left, key=lambda u: plan.load_a_list[u])
        need_a = plan.pdb_a[twin] + plan.load_a_list[u0] - plan.pdb_limit[twin]
        need_kw = plan.src_kw[s] + plan.draw_list[u0] - plan.src_limit[s]
    des = plan.des
    if des is None or not (plan.fresh["pdb"][twin] and plan.fresh["source"][s]):
        return
    soc = np.asarray(des["StateOfCharge"], float)
    floor = np.maximum(cfg.shave_min_soc_pct, np.asarray(topo.des_soc_min_pct, float) + cfg.arm_soc_margin_pct)
    got_a = got_kw = 0.0
    # keep the present shavers (their effect is already in the measured current)
    for u in current:
        if soc[u] < floor[u] or int(active[u]) != target or not plan.fresh["des"][u]:
            continue
        keep_armed.add(u)
        if float(plan.des_rows[u].get("BridgeTimeRemaining", 0.0)) <= cfg.rearm_before_s:
            _start_shave(plan, topo, state, u, p)
    if need_a <= 0 and need_kw <= 0:
        return
    cands = [int(u) for u in np.flatnonzero((on_pdb == twin) & (active == target) & plan.has_des & plan.fresh["des"]
                                            & plan.fresh["ats"] & ~plan.slow)
             if int(u) not in state.shaving and int(u) not in state.relieving and int(u) not in plan.bridging_started
             and soc[int(u)] >= floor[int(u)] + 10.0]
    cands.sort(key=lambda u: -min(plan.des_pmax[u], plan.load_kw[u]))
    for u in cands:
        if got_a >= 1.1 * need_a and got_kw >= 1.1 * need_kw:
            break
        power = _start_shave(plan, topo, state, u, p)
        if power > 0:
            keep_armed.add(u)
            extra = power - max(float(des["ActivePower"][u]), 0.0)
            got_a += extra * plan.a_per_kw[u]
            got_kw += extra


def _start_shave(plan: _Plan, topo: Topology, state: PolicyState, u: int, p: int) -> float:
    seg = topo.pdb_names[int(topo.pdb_of[u, int(plan.active[u]) - 1])]
    power = plan.discharge(u, f"DES shaves {seg} to make room for units of at-risk {topo.pdb_names[p]} their own "
                              f"DES cannot carry", topo.pdb_names[p])
    if power > 0:
        state.shaving[u] = p
    return power


def _relieve(plan: _Plan, topo: Topology, cfg: PolicyConfig, state: PolicyState, keep_armed: set) -> None:
    """Overload relief: a source or PDB segment whose loading (measured, or the forecast if higher) passes
    relief_start_pct has DES of the units it feeds discharge at real power (bridging, shave_fraction of what
    each can give) until it is projected back under relief_target_pct. No transfer is involved: it is what
    is left when the other feed is gone or full (a source outage at a load above one source's rating, an
    aisle on one segment after a joint failure); the breaker's inverse-time trip would drop every load on it.
    Segments come first, as only their own units can relieve them; a source is relieved by units on its
    least loaded segments, keeping the DES of a heavy segment for when it needs them. A relieving DES stays on
    while its feed, without the relief, would be above relief_target_pct (as few as that needs), above
    relief_min_soc_pct; then it is handed back like any other (release: as far as the feed has room for its
    recharge, else kept online at the token power)."""
    des = plan.des
    if des is None:
        state.relieving.clear()
        return
    n = topo.n
    active = plan.active
    on = (active > 0) & plan.fresh["ats"]
    src = np.where(on, np.maximum(active, 1) - 1, -1)
    seg = np.where(on, topo.pdb_of[np.arange(n), np.maximum(active, 1) - 1], -1)
    a_per_kw = plan.a_per_kw
    d_kw = plan.forecast_kw - plan.load_kw
    d_kw = np.where(on & np.isfinite(d_kw), d_kw, 0.0)
    n_src, n_pdb = len(topo.source_names), len(topo.pdb_names)
    rated_kw = np.asarray(plan.src["RatedPower"], float)
    rated_a = np.maximum(np.asarray(plan.pdb["RatedCurrent"], float), 1e-9)
    soc = np.asarray(des["StateOfCharge"], float)
    floor = np.maximum(cfg.relief_min_soc_pct, np.asarray(topo.des_soc_min_pct, float) + cfg.arm_soc_margin_pct)
    energy = (soc - floor) * np.asarray(topo.des_capacity_kwh, float)
    out = np.maximum(plan.des_p, 0.0)
    ok_s, ok_p = src >= 0, seg >= 0

    def per_src(w):
        return np.bincount(src[ok_s], weights=w[ok_s], minlength=n_src)

    def per_seg(w):
        return np.bincount(seg[ok_p], weights=w[ok_p], minlength=n_pdb)

    # forecast growth per feed (only upwards: relief is for peaks)
    grow_kw, grow_a = np.maximum(per_src(d_kw), 0.0), np.maximum(per_seg(d_kw * a_per_kw), 0.0)
    target_kw = cfg.relief_target_pct / 100.0 * rated_kw
    target_a = cfg.relief_target_pct / 100.0 * rated_a
    # the present relievers that may go on (still on the feed they relieve, their data fresh, above their floor)
    live = [u for u, f in state.relieving.items()
            if src[u] == f[0] and seg[u] == f[1] and plan.fresh["des"][u] and soc[u] >= floor[u]
            and int(plan.des_mode[u]) == StorageMode.BRIDGING]
    # a reliever whose data is stale is neither kept nor handed back: it is decided on once it is fresh again
    stale = {u for u in state.relieving if not (plan.fresh["des"][u] and plan.fresh["ats"][u])}
    rel = np.zeros(n)
    rel[live] = out[live]
    # each feed's load without the relief
    base_kw = plan.src_kw + per_src(rel) + grow_kw
    base_a = plan.pdb_a + per_seg(rel * a_per_kw) + grow_a
    seg_pct = base_a / rated_a
    # keep as few as the feeds still need: each segment's own first (fullest first), then for the source those
    # on its least loaded segments
    keep: set[int] = set()
    got_kw, got_a = np.zeros(n_src), np.zeros(n_pdb)
    for u in sorted(live, key=lambda u: -energy[u]):
        if base_a[seg[u]] - got_a[seg[u]] > target_a[seg[u]]:
            keep.add(u)
            got_a[seg[u]] += out[u] * a_per_kw[u]
            got_kw[src[u]] += out[u]
    for u in sorted(live, key=lambda u: (seg_pct[seg[u]], -energy[u])):
        if u not in keep and base_kw[src[u]] - got_kw[src[u]] > target_kw[src[u]]:
            keep.add(u)
            got_kw[src[u]] += out[u]
    left_kw = plan.src_kw + grow_kw  # the loading after this cycle's decisions
    left_a = plan.pdb_a + grow_a
    for u in list(state.relieving):
        if u in stale:
            keep_armed.add(u)
            continue
        if u in keep:
            keep_armed.add(u)
            if float(plan.des_rows[u].get("BridgeTimeRemaining", 0.0)) <= cfg.rearm_before_s:
                component = state.relieving[u][2]
                _start_relief(plan, topo, state, u, f"overload relief: {component}: DES kept discharging",
                              component)
            continue
        del state.relieving[u]
        back = out[u] - min(cfg.prearm_power_kw, float(topo.des_rated_kw[u]))
        if src[u] >= 0 and back > 0:  # what comes back to the feed (a DES handed back adds its recharge: release)
            left_kw[src[u]] += back
            left_a[seg[u]] += back * a_per_kw[u]
            plan.src_kw[src[u]] += back
            plan.pdb_a[seg[u]] += back * a_per_kw[u]
        if u in keep_armed and u not in plan.bridging_started and not plan.arm(
                u, "overload relieved: DES back to the token power", topo.unit_names[u], protect=False, force=True):
            plan.actions.append(StopBridging(topo.des_names[u], "overload relieved; below its arming floor"))
    start = cfg.relief_start_pct / 100.0
    hot_p = (left_a > start * rated_a) & plan.fresh["pdb"]
    hot_s = (left_kw > start * rated_kw) & plan.fresh["source"]
    if not (hot_p.any() or hot_s.any()):
        return
    # DES recharging on a feed past the start (handed back before, or back from carrying a unit that lost its
    # feeds) are held online at the token power first: that relief costs no stored energy
    for u in np.flatnonzero(on & plan.has_des & plan.fresh["des"] & (plan.des_p < -0.05)):
        u = int(u)
        if (hot_s[src[u]] or hot_p[seg[u]]) and plan.hold(u, "overload: DES recharge held", topo.unit_names[u]):
            keep_armed.add(u)
            left_kw[src[u]] += plan.des_p[u]
            left_a[seg[u]] += plan.des_p[u] * a_per_kw[u]
    # feeds past the start: more relievers, units protecting nothing first, the fullest first; segments first
    cands = [int(u) for u in np.flatnonzero(on & plan.has_des & plan.fresh["des"] & ~plan.slow
                                            & (soc >= floor + 5.0) & (plan.des_mode != StorageMode.FAULT))
             if int(u) not in state.relieving and int(u) not in state.shaving and int(u) not in plan.bridging_started]
    cands.sort(key=lambda u: (u in keep_armed, -energy[u]))

    def start_on(u: int, component: str, reason: str) -> None:
        power = _start_relief(plan, topo, state, u, reason, component)
        if power > 0:
            keep_armed.add(u)
            extra = power - out[u]
            left_kw[src[u]] -= extra
            left_a[seg[u]] -= extra * a_per_kw[u]

    for u in cands:
        p = int(seg[u])
        if hot_p[p] and left_a[p] > target_a[p]:
            start_on(u, topo.pdb_names[p], f"overload relief: {topo.pdb_names[p]} above {cfg.relief_start_pct:.0f} % "
                                           f"of its rating")
    cands.sort(key=lambda u: (round(float(left_a[seg[u]] / rated_a[seg[u]]), 2), u in keep_armed, -energy[u]))
    for u in cands:
        s_ = int(src[u])
        if u not in state.relieving and hot_s[s_] and left_kw[s_] > target_kw[s_]:
            start_on(u, topo.source_names[s_], f"overload relief: {topo.source_names[s_]} above "
                                               f"{cfg.relief_start_pct:.0f} % of its rating")


def _start_relief(plan: _Plan, topo: Topology, state: PolicyState, u: int, reason: str, component: str) -> float:
    power = plan.discharge(u, reason, component)
    if power > 0:
        a = int(plan.active[u])
        state.relieving[u] = (a - 1, int(topo.pdb_of[u, a - 1]), component)
    return power


def _balance(plan: _Plan, topo: Topology, obs: Observation, state: PolicyState, cfg: PolicyConfig,
             avoid_pdb: set[int], avoid_src: set[int]) -> None:
    """Relieve feeds whose forecast loading passes balance_high_pct, one unit per aisle and cycle."""
    n = topo.n
    lp, fc = plan.load_kw, plan.forecast_kw
    growth = np.where(lp > 0.1, np.clip(fc / np.maximum(lp, 0.1), 0.5, 2.0), 1.0)
    amps = np.asarray(plan.ats["LoadCurrent"], float) * growth
    amps = np.where(np.isfinite(amps), amps, 0.0)
    draw = plan.draw * growth
    active = plan.active
    ok_units = (active > 0) & plan.fresh["ats"]
    seg = np.where(ok_units, topo.pdb_of[np.arange(n), np.maximum(active, 1) - 1], -1)
    rated_a = np.asarray(plan.pdb["RatedCurrent"], float)
    rated_kw = np.asarray(plan.src["RatedPower"], float)
    # forecast loading (%): measured plus each unit's forecast change
    pdb_fc = plan.pdb_a + np.bincount(seg[seg >= 0], weights=(amps - np.asarray(plan.ats["LoadCurrent"], float))
                                      [seg >= 0], minlength=len(rated_a))
    src_fc = plan.src_kw + np.bincount(np.maximum(active[ok_units], 1) - 1,
                                       weights=(draw - plan.draw)[ok_units],
                                       minlength=2)
    pdb_pct = 100.0 * pdb_fc / rated_a
    src_pct = 100.0 * src_fc / rated_kw
    moves = 0
    for p in np.argsort(-pdb_pct):
        p = int(p)
        heavy_src = int(topo.pdb_feed[p]) - 1
        if moves >= cfg.max_balance_moves:
            break
        if pdb_pct[p] <= cfg.balance_high_pct and src_pct[heavy_src] <= cfg.balance_high_pct:
            continue
        if p in avoid_pdb:
            continue  # its units are the mitigation's business
        units = np.flatnonzero((seg == p) & (state.balance_hold_until <= obs.t_s) & ~plan.slow)
        if len(units) == 0:
            continue
        aisle = int(topo.unit_aisle[units[0]])
        if state.aisle_cooldown_until.get(aisle, -1e18) > obs.t_s:
            continue
        target = 3 - int(topo.pdb_feed[p])
        twin = int(topo.pdb_of[units[0], target - 1])
        gap = pdb_pct[p] - pdb_pct[twin]
        if gap <= 0:
            continue
        best, best_score = None, None
        for u in units:
            u = int(u)
            d_pct = 100.0 * amps[u] / rated_a[p]
            d_twin = 100.0 * amps[u] / rated_a[twin]
            d_src = 100.0 * draw[u] / rated_kw[target - 1]
            if pdb_pct[twin] + d_twin > cfg.balance_target_pct or src_pct[target - 1] + d_src > cfg.balance_target_pct:
                continue
            new_gap = abs((pdb_pct[p] - d_pct) - (pdb_pct[twin] + d_twin))
            if new_gap >= gap:
                continue  # must bring the pair closer, or it would flap back
            if best_score is None or new_gap < best_score:
                best, best_score = u, new_gap
        if best is None or not plan.can_switch(best, target, avoid_pdb, avoid_src):
            continue
        plan.switch(best, target, f"balancing: {topo.pdb_names[p]} forecast {pdb_pct[p]:.0f} %")
        pdb_pct[p] -= 100.0 * amps[best] / rated_a[p]
        pdb_pct[twin] += 100.0 * amps[best] / rated_a[twin]
        src_pct[heavy_src] -= 100.0 * draw[best] / rated_kw[heavy_src]
        src_pct[target - 1] += 100.0 * draw[best] / rated_kw[target - 1]
        state.balance_hold_until[best] = obs.t_s + cfg.balance_hold_s
        state.aisle_cooldown_until[aisle] = obs.t_s + cfg.balance_cooldown_s
        moves += 1
