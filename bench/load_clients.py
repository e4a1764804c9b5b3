"""The OPC UA clients of the `load` phase of `cmcs bench robustness`, several to a process.

    python -m bench.load_clients CONFIG_JSON

Each client connects the way a SCADA does (Basic256Sha256 SignAndEncrypt with a trusted
certificate, a user name and password), subscribes to its own block of `items` variables (500 ms
publishing, queue size 1) and then, for the run, browses one aisle's subtree every
`browse_every_s` and reads the history of a few variables over the last minutes every
`history_every_s` (both at a random phase per client). The process prints one JSON line once all
its clients are subscribed, waits for one line on standard input (`{"run_s": S}`), runs, and
prints its figures as one JSON line:

- latency histograms (bins of BIN_S) of every data-change notification during the run, measured two
  ways: from the plant step that produced the value (the simulator's plant clock: a value polled at
  SourceTimestamp s comes from the last whole plant second before s, as in bench/gateway.py) to its
  arrival here, and from its SourceTimestamp (the gateway's poll) to its arrival. Arrival is when
  the whole response had been received (bench/arrival.py), before this client decodes it; a third
  histogram, from the plant step to the end of the decode, shows what the client's own decoding
  (and its other clients, browses and history reads in the same process) adds;
- browse and history-read round trips (each one request), errors by kind, notifications per client,
  and this process's own CPU time over the run (so a reader can tell whether the clients were the
  bottleneck).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from datetime import datetime, timedelta, timezone

import psutil
from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from bench.arrival import arrival, stamp_arrivals

BIN_S = 0.01  # latency histogram bin
BINS = 3000  # up to 30 s; the last bin holds everything later
HISTORY_WINDOW_S = 300.0  # HistoryRead over the last 5 minutes
HISTORY_VARIABLES = 3
WATCHDOG_S = 5.0


class Tally:
    """What one process's clients saw, cheap to update on every notification."""

    def __init__(self, wall0: float, speed: float):
        self.wall0, self.speed = wall0, speed
        self.recording = False
        self.plant = [0] * BINS  # from the notification's arrival (bench/arrival.py)
        self.source = [0] * BINS
        self.plant_decoded = [0] * BINS  # from when this client had decoded it
        self.early = 0  # SourceTimestamp after arrival (clock skew: none here, one machine)
        self.unstamped = 0  # notifications recorded without an arrival stamp (should stay 0)
        self.not_good = 0  # notifications whose value is not Good
        self.status_changes = 0  # StatusChangeNotification: a subscription lost or timed out
        self.browse_s: list[float] = []
        self.history_s: list[float] = []
        self.history_values = 0
        self.errors: dict[str, int] = {}
        self.first_errors: list[str] = []

    def error(self, kind: str, exc: BaseException | str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 10:
            self.first_errors.append(f"{kind}: {exc if isinstance(exc, str) else type(exc).__name__ + ' ' + str(exc)}"[:200])

    def on_publish(self, result: ua.PublishResult, counter: list[int]) -> None:
        data = result.NotificationMessage.NotificationData
        if not data or not self.recording:
            return
        decoded = time.time()
        arrived = arrival(result)
        if arrived is None:  # not stamped (bench/arrival.py): counted, and timed at the decode
            self.unstamped += 1
            arrived = decoded
        wall0, speed = self.wall0, self.speed
        plant, source, plant_decoded = self.plant, self.source, self.plant_decoded
        for notif in data:
            if isinstance(notif, ua.StatusChangeNotification):
                self.status_changes += 1
                self.error("status_change", ua.StatusCode(notif.Status.value).name)
                continue
            if not isinstance(notif, ua.DataChangeNotification):
                continue
            counter[0] += len(notif.MonitoredItems)
            for item in notif.MonitoredItems:
                value = item.Value
                if value.StatusCode is not None and not value.StatusCode.is_good():
                    self.not_good += 1
                ts = value.SourceTimestamp
                if ts is None:
                    continue
                s = ts.replace(tzinfo=timezone.utc).timestamp()
                lag = arrived - s
                if lag < 0:
                    self.early += 1
                    lag = 0.0
                source[min(BINS - 1, int(lag / BIN_S))] += 1
                produced = wall0 + math.floor((s - wall0) * speed) / speed
                plant[min(BINS - 1, max(0, int((arrived - produced) / BIN_S)))] += 1
                plant_decoded[min(BINS - 1, max(0, int((decoded - produced) / BIN_S)))] += 1


class _Subscription(Subscription):
    tally: Tally
    counter: list[int]

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:  # noqa: D401
        self.tally.on_publish(publish_result, self.counter)


async def _connect(cfg: dict) -> Client:
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    # asyncua's supervisor probes the server every `watchdog_intervall` and gives up after as long (1 s
    # by default, a hair-trigger under load); a SCADA's keep-alive is seconds: 5 s here
    client = Client(cfg["url"], timeout=30, watchdog_intervall=WATCHDOG_S)
    client.application_uri = cfg["uri"]
    await client.set_security(SecurityPolicyBasic256Sha256, cfg["cert"], cfg["key"],
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    client.set_user(cfg["user"])
    client.set_password(cfg["password"])
    await client.connect()
    return client


class LoadClient:
    def __init__(self, index: int, cfg: dict, tally: Tally, variables: list[str], aisles: list[str]):
        self.index, self.cfg, self.tally = index, cfg, tally
        total = cfg["total_clients"]
        start = (index * len(variables)) // total  # blocks spread over the whole site, overlapping a little
        self.items = [variables[(start + k) % len(variables)] for k in range(cfg["items"])]
        self.aisle = aisles[index % len(aisles)]
        self.rng = random.Random(index)
        self.client: Client | None = None
        self.sub: _Subscription | None = None
        self.counter = [0]
        self.ns = 0
        self.lost = False  # the connection was lost (counted once; this client stops)

    async def start(self) -> None:
        self.client = await _connect(self.cfg)
        stamp_arrivals(self.client)
        self.client.connection_lost_callback = self._lost
        self.ns = await self.client.get_namespace_index(self.cfg["ns_uri"])
        params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=500, RequestedLifetimeCount=600,
                                                 RequestedMaxKeepAliveCount=20, MaxNotificationsPerPublish=0,
                                                 PublishingEnabled=True)
        sub = _Subscription(self.client.uaclient, params, handler=None)
        sub.tally, sub.counter = self.tally, self.counter
        await sub.init()
        self.sub = sub
        nodes = [self.client.get_node(ua.NodeId(name, self.ns)) for name in self.items]
        handles = await sub.subscribe_data_change(nodes, queuesize=1)
        refused = [h for h in handles if not isinstance(h, int)]
        if refused:
            self.tally.error("monitored_item_refused", f"{len(refused)} of {len(nodes)}: {refused[0]}")

    async def _lost(self, exc: Exception) -> None:
        self.lost = True
        self.tally.error("connection_lost", exc)

    async def browse(self) -> None:
        """One aisle's subtree: the aisle's references, then every child's in one Browse request."""
        client = self.client
        t = time.perf_counter()
        (_, result), = await client.browse_nodes([client.get_node(ua.NodeId(self.aisle, self.ns))])
        self.tally.browse_s.append(time.perf_counter() - t)
        children = [client.get_node(ref.NodeId) for ref in result.References if ref.IsForward]
        t = time.perf_counter()
        results = await client.browse_nodes(children)
        self.tally.browse_s.append(time.perf_counter() - t)
        if not results or any(not r.StatusCode.is_good() for _, r in results):
            self.tally.error("browse_status", "a child's browse was not Good")

    async def history(self) -> None:
        """HistoryReadRaw of a few of this client's variables over the last HISTORY_WINDOW_S."""
        now = datetime.now(timezone.utc)
        names = self.rng.sample(self.items, HISTORY_VARIABLES)
        details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=now - timedelta(seconds=HISTORY_WINDOW_S),
                                            EndTime=now, NumValuesPerNode=1000, ReturnBounds=False)
        params = ua.HistoryReadParameters(HistoryReadDetails=details, TimestampsToReturn=ua.TimestampsToReturn.Both,
                                          ReleaseContinuationPoints=False,
                                          NodesToRead=[ua.HistoryReadValueId(NodeId=ua.NodeId(n, self.ns))
                                                       for n in names])
        t = time.perf_counter()
        results = await self.client.uaclient.history_read(params)
        self.tally.history_s.append(time.perf_counter() - t)
        for r in results:
            if not r.StatusCode.is_good():
                self.tally.error("history_status", ua.StatusCode(r.StatusCode.value).name)
            elif r.HistoryData is not None and r.HistoryData.DataValues:
                self.tally.history_values += len(r.HistoryData.DataValues)
            if r.ContinuationPoint:  # release it: a client that leaves them behind is another test
                release = ua.HistoryReadParameters(HistoryReadDetails=details, ReleaseContinuationPoints=True,
                                                   NodesToRead=[ua.HistoryReadValueId(NodeId=ua.NodeId(names[0], self.ns),
                                                                                      ContinuationPoint=r.ContinuationPoint)])
                await self.client.uaclient.history_read(release)

    async def run(self, until: float) -> None:
        cfg = self.cfg
        next_browse = time.monotonic() + self.rng.uniform(0, cfg["browse_every_s"])
        next_history = time.monotonic() + self.rng.uniform(0, cfg["history_every_s"])
        while True:
            now = time.monotonic()
            wake = min(next_browse, next_history, until)
            if wake > now:
                await asyncio.sleep(wake - now)
            now = time.monotonic()
            if now >= until or self.lost:
                return
            try:
                if now >= next_browse:
                    next_browse += cfg["browse_every_s"]
                    await asyncio.wait_for(self.browse(), 30)
                if now >= next_history:
                    next_history += cfg["history_every_s"]
                    await asyncio.wait_for(self.history(), 30)
            except (OSError, asyncio.TimeoutError, ConnectionError, ua.UaError) as exc:
                self.tally.error("request", exc)

    async def stop(self) -> None:
        if self.lost:
            return
        try:
            if self.sub is not None:
                await asyncio.wait_for(self.sub.delete(), 10)
            await asyncio.wait_for(self.client.disconnect(), 10)
        except Exception as exc:  # noqa: BLE001 - the gateway's part, reported
            self.tally.error("disconnect", exc)


