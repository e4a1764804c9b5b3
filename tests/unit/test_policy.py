"""The CMCS policy: never proposes what the command service would refuse, safe start, stale data."""

from __future__ import annotations

import numpy as np
import pytest

from cmcs.mission import _apply
from cmcs.policy import (Observation, PolicyConfig, PolicyState, SetPreferredSource, StartBridging, SwitchSource,
                         Topology, decide)
from siteconfig.demo import demo_site
from simulator.plant import InterlockRefused, Plant
from simulator.scenario import LoadProfile, Scenario


@pytest.fixture(scope="module")
def site():
    return demo_site()


def _obs(plant, t, risk=None, fresh=None):
    return Observation(t_s=t, values=plant.snapshot(), risk=risk, fresh=fresh)


def _zero_risk(topo):
    return {"source": np.zeros(2), "pdb": np.zeros(len(topo.pdb_names)), "ats": np.zeros(topo.n),
            "des": np.zeros(topo.n)}


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
        cfg = PolicyConfig(topology=topo, thresholds={k: 0.5 for k in ("source", "pdb", "ats", "des")},
                           balance_high_pct=float(rng.uniform(40, 80)), balance_target_pct=float(rng.uniform(40, 75)),
                           balance_cooldown_s=0.0, balance_hold_s=0.0, confirm_cycles=1, safe_start_cycles=0)
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
