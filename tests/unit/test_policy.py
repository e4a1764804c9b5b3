"""The CMCS policy: never proposes what the command service would refuse, safe start, stale data."""

from __future__ import annotations

import numpy as np
import pytest

from cmcs.mission import _apply
from cmcs.policy import (Observation, PolicyConfig, PolicyState, SetPreferredSource, StartBridging, StopBridging,
                         SwitchSource,
                         Topology, decide)
from siteconfig.demo import demo_site
from siteconfig.model import StorageMode
from simulator.plant import InterlockRefused, Plant
from simulator.scenario import Fault, LoadProfile, Scenario


@pytest.fixture(scope="module")
def site():
    return demo_site()


def _obs(plant, t, risk=None, fresh=None):
    return Observation(t_s=t, values=plant.snapshot(), risk=risk, fresh=fresh)


def _zero_risk(topo):
    return {"source": np.zeros(2), "pdb": np.zeros(len(topo.pdb_names)), "ats": np.zeros(topo.n),
            "des": np.zeros(topo.n)}



def _eager_config(topo, rng) -> PolicyConfig:
    """A policy with random balancing limits, no hold, cooldown or debounce: it acts as often as it can."""
    return PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                        balance_high_pct=float(rng.uniform(40, 80)), balance_target_pct=float(rng.uniform(40, 75)),
                        balance_cooldown_s=0.0, balance_hold_s=0.0, confirm_cycles=1, safe_start_cycles=0)

def test_never_proposes_a_refused_action_over_random_states(site):
    """Random loads, random manual transfers (dwell times running), random risk: every action passes
    the command service's interlocks on the plant, in order, and the device accepts it."""
    topo = Topology.from_site(site)
    proposed = 0
    for seed in range(24):
        rng = np.random.default_rng(seed)
        sc = Scenario(duration_s=3600.0, seed=seed,
                      load=LoadProfile(scale=float(rng.uniform(0.8, 1.3)), noise_pct=3.0, batch_probability=1.0))
        plant = Plant(site, sc)
        cfg = _eager_config(topo, rng)
        state = PolicyState()
        t = float(rng.uniform(30, 300))
        plant.advance_to(t)
        for cycle in range(10):
            # an operator (or the local logic) moves units behind the policy's back
            for u in rng.choice(topo.n, size=int(rng.integers(0, 4)), replace=False):
                try:
                    plant.command(topo.unit_names[u], "SwitchSource", Target=int(rng.integers(1, 3)))
                except InterlockRefused:
                    pass
            t += float(rng.choice([1.0, 5.0, 10.0, 10.0]))
            plant.advance_to(t)
            risk = {k: (rng.random(len(v)) < 0.15) * rng.uniform(0.5, 1.0, len(v))
                    for k, v in _zero_risk(topo).items()}
            for a in decide(_obs(plant, t, risk), state, cfg):
                proposed += 1
                idx = {n: i for i, n in enumerate(topo.unit_names)}
                didx = {n: i for i, n in enumerate(topo.des_names) if n}
                reason = _apply(plant, topo, a, idx, didx, InterlockRefused)
                assert reason == "", f"seed {seed} t {t}: {a} refused: {reason}"
    assert proposed > 50  # the property was exercised


def test_safe_start_then_action(site):
    """Advisory (no action) for the first cycles after a start; then an at-risk segment's units move."""
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=600.0, seed=3))
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")})
    state = PolicyState()
    risk = _zero_risk(topo)
    p = topo.pdb_names.index("PDB-02-A")
    risk["pdb"][p] = 0.9
    first_action_t = None
    for k in range(1, 12):
        plant.advance_to(10.0 * k)
        actions = decide(_obs(plant, 10.0 * k, risk), state, cfg)
        if actions and first_action_t is None:
            first_action_t = 10.0 * k
    assert first_action_t is not None and first_action_t >= 10.0 * (cfg.safe_start_cycles + 1)
    assert first_action_t - 10.0 >= topo.dwell_time_s  # one dwell time of fresh data too