def _percentile(hist: list[int], q: float) -> float | None:
    total = sum(hist)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return round((i + 1) * BIN_S, 3)  # the bin's upper edge: never optimistic
    return round(BINS * BIN_S, 3)


def _sparse(hist: list[int]) -> dict[str, int]:
    return {str(i): n for i, n in enumerate(hist) if n}


async def main(cfg: dict) -> None:
    from siteconfig.loader import load_site
    from siteconfig.points import POINTS

    site = load_site(cfg["site_file"])
    variables = [f"{name}.{p.name}" for name, _kind, _ in site.devices() for p in POINTS[_kind]]
    aisles = [a.name for a in site.aisles]
    tally = Tally(cfg["wall0"], cfg["speed"])
    clients = [LoadClient(i, cfg, tally, variables, aisles) for i in range(cfg["first"], cfg["first"] + cfg["count"])]
    t0 = time.monotonic()
    started: list[LoadClient] = []
    for k in range(0, len(clients), 5):  # five at a time: a SCADA's start-up is not a connect storm
        batch = clients[k:k + 5]
        outcomes = await asyncio.gather(*(c.start() for c in batch), return_exceptions=True)
        for c, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                tally.error("connect", outcome)
            else:
                started.append(c)
    print(json.dumps({"ready": True, "clients": len(started), "connect_s": round(time.monotonic() - t0, 1)}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    run_s = json.loads(line)["run_s"]
    me = psutil.Process()
    cpu0 = me.cpu_times()
    t_run = time.monotonic()
    tally.recording = True
    await asyncio.gather(*(c.run(t_run + run_s) for c in started))
    tally.recording = False
    elapsed = time.monotonic() - t_run
    cpu1 = me.cpu_times()
    await asyncio.gather(*(c.stop() for c in started))
    print(json.dumps({
        "clients": len(started), "items": cfg["items"], "seconds": round(elapsed, 1),
        "notifications": sum(c.counter[0] for c in started),
        "notifications_min_per_client": min((c.counter[0] for c in started), default=0),
        "not_good": tally.not_good, "early": tally.early, "unstamped": tally.unstamped,
        "status_changes": tally.status_changes,
        "plant": _sparse(tally.plant), "source": _sparse(tally.source),
        "plant_decoded": _sparse(tally.plant_decoded),
        "browse_s": [round(x, 4) for x in tally.browse_s], "history_s": [round(x, 4) for x in tally.history_s],
        "history_values": tally.history_values, "errors": tally.errors, "first_errors": tally.first_errors,
        "cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 1),
    }), flush=True)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(json.loads(sys.argv[1])))
