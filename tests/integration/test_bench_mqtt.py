"""The `mqtt` part of `cmcs bench gateway` (bench/mqtt.py), short: the demo site's edge node into the
bench's own mosquitto, the simulator and the subscriber each in a process of its own, a 3-s outage."""

from __future__ import annotations

import pytest

from bench import mqtt
from siteconfig.demo import demo_site

pytestmark = pytest.mark.timeout(180)


def test_the_mqtt_bench_reports_its_figures_and_loses_nothing_over_an_outage():
    f = mqtt.measure(demo_site(), window_s=3.0, outage_s=3.0)
    for key in ("messages_per_s", "metrics_per_s", "latency_p99_s", "replay_metrics_per_s"):  # section 7
        assert f[key] is not None and f[key] > 0, (key, f)
    site = demo_site()
    assert f["units"] == len(site.units) and f["devices"] == len(site.devices())
    # the gateway side publishes what the plant does: the latency is that of a live feed, not a backlog
    assert f["latency_p99_s"] < 2.0, f
    # the outage's data went to the store and came back, all of it, nothing dropped
    assert f["held_metrics"] > 0 and f["replay_lost"] == 0 and f["dropped_messages"] == 0, f
    assert f["replayed_metrics"] >= f["held_metrics"], f
    assert f["replay_pending_messages"] == 0, f
    # the plant and the historian ran in processes of their own (they used CPU there, not here)
    assert f["cpu_percent_simulator"] > 0 and f["cpu_percent_subscriber"] > 0, f