def test_no_action_on_stale_data(site):
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=600.0, seed=5))
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                       confirm_cycles=1)
    risk = _zero_risk(topo)
    p = topo.pdb_names.index("PDB-01-A")
    risk["pdb"][p] = 0.95
    aisle1 = [u for u in range(topo.n) if topo.pdb_of[u, 0] == p]
    # the at-risk segment's units are stale: nothing may touch them
    state = PolicyState()
    fresh = {"source": np.ones(2, bool), "pdb": np.ones(len(topo.pdb_names), bool),
             "ats": np.ones(topo.n, bool), "des": np.ones(topo.n, bool)}
    fresh["ats"][aisle1] = False
    fresh["des"][aisle1] = False
    for k in range(1, 10):
        plant.advance_to(10.0 * k)
        actions = decide(_obs(plant, 10.0 * k, risk, fresh), state, cfg)
        touched = {getattr(a, "unit", None) or getattr(a, "des", None) for a in actions}
        assert not touched & ({topo.unit_names[u] for u in aisle1} | {topo.des_names[u] for u in aisle1})
    # a stale segment: its own risk score is not acted upon
    state = PolicyState()
    fresh = {k: np.ones_like(v, dtype=bool) for k, v in _zero_risk(topo).items()}
    fresh["pdb"][p] = False
    for k in range(10, 20):
        plant.advance_to(10.0 * k)
        assert decide(_obs(plant, 10.0 * k, risk, fresh), state, cfg) == []  # site data not all fresh
    # Bad data on the sources: advisory again, and safe start begins anew when it returns
    state = PolicyState()
    fresh = {k: np.ones_like(v, dtype=bool) for k, v in _zero_risk(topo).items()}
    acted = []
    for k in range(20, 40):
        plant.advance_to(10.0 * k)
        f = dict(fresh)
        f["source"] = np.array([k % 10 != 0, True])  # one stale cycle every 100 s
        acted.append(bool(decide(_obs(plant, 10.0 * k, risk, f), state, cfg)))
    # k = 20 and 30 stale: cycles k+1 .. k+3 are advisory (N = 3 fresh cycles and one dwell time)
    assert not any(acted[0:4]) and not any(acted[10:14])
    assert any(acted)


def test_at_risk_segment_moves_units_with_preferred_source(site):
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=600.0, seed=7))
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                       confirm_cycles=1, safe_start_cycles=0)
    state = PolicyState()
    risk = _zero_risk(topo)
    p = topo.pdb_names.index("PDB-03-B")
    risk["pdb"][p] = 0.9
    actions = []
    for k in range(1, 6):
        plant.advance_to(10.0 * k)
        actions += decide(_obs(plant, 10.0 * k, risk), state, cfg)
    moved = {a.unit for a in actions if isinstance(a, SwitchSource)}
    armed = {a.des for a in actions if isinstance(a, StartBridging)}
    preferred = {a.unit for a in actions if isinstance(a, SetPreferredSource) and a.source == 1}
    assert moved or armed
    assert all(a.target == 1 for a in actions if isinstance(a, SwitchSource))
    assert moved <= preferred


def _decide_and_apply(plant, topo, state, cfg, risk, cycles) -> list:
    """One policy cycle every 10 s (from t = 40 s): decide, apply; no action may be refused."""
    actions = []
    for k in cycles:
        t = 30.0 + 10.0 * k
        plant.advance_to(t)
        acts = decide(_obs(plant, t, risk), state, cfg)
        assert all(r == "" for r in _apply_all(plant, topo, acts))
        actions += acts
    return actions


def _apply_all(plant, topo, actions):
    idx = {n: i for i, n in enumerate(topo.unit_names)}
    didx = {n: i for i, n in enumerate(topo.des_names) if n}
    return [_apply(plant, topo, a, idx, didx, InterlockRefused) for a in actions]


