"""The CMCS decision: observations in, actions out (DESIGN.md: one pure function, two thin adapters).

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
   only after its risk stayed below `release_fraction` x threshold for `release_hold_s`).
   - PDB segment: its units move to the twin feed; where the twin (or the target source)
     would pass the derated limit, the unit's DES is pre-armed instead;
   - micro-ATS (worn contact set or slow actuator): DES pre-armed first (a transfer by a slow
     actuator would otherwise drop the load), then moved to its other pole;
   - source: DES pre-armed on the units it feeds, units moved to the other source within derating;
   - DES: nothing a transfer can fix; left to the operator (its unit is not relied upon).
   Every moved unit gets SetPreferredSource so that it does not return by itself onto the
   at-risk path, and balancing never moves a unit onto an at-risk component.
3. Balancing: when a segment's or source's forecast loading exceeds `balance_high_pct`, one unit
   per aisle and cycle moves to the lighter feed if that brings the two closer and keeps the
   target under `balance_target_pct`; a unit moved by the balancer is left alone for
   `balance_hold_s`, an aisle for `balance_cooldown_s` (hysteresis: it never flaps).

Every SwitchSource is filtered through `siteconfig.interlocks.check_switch` with the loads
projected after the actions already chosen this cycle, at a planning derating a little below
the command service's, so that the command service never refuses what the policy proposes.
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
    release_hold_s: float = 1800.0  # ... held this long
    act_on: tuple[str, ...] = ("source", "pdb", "ats")  # risk kinds that prompt actions
    confirm_cycles: int = 3  # risk must stay above the threshold this many cycles in a row (debounce)
    safe_start_cycles: int = 3
    planning_margin: float = 0.03  # plan transfers at derating - margin: measurement noise never trips the service
    prearm_power_kw: float = 0.25  # inverter online and synchronised, sharing a token load
    prearm_duration_s: float = 900.0
    rearm_before_s: float = 60.0  # re-arm when this little bridging time is left
    arm_soc_margin_pct: float = 15.0  # arm only above soc_min + this (a drained DES protects nothing)
    actuator_suspect_ratio: float = 1.3  # actuator response / aisle median above this: a slow actuator
    max_mitigation_moves: int = 64  # per cycle
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

    def ensure(self, n: int) -> None:
        if self.last_transfer_t is None or len(self.last_transfer_t) != n:
            self.last_transfer_t = np.full(n, -1e18)
            self.balance_hold_until = np.full(n, -1e18)
            self.last_transfer_count = None


# ---- the decision ---------------------------------------------------------------------------------

def _row(d: dict[str, np.ndarray], i: int) -> dict:
    return {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in d.items()}


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
        self.bridging_started: set[int] = set()

    def _names(self, kind):
        t = self.topo
        return {"source": t.source_names, "pdb": t.pdb_names, "ats": t.unit_names, "des": t.des_names}[kind]

    def draw_kw(self, u: int) -> float:
        p = float(self.ats["LoadPower"][u])
        if self.des is not None and self.topo.des_names[u]:
            p -= float(self.des["ActivePower"][u])
        return p

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
        des_ok = bool(t.des_names[u]) and self.des is not None
        if des_ok and not self.fresh["des"][u]:
            return False
        unit = _row(self.ats, u)
        storage = _row(self.des, u) if des_ok else None
        source = {"Available": bool(self.src["Available"][s]), "ActivePower": float(self.src_kw[s]),
                  "RatedPower": float(self.src["RatedPower"][s])}
        pdb = {"Current": float(self.pdb_a[p]), "RatedCurrent": float(self.pdb["RatedCurrent"][p])}
        since = self.obs.t_s - float(self.state.last_transfer_t[u])
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
        name = t.unit_names[u]
        self.actions.append(SwitchSource(name, target, reason, component))
        self.prefer(u, target, reason, component)

    def prefer(self, u: int, source: int, reason: str, component: str = "") -> None:
        if int(self.preferred[u]) == source or not self.unit_ok(u):
            return
        if not check_preferred(_row(self.ats, u), source).ok:
            return
        self.preferred[u] = source
        self.actions.append(SetPreferredSource(self.topo.unit_names[u], source, reason, component))

    def arm(self, u: int, reason: str, component: str = "") -> bool:
        """Keep unit u's DES online (bridging at a token power); True when it is or will be armed."""
        t, cfg = self.topo, self.cfg
        if not t.des_names[u] or self.des is None or not self.fresh["des"][u] or u in self.bridging_started:
            return False
        mode = int(self.des["Mode"][u])
        remaining = float(self.des["BridgeTimeRemaining"][u]) if "BridgeTimeRemaining" in self.des else 0.0
        if mode == StorageMode.BRIDGING and remaining > cfg.rearm_before_s:
            self.state.armed.add(u)
            return True
        if int(self.ats["State"][u]) in (AtsState.FAULT, AtsState.OFFLINE):
            return False
        if float(self.des["StateOfCharge"][u]) < float(t.des_soc_min_pct[u]) + cfg.arm_soc_margin_pct:
            return False
        power = min(cfg.prearm_power_kw, float(t.des_rated_kw[u]))
        if not check_start_bridging(_row(self.des, u), power, cfg.prearm_duration_s,
                                    rated_power_kw=float(t.des_rated_kw[u])).ok:
            return False
        self.actions.append(StartBridging(t.des_names[u], power, cfg.prearm_duration_s, reason, component))
        self.bridging_started.add(u)
        self.state.armed.add(u)
        return True


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
        # smallest loads first: more units fit under the derated limit; the rest ride on their DES
        for u in sorted(units, key=lambda u: float(plan.ats["LoadPower"][u])):
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
    act = np.asarray(plan.ats["ActuatorResponseTime"], float)
    act_med = np.array([np.nanmedian(act[topo.unit_aisle == a]) for a in range(int(topo.unit_aisle.max()) + 1)])
    for u in sorted(at_risk_ats):
        name = topo.unit_names[u]
        if plan.arm(u, "at-risk micro-ATS: DES pre-armed", name):
            keep_armed.add(u)
        slow_actuator = act[u] > config.actuator_suspect_ratio * act_med[topo.unit_aisle[u]]
        if not slow_actuator and int(active[u]) in (1, 2) and int(active[u]) == state.risky_pole.get(u):
            target = 3 - int(active[u])
            if plan.can_switch(u, target, at_risk_pdb, at_risk_src):
                plan.switch(u, target, "at-risk micro-ATS: moved to its other pole", name)
    # PDB segment at risk: its units to the twin feed
    for p in sorted(at_risk_pdb):
        units = [int(u) for u in np.flatnonzero(on_pdb == p)]
        feed = int(topo.pdb_feed[p])
        move_or_arm(units, lambda u, f=feed: 3 - f, "at-risk PDB segment: moved to the twin feed",
                    topo.pdb_names[p], at_risk_pdb, at_risk_src)
        # units already away whose preferred source points back onto the segment
        for u in np.flatnonzero((topo.pdb_of[np.arange(n), feed - 1] == p) & (plan.preferred == feed)
                                & (active == 3 - feed)):
            plan.prefer(int(u), 3 - feed, "at-risk PDB segment: keep away", topo.pdb_names[p])
    # source at risk: DES pre-armed on its units, units to the other source within derating
    for s in sorted(at_risk_src):
        units = [int(u) for u in np.flatnonzero(active == s + 1)]
        for u in units:
            if plan.arm(u, "at-risk source: DES pre-armed", topo.source_names[s]):
                keep_armed.add(u)
        move_or_arm(units, lambda u, s=s: 2 - s, "at-risk source: moved to the other source",
                    topo.source_names[s], at_risk_pdb, at_risk_src)
    # bridging no longer needed: hand the load back to the grid
    for u in sorted(state.armed - keep_armed):
        if plan.des is not None and int(plan.des["Mode"][u]) == StorageMode.BRIDGING and fresh["des"][u] \
                and float(plan.des["BridgeTimeRemaining"][u]) > 0:
            plan.actions.append(StopBridging(topo.des_names[u], "risk released"))
        state.armed.discard(u)
    state.armed |= keep_armed

    if config.balance:
        _balance(plan, topo, obs, state, config, at_risk_pdb, at_risk_src)
    for a in plan.actions:
        if isinstance(a, SwitchSource):
            state.last_transfer_t[topo.unit_names.index(a.unit)] = obs.t_s
    return plan.actions


