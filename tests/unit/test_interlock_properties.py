"""Interlocks by property (hypothesis): over plant states and SwitchSource targets, every unsafe
command is refused by the real CommandService with its exact docs/interface.md status, and nothing
reaches the device (bench/interlock_property.py has the oracle, written from docs/interface.md)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.interlock_property import Bench, Tally, plant_state, targets
from siteconfig.demo import demo_site

SITE = demo_site()
BENCH = Bench(SITE)
LOOP = asyncio.new_event_loop()  # one loop for every example (a new one each costs more than the check)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=plant_state(SITE), target=targets())
def test_every_unsafe_switch_is_refused_with_its_status_and_sends_nothing(state, target):
    tally = Tally()
    LOOP.run_until_complete(BENCH.switch(state, target, tally))
    assert not tally.mismatches, tally.mismatches[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=st.lists(st.tuples(plant_state(SITE), targets(), st.floats(0.0, 40.0)), min_size=2, max_size=6))
def test_a_sequence_of_commands_never_lets_an_unsafe_one_through(states):
    """Commands one after the other, the plant changing in between and the clock moving on: a switch
    made earlier in the sequence starts the dwell time of the next ones."""
    tally = Tally()

    async def sequence():
        first = True
        for state, target, wait_s in states:
            BENCH.now += wait_s
            await BENCH.switch(state, target, tally, carry_dwell=not first)
            first = False

    LOOP.run_until_complete(sequence())
    assert not tally.mismatches, tally.mismatches[0]