def test_never_refused_with_stale_devices_slow_actuators_and_drained_storage(site):
    """Randomised: stale devices, slow actuators (self-test readings), forecasts off by +-30 %, DES
    bridging or drained; every proposed action passes the command service's checks, none touches a
    stale device, and a slow unit is only ever switched while its DES is online and able to carry it."""
    topo = Topology.from_site(site)
    proposed = 0
    for seed in range(100, 116):
        rng = np.random.default_rng(seed)
        sc = Scenario(duration_s=3600.0, seed=seed,
                      load=LoadProfile(scale=float(rng.uniform(0.8, 1.3)), noise_pct=3.0, batch_probability=1.0))
        plant = Plant(site, sc)
        slow = rng.choice(topo.n, size=4, replace=False)
        plant.actuator_measured_ms[slow] *= 4.0  # the self-test shows a slow actuator (until its next one)
        for u in rng.choice(topo.n, size=3, replace=False):
            plant.des_soc[u] = plant.des_soc_min[u] + 0.005  # drained
        cfg = _eager_config(topo, rng)
        state = PolicyState()
        t = float(rng.uniform(30, 300))
        plant.advance_to(t)
        for cycle in range(10):
            t += float(rng.choice([1.0, 5.0, 10.0, 10.0]))
            plant.advance_to(t)
            risk = {k: (rng.random(len(v)) < 0.2) * rng.uniform(0.5, 1.0, len(v)) for k, v in _zero_risk(topo).items()}
            fresh = {k: rng.random(len(v)) > 0.1 for k, v in _zero_risk(topo).items()}
            fresh["source"][:] = True
            fresh["pdb"][:] = True
            snap = plant.snapshot()
            lp = np.asarray(snap["ats"]["LoadPower"], float)
            obs = Observation(t_s=t, values=snap, risk=risk, fresh=fresh,
                              forecast_kw=lp * rng.uniform(0.7, 1.3, topo.n))
            actions = decide(obs, state, cfg)
            for a in actions:
                if getattr(a, "unit", None):
                    assert fresh["ats"][topo.unit_names.index(a.unit)], f"{a} on a stale unit"
                if getattr(a, "des", None):
                    assert fresh["des"][topo.des_names.index(a.des)], f"{a} on a stale DES"
                act = np.asarray(snap["ats"]["ActuatorResponseTime"], float)
                u = topo.unit_names.index(a.unit) if getattr(a, "unit", None) else -1
                aisle_med = np.median(act[topo.unit_aisle == topo.unit_aisle[u]]) if u >= 0 else 0.0
                if isinstance(a, SwitchSource) and act[u] > cfg.actuator_suspect_ratio * aisle_med:
                    assert snap["des"]["Mode"][u] == StorageMode.BRIDGING
                    assert snap["des"]["MaxDischargePower"][u] >= snap["ats"]["LoadPower"][u]
            proposed += len(actions)
            reasons = _apply_all(plant, topo, actions)
            assert all(r == "" for r in reasons), [(a, r) for a, r in zip(actions, reasons) if r]
    assert proposed > 30


def test_slow_actuator_is_kept_on_its_source_with_its_des_online(site):
    """A slow actuator (self-test 4x its aisle's median): its DES is armed (it can carry the load) and its
    preferred source follows the active one, so that no return transfer drops the load."""
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=900.0, seed=21, load=LoadProfile(scale=0.8)))
    u = topo.unit_names.index("MATS-02-02")  # a 15 kW DES, a light load
    plant.actuator_measured_ms[u] *= 4.0
    plant.advance_to(60.0)
    plant.command(topo.unit_names[u], "SwitchSource", Target=2)
    plant.command(topo.unit_names[u], "SetPreferredSource", Source=1)  # it would return to A in 300 s
    cfg = PolicyConfig(topology=topo, safe_start_cycles=0)
    state = PolicyState()
    actions = []
    for k in range(1, 12):
        t = 60.0 + 10.0 * k
        plant.advance_to(t)
        acts = decide(_obs(plant, t, _zero_risk(topo)), state, cfg)
        assert all(r == "" for r in _apply_all(plant, topo, acts))
        actions += acts
    assert any(isinstance(a, StartBridging) and a.des == topo.des_names[u] for a in actions)
    assert any(isinstance(a, SetPreferredSource) and a.unit == topo.unit_names[u] and a.source == 2 for a in actions)
    assert not any(isinstance(a, SwitchSource) and a.unit == topo.unit_names[u] for a in actions)
    plant.advance_to(1000.0)
    assert plant.active[u] == 2  # no return transfer