def _balance(plan: _Plan, topo: Topology, obs: Observation, state: PolicyState, cfg: PolicyConfig,
             avoid_pdb: set[int], avoid_src: set[int]) -> None:
    """Relieve feeds whose forecast loading passes balance_high_pct, one unit per aisle and cycle."""
    n = topo.n
    lp = np.asarray(plan.ats["LoadPower"], float)
    fc = lp if obs.forecast_kw is None else np.where(np.isfinite(obs.forecast_kw), obs.forecast_kw, lp)
    growth = np.where(lp > 0.1, np.clip(fc / np.maximum(lp, 0.1), 0.5, 2.0), 1.0)
    amps = np.asarray(plan.ats["LoadCurrent"], float) * growth
    amps = np.where(np.isfinite(amps), amps, 0.0)
    draw = np.array([plan.draw_kw(u) for u in range(n)]) * growth
    active = plan.active
    ok_units = (active > 0) & plan.fresh["ats"]
    seg = np.where(ok_units, topo.pdb_of[np.arange(n), np.maximum(active, 1) - 1], -1)
    rated_a = np.asarray(plan.pdb["RatedCurrent"], float)
    rated_kw = np.asarray(plan.src["RatedPower"], float)
    # forecast loading (%): measured plus each unit's forecast change
    pdb_fc = plan.pdb_a + np.bincount(seg[seg >= 0], weights=(amps - np.asarray(plan.ats["LoadCurrent"], float))
                                      [seg >= 0], minlength=len(rated_a))
    src_fc = plan.src_kw + np.bincount(np.maximum(active[ok_units], 1) - 1,
                                       weights=(draw - np.array([plan.draw_kw(u) for u in range(n)]))[ok_units],
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
        units = np.flatnonzero((seg == p) & (state.balance_hold_until <= obs.t_s))
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