def test_no_flapping_under_random_noisy_loads(site):
    """Randomised heavy, noisy loads (balancing alone): no unit is switched twice within the balancing
    hold, never back and forth, and the site-wide number of moves stays small."""
    topo = Topology.from_site(site)
    for seed in range(3):
        rng = np.random.default_rng(500 + seed)
        plant = Plant(site, Scenario(duration_s=4000.0, seed=500 + seed,
                                     load=LoadProfile(scale=float(rng.uniform(1.05, 1.25)), noise_pct=8.0,
                                                      drift_pct=6.0, batch_probability=1.0, batch_magnitude=0.35)))
        cfg = PolicyConfig(topology=topo, act_on=(), safe_start_cycles=0, balance_hold_s=1800.0,
                           balance_cooldown_s=300.0)
        state = PolicyState()
        last: dict[str, float] = {}
        moves = 0
        for k in range(1, 300):
            t = 10.0 * k
            plant.advance_to(t)
            snap = plant.snapshot()
            lp = np.asarray(snap["ats"]["LoadPower"], float)
            obs = Observation(t_s=t, values=snap, forecast_kw=lp * (1.0 + rng.normal(0.0, 0.1, topo.n)))
            acts = decide(obs, state, cfg)
            assert all(r == "" for r in _apply_all(plant, topo, acts))
            for a in acts:
                if isinstance(a, SwitchSource):
                    assert t - last.get(a.unit, -1e18) >= cfg.balance_hold_s, f"{a.unit} flapped"
                    last[a.unit] = t
                    moves += 1
        assert moves <= 12


def test_des_on_the_twin_makes_room_for_units_without_protection(site):
    """A heavy hall, PDB-01-A at risk: the twin is too full for a unit whose own DES cannot carry it;
    DES on the twin discharge (real power, within their limits) until it fits, and it moves."""
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=900.0, seed=31, load=LoadProfile(scale=1.4, batch_probability=0.0)))
    cfg = PolicyConfig(topology=topo, safe_start_cycles=0, confirm_cycles=1)
    state = PolicyState()
    p = topo.pdb_names.index("PDB-01-A")
    risk = _zero_risk(topo)
    risk["pdb"][p] = 0.9
    actions = _decide_and_apply(plant, topo, state, cfg, risk, range(1, 20))
    shaves = [a for a in actions if isinstance(a, StartBridging) and a.power_kw >= 0.5]
    assert shaves, "no DES made room on the twin"
    assert all(topo.pdb_of[topo.des_names.index(a.des), 1] == p + 1 for a in shaves)  # on the twin PDB-01-B
    snap = plant.snapshot()
    for u in np.flatnonzero(topo.pdb_of[:, 0] == p):
        cannot_carry = snap["des"]["MaxDischargePower"][u] < cfg.des_carry_margin * snap["ats"]["LoadPower"][u]
        assert not (cannot_carry and plant.active[u] == 1), f"{topo.unit_names[u]} left on the at-risk segment"
    # with the segment no longer at risk (after the hold), the shaving stops
    cfg.release_hold_s = 0.0
    risk["pdb"][p] = 0.0
    stopped = [a.des for a in _decide_and_apply(plant, topo, state, cfg, risk, range(20, 24))
               if isinstance(a, StopBridging)]
    assert {a.des for a in shaves} <= set(stopped)


def test_unit_in_fault_still_carrying_its_load_gets_its_des_online(site):
    """A failed contact set puts the unit in FAULT, but it still carries its load on the other pole: a single
    path left, its DES is its only protection. When that path's segment goes at risk, the DES goes online
    (and is kept online: re-armed before its bridging time runs out), and the command service accepts it."""
    from simulator.scenario import Fault

    topo = Topology.from_site(site)
    u = topo.unit_names.index("MATS-02-04")  # 6 kW on a 10 kW DES; preferred source B
    sc = Scenario(duration_s=3600.0, seed=5, faults=(Fault("contact_wear", "MATS-02-04", onset_s=30.0, pole=2),))
    plant = Plant(site, sc)
    plant.advance_to(100.0)
    assert plant.unit_fault[u] and plant.active[u] == 1 and plant.supplied[u]
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                       confirm_cycles=1, safe_start_cycles=0, balance=False)
    state = PolicyState()
    risk = _zero_risk(topo)
    risk["pdb"][topo.pdb_names.index("PDB-02-A")] = 0.9
    started, stopped = [], []
    for k in range(1, 100):  # 990 s: longer than one bridging window (900 s)
        t = 100.0 + 10.0 * k
        plant.advance_to(t)
        acts = decide(_obs(plant, t, risk), state, cfg)
        assert all(r == "" for r in _apply_all(plant, topo, acts))
        started += [a for a in acts if isinstance(a, StartBridging) and a.des == "DES-02-04"]
        stopped += [a for a in acts if isinstance(a, StopBridging) and a.des == "DES-02-04"]
    assert len(started) >= 2, "the DES of a unit in FAULT on its last path was not (re-)armed"
    assert not stopped
    assert plant.des_mode[u] == StorageMode.BRIDGING


def _quiet_plant_and_config(site):
    """A fresh demo plant at t = 60 s and an eager policy config without balancing (no debounce, no safe start)."""
    topo = Topology.from_site(site)
    plant = Plant(site, Scenario(duration_s=600.0, seed=3))
    plant.advance_to(60.0)
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                       confirm_cycles=1, safe_start_cycles=0, balance=False)
    return topo, plant, cfg


def _snapshot_copy(plant) -> dict:
    """The plant's snapshot with its own arrays, to be edited into a hand-made observation."""
    return {k: {kk: np.array(vv, copy=True) for kk, vv in v.items()} for k, v in plant.snapshot().items()}


def _bridging_snapshot(plant, u: int, des_kw: float, remaining_s: float, s: int, source_loading: float) -> dict:
    """A snapshot with unit u's DES bridging at des_kw with remaining_s left, and source s at source_loading."""
    snap = _snapshot_copy(plant)
    snap["des"]["Mode"][u] = int(StorageMode.BRIDGING)
    snap["des"]["ActivePower"][u] = des_kw
    snap["des"]["BridgeTimeRemaining"][u] = remaining_s
    snap["source"]["ActivePower"][s] = source_loading * float(snap["source"]["RatedPower"][s])
    return snap


def _running_state(**kw) -> PolicyState:
    """Policy memory past its safe start."""
    return PolicyState(fresh_cycles=10, fresh_since_t=-1e6, **kw)


def test_des_kept_online_through_a_load_peak_at_re_arming(site):
    """Hysteresis: a DES the policy keeps online is re-armed while its power is >= keep_carry_ratio x the
    load (a batch job's peak at the moment of re-arming does not take it offline); one that is not online
    yet is armed only from arm_carry_ratio x the load."""
    topo, plant, cfg = _quiet_plant_and_config(site)
    u = topo.unit_names.index("MATS-02-04")
    p = int(topo.pdb_of[u, int(plant.active[u]) - 1])
    risk = _zero_risk(topo)
    risk["pdb"][p] = 0.9
    twin = int(topo.pdb_of[u, 2 - int(plant.active[u])])
    risk["pdb"][twin] = 0.9  # both segments at risk: no transfer, the DES is the protection

    def obs(bridging: bool):
        snap = _snapshot_copy(plant)
        pmax = float(snap["des"]["MaxDischargePower"][u])
        snap["ats"]["LoadPower"][u] = pmax / 0.8  # between keep_carry_ratio (0.75) and arm_carry_ratio (0.9)
        if bridging:
            snap["des"]["Mode"][u] = int(StorageMode.BRIDGING)
            snap["des"]["BridgeTimeRemaining"][u] = 30.0  # about to run out: re-arm now
        return Observation(t_s=60.0, values=snap, risk=risk)

    def armed(actions):
        return any(isinstance(a, StartBridging) and a.des == topo.des_names[u] for a in actions)

    assert armed(decide(obs(True), _running_state(armed={u}), cfg))
    assert not armed(decide(obs(False), _running_state(), cfg))


def _hall_on_one_source_then_release(site, recharge_c_rate: float):
    """Source A out for 10 min with every DES online (token bridging, as the policy keeps them for an at-risk
    source) and drained to 60 %; at 130 % load the whole hall on B is at about 89 % of its rating. After the
    outage the risk is gone and the policy hands the DES back. Returns the highest true loading of either
    source, second by second, the DES released, and all DES."""
    topo = Topology.from_site(site)
    sc = Scenario(duration_s=3600.0, seed=11, load=LoadProfile(scale=1.3, diurnal_amplitude=0.0, batch_probability=0.0),
                  faults=(Fault("source_outage", "SourceA", onset_s=100.0, precursor_s=0.0, severity=1.0,
                                duration_s=600.0),))
    plant = Plant(site, sc)
    plant.advance_to(120.0)
    with_des = [u for u in range(topo.n) if topo.des_names[u]]
    acts = [StartBridging(topo.des_names[u], 0.1, 900.0, "test: at-risk source") for u in with_des]
    assert all(r == "" for r in _apply_all(plant, topo, acts))
    plant.des_soc[with_des] = 0.6
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                       balance=False, recharge_c_rate=recharge_c_rate)
    state = _running_state(armed=set(with_des))
    released, peak = set(), 0.0
    for t in np.arange(710.0, 2400.0, 10.0):
        acts = decide(_obs(plant, t, _zero_risk(topo)), state, cfg)
        assert all(r == "" for r in _apply_all(plant, topo, acts))
        released |= {a.des for a in acts if isinstance(a, StopBridging)}
        for s in range(1, 11):
            plant.advance_to(t + s)
            peak = max(peak, float((plant.true_flows().src_kw / plant.src_rated_kw).max()))
    return peak, released, {topo.des_names[u] for u in with_des}


def test_des_handed_back_only_as_far_as_the_feed_has_room_for_its_recharge(site):
    """After a source outage the whole hall is on one source; a DES handed back to the grid recharges from
    it. Released all at once (recharge not planned: c-rate 0), the recharge pushes that source past its
    rating; paced by the room under the planning limit, it never does, and every DES is still handed back
    once the units have returned to their preferred source."""
    peak_all_at_once, released_all_at_once, all_des = _hall_on_one_source_then_release(site, recharge_c_rate=0.0)
    assert peak_all_at_once > 1.0, "the test case does not overload the source: it proves nothing"
    assert len(released_all_at_once) >= len(all_des) - 2  # a slow unit's DES stays online (slow-actuator guard)
    peak, released, _ = _hall_on_one_source_then_release(site, recharge_c_rate=PolicyConfig.recharge_c_rate)
    assert peak < 1.0
    assert released == released_all_at_once


def test_a_shaving_des_without_room_to_hand_back_returns_to_the_token_power_at_once(site):
    """A DES discharging at real power (shaving for an at-risk twin) whose work is done: where its feed has
    room for what comes back (its output and its recharge) it is stopped; where it has not, it is set back to
    the token power at once (not left discharging until its bridging time runs out), and stays online."""
    topo, plant, cfg = _quiet_plant_and_config(site)
    u = topo.unit_names.index("MATS-01-01")
    s = int(plant.active[u]) - 1

    def decide_with(source_loading):
        snap = _bridging_snapshot(plant, u, 4.0, 600.0, s, source_loading)
        state = _running_state(armed={u}, shaving={u: 0})
        acts = [a for a in decide(Observation(t_s=60.0, values=snap, risk=_zero_risk(topo)), state, cfg)
                if getattr(a, "des", None) == topo.des_names[u]]
        return acts, state

    acts, state = decide_with(0.40)
    assert [type(a) for a in acts] == [StopBridging] and u not in state.armed
    acts, state = decide_with(0.76)  # under the planning limit, but not with 4 kW and the recharge on top
    assert len(acts) == 1 and isinstance(acts[0], StartBridging) and acts[0].power_kw <= cfg.prearm_power_kw
    assert u in state.armed


def _outage_above_one_source_rating(site, relieve: bool):
    """Source A out for 15 min at 150 % load: the whole hall on B is about 114 % of its rating, and no transfer
    can help. The policy runs every 10 s (no risk, no balancing). Returns the highest true loading of any source
    or segment second by second from 20 s after the outage began (one cycle to see it), the feed-seconds above
    100 %, the dropped loads and the overload-relief commands."""
    topo = Topology.from_site(site)
    sc = Scenario(duration_s=2400.0, seed=5, load=LoadProfile(scale=1.5, diurnal_amplitude=0.0, batch_probability=0.0),
                  faults=(Fault("source_outage", "SourceA", onset_s=300.0, precursor_s=0.0, severity=1.0,
                                duration_s=900.0),))
    plant = Plant(site, sc)
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")}, balance=False,
                       relieve=relieve)
    state = _running_state()
    peak, over, relief, soc_low = 0.0, 0, [], 1.0
    for t in np.arange(10.0, 2100.0, 10.0):
        acts = decide(_obs(plant, t, _zero_risk(topo)), state, cfg)
        assert all(r == "" for r in _apply_all(plant, topo, acts))
        relief += [a for a in acts if isinstance(a, StartBridging) and a.reason.startswith("overload relief")]
        for s in range(1, 11):
            plant.advance_to(t + s)
            e = plant.true_flows()
            loading = max(float((e.src_kw / plant.src_rated_kw).max()),
                          float((e.pdb_i.max(axis=1) / plant.pdb_rated_a).max()))
            over += loading > 1.0
            if t + s >= 320.0:
                peak = max(peak, loading)
        if state.relieving:
            soc_low = min(soc_low, float(plant.des_soc[list(state.relieving)].min()))
    if relieve:
        # the outage ended at 1200 s, the units were back on their preferred source 300 s later: by 2100 s every
        # DES is handed back (none discharging above the token power)
        assert not state.relieving and (plant.true_flows().des_kw <= cfg.prearm_power_kw + 1e-6).all()
        assert soc_low >= cfg.relief_min_soc_pct / 100.0 - 0.02  # none drained below the relief's floor
    return peak, over, int(plant.totals()["dropped_loads"]), relief


def test_des_relieve_a_source_that_no_transfer_can_keep_under_its_rating(site):
    """With one source out and the hall above the other's rating, the breaker's inverse-time trip would drop
    every load on it. DES of the units it feeds discharge until it is under the relief target, within one
    cycle of the overload; without the relief the same case passes 100 % and drops loads."""
    peak, over, dropped, relief = _outage_above_one_source_rating(site, relieve=False)
    assert peak > 1.05 and over > 60 and dropped > 0, "the test case does not overload the source: it proves nothing"
    assert not relief
    peak, over, dropped, relief = _outage_above_one_source_rating(site, relieve=True)
    assert peak < 0.95  # back at the relief target (85 %) give or take the load's noise
    assert over <= 10 and dropped == 0  # at most the seconds before the next cycle
    assert relief and all(a.power_kw > PolicyConfig.prearm_power_kw for a in relief)


def test_des_recharging_on_an_overloaded_feed_are_held_before_any_stored_energy_is_spent(site):
    """The whole hall on source B at about 98 % of its rating, eight DES recharging on it (handed back earlier,
    or back from carrying their unit): they are held online at the token power, which takes their recharge
    (about 2 kW each) off the source without spending stored energy; only what is still missing is asked of
    DES at real power. One at its lower SoC limit is left alone (the device would refuse), and every command
    is accepted."""
    topo = Topology.from_site(site)
    sc = Scenario(duration_s=1800.0, seed=5, load=LoadProfile(scale=1.37, diurnal_amplitude=0.0, batch_probability=0.0),
                  faults=(Fault("source_outage", "SourceA", onset_s=30.0, precursor_s=0.0, severity=1.0,
                                duration_s=1200.0),))
    plant = Plant(site, sc)
    recharging = [topo.unit_names.index(f"MATS-0{a}-0{k}") for a in (1, 2, 3, 4) for k in (2, 5)]
    low = recharging[-1]
    plant.des_soc[recharging] = 0.5
    plant.des_soc[low] = plant.des_soc_min[low] + 0.005
    plant.advance_to(60.0)
    e = plant.true_flows()
    assert (e.des_kw[recharging] < -1.0).all(), "the DES are not recharging: the test proves nothing"
    rated = float(plant.src_rated_kw[1])
    before_kw = float(e.src_kw[1])
    assert before_kw > PolicyConfig.relief_start_pct / 100.0 * rated
    recharge_kw = -float(e.des_kw[[u for u in recharging if u != low]].sum())
    cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")}, balance=False)
    acts = decide(_obs(plant, 60.0, _zero_risk(topo)), _running_state(), cfg)
    held = {a.des for a in acts if isinstance(a, StartBridging) and a.reason.startswith("overload: DES recharge held")}
    assert held == {topo.des_names[u] for u in recharging if u != low}
    assert all(a.power_kw <= cfg.prearm_power_kw for a in acts if isinstance(a, StartBridging) and a.des in held)
    relief_kw = sum(a.power_kw for a in acts if isinstance(a, StartBridging) and a.des not in held)
    # real power only for what the holds leave above the target (with a DES's worth of rounding up)
    assert relief_kw <= max(0.0, before_kw - recharge_kw - cfg.relief_target_pct / 100.0 * rated) + 12.0
    assert all(r == "" for r in _apply_all(plant, topo, acts))
    plant.advance_to(65.0)
    held_units = [topo.des_names.index(d) for d in held]
    assert (plant.true_flows().des_kw[held_units] >= 0.0).all()  # no longer recharging
    assert (plant.true_flows().des_kw[low] < 0.0)  # still recharging


def test_a_relieving_des_that_also_protects_its_unit_is_re_armed_once_and_never_stopped(site):
    """A DES relieving an overloaded source whose unit is also protected by it (both its segments at risk: no
    transfer, the DES is the protection), with 30 s of bridging left: while the source is still overloaded it
    is re-armed at its discharge power (not cut to the token power by the protection); once the source is
    back under the target, set back to the token power, and never stopped in either case."""
    topo, plant, cfg = _quiet_plant_and_config(site)
    u = topo.unit_names.index("MATS-01-01")
    s = int(plant.active[u]) - 1
    p = int(topo.pdb_of[u, s])
    risk = _zero_risk(topo)
    risk["pdb"][topo.pdb_of[u]] = 0.9

    def decide_with(source_loading):
        snap = _bridging_snapshot(plant, u, 6.0, 30.0, s, source_loading)
        state = _running_state(armed={u}, relieving={u: (s, p, topo.source_names[s])})
        acts = [a for a in decide(Observation(t_s=60.0, values=snap, risk=risk), state, cfg)
                if getattr(a, "des", None) == topo.des_names[u]]
        return acts, state

    acts, state = decide_with(0.95)
    assert len(acts) == 1 and isinstance(acts[0], StartBridging) and acts[0].power_kw > cfg.prearm_power_kw
    assert u in state.relieving and u in state.armed
    acts, state = decide_with(0.40)
    assert len(acts) == 1 and isinstance(acts[0], StartBridging) and acts[0].power_kw <= cfg.prearm_power_kw
    assert u not in state.relieving and u in state.armed


def test_a_des_kept_online_is_not_handed_back_to_a_feed_under_overload_relief(site):
    """A heavy aisle segment (its units draw 69 % of its rating) has a batch job starting (forecast +32 %), so
    a DES of one of its units discharges 8 kW to relieve it, and another DES there is kept online at the token
    power. The measured current (60 %) leaves room for that DES's recharge, but only because the reliever
    is discharging: handed back, it would recharge from the reliever's output (energy moved from one DES to
    another) and the segment would need more relief the next cycle. It stays online while the relief runs;
    with no relief, or a reliever whose data is stale (nothing says it still discharges), it is handed back."""
    topo, plant, cfg = _quiet_plant_and_config(site)
    u1 = topo.unit_names.index("MATS-01-01")
    s = int(plant.active[u1]) - 1
    p = int(topo.pdb_of[u1, s])
    on_p = [u for u in range(topo.n) if int(plant.active[u]) - 1 == s and int(topo.pdb_of[u, s]) == p]
    u2 = next(u for u in on_p if u != u1)
    snap = _bridging_snapshot(plant, u1, 8.0, 600.0, s, 0.5)
    snap["des"]["Mode"][u2] = int(StorageMode.BRIDGING)
    snap["des"]["ActivePower"][u2] = cfg.prearm_power_kw
    snap["des"]["BridgeTimeRemaining"][u2] = 600.0
    # the segment's units scaled up so that their currents, less the reliever's output, make its 60 %
    rated = float(snap["pdb"]["RatedCurrent"][p])
    a_kw = float(snap["ats"]["LoadCurrent"][u1] / snap["ats"]["LoadPower"][u1])
    k = (0.60 * rated + 8.0 * a_kw) / float(np.sum(snap["ats"]["LoadCurrent"][on_p]))
    for point in ("LoadCurrent", "LoadPower"):
        snap["ats"][point][on_p] *= k
    snap["pdb"]["Current"][p] = 0.60 * rated
    forecast = np.array(snap["ats"]["LoadPower"], float)
    forecast[on_p] *= 1.32

    def decide_with(relieving: dict, stale_reliever: bool = False):
        state = _running_state(armed={u1, u2}, relieving=relieving)
        fresh = {"des": np.ones(topo.n, bool)}
        fresh["des"][u1] = not stale_reliever
        acts = decide(Observation(t_s=60.0, values=snap, risk=_zero_risk(topo), forecast_kw=forecast, fresh=fresh),
                      state, cfg)
        return [a for a in acts if isinstance(a, StopBridging) and a.des == topo.des_names[u2]], state

    relief = {u1: (s, p, topo.pdb_names[p])}
    stops, state = decide_with({})
    assert stops and not state.relieving, "no room for the recharge without a relief: the test proves nothing"
    stops, state = decide_with(dict(relief))
    assert stops == [] and u2 in state.armed and u1 in state.relieving
    stops, state = decide_with(dict(relief), stale_reliever=True)
    assert stops and u1 in state.relieving  # the stale reliever is neither kept nor dropped, and blocks nothing
