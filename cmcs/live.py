"""The live CMCS: an OPC UA client of the gateway (collect ► predict ► optimise ► act).

It sees only what any client sees and acts only through the gateway's methods (docs/design.md), so it
runs the same in-process (`cmcs run` starts it with its own certificate and the Engineer role)
or on another host (`cmcs agent --endpoint ...`).

Each cycle (every `Predictor.sample_interval_s`, 10 s):
1. **collect**: the values of every device, kept current by one subscription (a monitored item
   per point; the notifications are written straight into per-point arrays, no task per value);
   a device is *fresh* while all its values are Good and the subscription is alive;
2. **predict**: the streaming features (`cmcs.features`, the pipeline the models were trained
   on), risk per component and load forecasts (`cmcs.models.Predictor`);
3. **optimise**: `cmcs.policy.decide`, the very function the mission benchmark replays;
4. **act**, by the `Cmcs.Mode` the operator chose:
   - Manual: nothing (risk scores, forecasts and predicted-failure alarms still published);
   - Advisory: each recommended action as an event (`Cmcs.Advise`), once per action;
   - Automatic: the method calls (`SwitchSource`, `SetPreferredSource`, `StartBridging`,
     `StopBridging`), each one through the gateway's command service and its interlocks;
5. **publish**: RiskScore of every source, PDB segment and micro-ATS (a unit's is the higher
   of its own and its DES's), PredictedLoad of every unit (5-min forecast), CycleTime,
   ActiveMitigations and ModelVersion of the Cmcs object; a component latched at risk gets its
   PredictedFailureAlarm (`Cmcs.ReportPrediction`, with the lead time and the mitigation),
   cleared (`Cmcs.ClearPrediction`) when the latch releases; a micro-ATS whose second path is at
   risk or gone (`cmcs.redundancy`, the function the mission benchmark counts warnings with) gets
   its LossOfRedundancyAlarm (`Cmcs.ReportLossOfRedundancy`, with the path and its DES's
   ride-through time), reported again when the path changes, goes from at risk to gone, or the
   ride-through moves by more than 10 %, and cleared (`Cmcs.ClearLossOfRedundancy`) when both
   paths are back. Only units whose data is fresh (the unit, its DES, its segments and the
   sources) are reported or cleared: a stale unit's alarm stays as it was.

`Cmcs.RiskThreshold` moves the operating points: the per-kind thresholds of the model bundle
(chosen for 1 false alarm per 100 unit-days) hold at the default 0.5 and scale with it
(0.25: twice as eager, 1.0: half as). The lead time reported with a prediction is the median
time to failure of a constant hazard with that 15-min probability (H ln 2 / -ln(1 - risk)).

**Layout.** A bundle records the layout it was trained for (cmcs.layout). On a site of another
layout the CMCS stays Advisory: it never acts, a Mode of Automatic (written directly; `SetMode`
refuses it at the gateway) is written back to Advisory, and `ModelVersion` says why
("<version> (trained for another layout: Advisory only; ...)").

`time_scale` (plant seconds per wall second) is for simulators run faster than real time: the
cycle, the features' clock and the policy's dwell time follow plant time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from asyncua import Client, ua
from asyncua.common.subscription import Subscription

from cmcs.layout import check_layout, model_version_text
from cmcs.redundancy import redundancy
from cmcs.policy import (Observation, PolicyConfig, PolicyState, SetPreferredSource, StartBridging, StopBridging,
                         SwitchSource, Topology, decide)
from siteconfig.model import CmcsMode, Site
from siteconfig.points import POINTS
from cmcs.identity import SECURITY_POLICIES

log = logging.getLogger(__name__)

KINDS = ("source", "pdb", "ats", "des")
CMCS_POINTS = ("Mode", "RiskThreshold")
DEFAULT_RISK_THRESHOLD = 0.5
HORIZON_S = 900.0  # the risk models' horizon
ADVICE_REPEAT_S = 900.0  # the same advice is notified again after this long (plant time)
RIDE_THROUGH_REPORT_CHANGE = 0.1  # a LossOfRedundancy alarm is updated when its ride-through moves by 10 %


@dataclass
class LiveOptions:
    endpoint: str
    certificate: Path | None = None  # application-instance certificate (DER/PEM); also the X509 user token
    private_key: Path | None = None  #   ... unless a user name is given
    username: str | None = None
    password: str | None = None
    security_policy: str = "Basic256Sha256"  # or "None" (only where the gateway allows it)
    security_mode: str = "SignAndEncrypt"  # or "Sign"
    application_uri: str = "urn:cmcs-gateway:cmcs-client"
    bundle: Path | None = None  # None: the shipped bundle
    time_scale: float = 1.0
    publishing_interval_ms: float | None = None  # default: half a cycle, 100-1000 ms
    max_backoff_s: float = 10.0


def lead_time_s(risk: float, horizon_s: float = HORIZON_S) -> float:
    """Median time to failure of a constant hazard whose probability within `horizon_s` is `risk`."""
    r = min(max(float(risk), 1e-6), 1.0 - 1e-6)
    return float(min(max(horizon_s * math.log(2.0) / -math.log1p(-r), 0.0), 7 * 86400.0))


def client_snapshot(raw: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Snapshot-shaped values (what `FeatureState.update` and the policy take) from the last value of
    every point as floats (NaN: none yet): booleans and enumerations typed as the plant gives them.
    The live loop and `cmcs train --history` (cmcs.history) build their snapshots with this."""
    values = {}
    for kind in KINDS:
        d = {}
        for spec in POINTS[kind]:
            arr = raw[kind][spec.name]
            if spec.kind == "bool":
                d[spec.name] = arr > 0.5
            elif spec.kind == "int" or spec.kind.startswith("enum:"):
                d[spec.name] = np.nan_to_num(arr, nan=0.0).astype(np.int64)
            else:
                d[spec.name] = arr.copy()
        values[kind] = d
    return values


class _Feed(Subscription):
    """A subscription whose notifications go straight into arrays (no task per value)."""

    def __init__(self, session, params, on_items, on_status):
        super().__init__(session, params, None, queue_maxsize=1)
        self._on_items = on_items
        self._on_status = on_status

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        data = publish_result.NotificationMessage.NotificationData
        if not data:
            return
        self.last_sequence_number = int(publish_result.NotificationMessage.SequenceNumber)
        for notif in data:
            if isinstance(notif, ua.DataChangeNotification):
                self._on_items(notif.MonitoredItems)
            elif isinstance(notif, ua.StatusChangeNotification):
                self._on_status(notif)


@dataclass
class _Nodes:
    """What discovery found: NodeIds by (kind, point, device index), methods, the Cmcs object."""

    var: dict[tuple[str, str], list[ua.NodeId | None]] = field(default_factory=dict)
    methods: dict[tuple[str, str], tuple[ua.NodeId, ua.NodeId]] = field(default_factory=dict)  # (device, m) -> (obj, method)
    cmcs_var: dict[str, ua.NodeId] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


class LiveCmcs:
    """`await LiveCmcs(site, options).run(stop_event)`; reconnects with back-off until stopped."""

    def __init__(self, site: Site, options: LiveOptions, predictor=None):
        from cmcs.models import SHIPPED_BUNDLE, Predictor

        self.site = site
        self.options = options
        self.predictor = predictor if predictor is not None else Predictor.load(options.bundle or SHIPPED_BUNDLE)
        topo = Topology.from_site(site)
        self.topology = replace(topo, dwell_time_s=topo.dwell_time_s * options.time_scale)
        self.base_thresholds = dict(self.predictor.thresholds)
        # the layout the bundle was trained for against this site's: another hall, Advisory at most
        self.layout = check_layout(self.predictor.meta, site)
        self.advisory_only = not self.layout.matches
        self.model_version = model_version_text(self.predictor.version, self.layout)
        if self.advisory_only:
            log.warning("CMCS: model bundle %s was %s: the CMCS stays Advisory until a matching bundle is "
                        "installed (cmcs train --config SITE)", self.predictor.version, self.layout.reason)
        self.policy_config = PolicyConfig(topology=self.topology, variant="ml", thresholds=dict(self.base_thresholds))
        self.names = {"source": list(self.topology.source_names), "pdb": list(self.topology.pdb_names),
                      "ats": list(self.topology.unit_names), "des": list(self.topology.des_names)}
        self.points = {k: [p.name for p in POINTS[k]] for k in KINDS}
        self.mode = CmcsMode.ADVISORY
        self.risk_threshold = DEFAULT_RISK_THRESHOLD
        # figures a client or a test can read
        self.cycles = 0
        self.connected = False
        self.last_cycle_ms = 0.0
        self.calls: list[tuple[float, object, str]] = []  # (plant t, action, StatusCode name)
        self.advised: list[tuple[float, object]] = []
        self.reported: dict[str, float] = {}  # component -> risk last reported (alarm active)
        # unit -> (path at risk, gone, ride-through s) last reported (LossOfRedundancy alarm active)
        self.redundancy_reported: dict[str, tuple[str, bool, float]] = {}
        self.connections = 0
        self.errors = 0  # cycles that failed on an unexpected error (logged with their traceback)
        self.client: Client | None = None
        self.last_risk: dict[str, np.ndarray] | None = None
        self.last_forecast: np.ndarray | None = None
        self._reset_state()

    # ---- state --------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.features = self.predictor.new_state(self.site)
        self.policy_state = PolicyState()
        self._values = {k: {p: np.full(len(self.names[k]), np.nan) for p in self.points[k]} for k in KINDS}
        self._good = {k: np.zeros((len(self.points[k]), len(self.names[k])), bool) for k in KINDS}
        no_des = np.array([not n for n in self.names["des"]], bool)
        self._good["des"][:, no_des] = True  # a unit without storage has no DES values to wait for
        self._cmcs_values: dict[str, float] = {}
        self._slots: list[tuple[str, int, int]] = []
        self._advice_at: dict[tuple, float] = {}
        self._written: dict[ua.NodeId, object] = {}  # what this session last wrote, per node
        self._t0 = time.monotonic()
        self._sub: _Feed | None = None
        self._sub_alive = False

    def now_s(self) -> float:
        """Plant time since this run started."""
        return (time.monotonic() - self._t0) * self.options.time_scale

    # ---- connection ---------------------------------------------------------------------------
    async def _client(self) -> Client:
        o = self.options
        client = Client(o.endpoint, timeout=10)
        client.application_uri = o.application_uri
        client.name = "cmcs-gateway CMCS"
        client.description = "cmcs-gateway CMCS"
        if o.security_policy != "None":
            policy = SECURITY_POLICIES.get(o.security_policy)
            if policy is None:
                raise ValueError(f"unknown security policy {o.security_policy!r}; one of None, "
                                 + ", ".join(SECURITY_POLICIES))
            if o.certificate is None or o.private_key is None:
                raise ValueError(f"security policy {o.security_policy} needs a certificate and a private key")
            mode = getattr(ua.MessageSecurityMode, o.security_mode)
            await client.set_security(policy, str(o.certificate), str(o.private_key), mode=mode)
        if o.username:
            client.set_user(o.username)
            client.set_password(o.password or "")
        elif o.certificate is not None and o.private_key is not None:
            await client.load_client_certificate(str(o.certificate))  # X509 user token: the same certificate
            await client.load_private_key(Path(o.private_key))
        return client

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            client = None
            try:
                client = self.client = await self._client()
                await client.connect()
                self.connected = True
                self.connections += 1
                backoff = 1.0
                log.info("CMCS connected to %s", self.options.endpoint)
                await self._serve(client, stop)
            except (ValueError, FileNotFoundError) as exc:
                log.error("CMCS cannot start: %s", exc)
                raise
            except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError) as exc:
                log.warning("CMCS: connection to %s lost or refused (%s); retrying in %.0f s",
                            self.options.endpoint, exc or type(exc).__name__, backoff)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in one cycle must not end the CMCS for good
                self.errors += 1
                log.exception("CMCS: cycle failed; starting again (safe start) in %.0f s", backoff)
            finally:
                self.connected = False
                if client is not None:
                    try:
                        await asyncio.wait_for(client.disconnect(), 5)
                    except Exception:  # noqa: BLE001 - the connection is gone either way
                        pass
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, self.options.max_backoff_s)

    async def _serve(self, client: Client, stop: asyncio.Event) -> None:
        self._reset_state()  # after a reconnect: safe start again, nothing carried over blind
        nodes = await discover(client, self.site)
        if nodes.missing:
            log.warning("CMCS: %d points not found in the address space (first: %s)", len(nodes.missing),
                        nodes.missing[0])
        self.nodes = nodes
        await self._subscribe(client, nodes)
        await self._write(client, [(nodes.cmcs_var.get("ModelVersion"), self.model_version, ua.VariantType.String)])
        cycle_wall = self.predictor.sample_interval_s / self.options.time_scale
        next_t = time.monotonic() + cycle_wall
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_t - time.monotonic()))
                break
            except asyncio.TimeoutError:
                pass
            next_t += cycle_wall
            if next_t < time.monotonic():  # late by a whole cycle: skip, never bunch cycles
                next_t = time.monotonic() + cycle_wall
            if client.uaclient.protocol is None or self._sub is None:
                raise ConnectionError("session closed")
            silent = time.monotonic() - (self._sub.last_publish_at or self._subscribed_at)
            if silent > 3.0 * self._keepalive_s + 10.0:
                raise ConnectionError(f"no publish response from the gateway for {silent:.0f} s")
            await self.cycle(client)

    async def _subscribe(self, client: Client, nodes: _Nodes) -> None:
        o = self.options
        cycle_ms = 1000.0 * self.predictor.sample_interval_s / o.time_scale
        interval = o.publishing_interval_ms or min(max(cycle_ms / 2.0, 100.0), 1000.0)
        params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=interval, RequestedLifetimeCount=600,
                                                 RequestedMaxKeepAliveCount=max(3, int(5000 / interval)),
                                                 MaxNotificationsPerPublish=0, PublishingEnabled=True, Priority=0)
        sub = _Feed(client.uaclient.session, params, self._on_items, self._on_status)
        await sub.init()
        self._keepalive_s = interval * params.RequestedMaxKeepAliveCount / 1000.0
        requests, slots = [], []
        for kind in KINDS:
            for pi, point in enumerate(self.points[kind]):
                for di, nid in enumerate(nodes.var.get((kind, point), ())):
                    if nid is not None:
                        slots.append((kind, pi, di))
                        requests.append(_item(nid, len(slots)))
        for point in CMCS_POINTS:
            if point in nodes.cmcs_var:
                slots.append(("cmcs", CMCS_POINTS.index(point), 0))
                requests.append(_item(nodes.cmcs_var[point], len(slots)))
        self._slots = slots
        for i in range(0, len(requests), 1000):
            results = await sub.create_monitored_items(requests[i:i + 1000])
            bad = [r for r in results if isinstance(r, ua.StatusCode)]
            if bad:
                log.warning("CMCS: %d monitored items refused (%s)", len(bad), bad[0].name)
        self._sub = sub
        self._sub_alive = True
        self._subscribed_at = time.monotonic()

    def _on_items(self, items) -> None:
        slots = self._slots
        for item in items:
            h = item.ClientHandle - 1
            if not 0 <= h < len(slots):
                continue
            kind, pi, di = slots[h]
            dv = item.Value
            good = dv is not None and (dv.StatusCode is None or dv.StatusCode.is_good())
            raw = dv.Value.Value if dv is not None and dv.Value is not None else None
            if kind == "cmcs":
                if raw is not None:
                    self._cmcs_values[CMCS_POINTS[pi]] = float(raw)
                continue
            if raw is None or isinstance(raw, (str, bytes, list)):
                self._good[kind][pi, di] = False
                continue
            self._values[kind][self.points[kind][pi]][di] = float(raw)
            # UncertainLastUsableValue keeps its value, but the device is not fresh
            self._good[kind][pi, di] = bool(good)

    def _on_status(self, notif: ua.StatusChangeNotification) -> None:
        log.warning("CMCS: subscription status %s", notif.Status)
        self._sub_alive = False

    # ---- one cycle ----------------------------------------------------------------------------
    def observation(self) -> tuple[float, dict, dict]:
        """(plant t, snapshot-shaped values, fresh flags) as the policy and the features want them."""
        sub = self._sub
        alive = (self._sub_alive and sub is not None and sub.last_publish_at is not None
                 and time.monotonic() - sub.last_publish_at < 2.0 * self._keepalive_s + 2.0)
        values = client_snapshot(self._values)
        fresh = {k: self._good[k].all(axis=0) & alive for k in KINDS}
        return self.now_s(), values, fresh

    def _thresholds(self) -> dict[str, float]:
        scale = self.risk_threshold / DEFAULT_RISK_THRESHOLD
        return {k: float(min(max(v * scale, 0.01), 0.99)) for k, v in self.base_thresholds.items()}

    async def cycle(self, client: Client) -> list:
        """Collect, predict, optimise, act, publish; returns the actions the policy chose."""
        t0 = time.perf_counter()
        if "Mode" in self._cmcs_values:
            self.mode = CmcsMode(int(self._cmcs_values["Mode"]))
        if self.advisory_only and self.mode == CmcsMode.AUTOMATIC:
            await self._hold_advisory(client)
        thr = self._cmcs_values.get("RiskThreshold")
        if thr is not None and 0.0 < thr <= 1.0:
            self.risk_threshold = thr
        self.policy_config.thresholds = self._thresholds()
        t_s, values, fresh = self.observation()
        feats = self.features.update(t_s, values)
        risk = forecast = None
        if self.features.ready:
            risk = self.predictor.predict(feats)
            # a device whose data is not fresh has no meaningful score
            risk = {k: np.where(fresh[k], v, np.nan) for k, v in risk.items()}
            fc = self.predictor.forecast(feats, self.features.load_level_kw)
            forecast = fc[300] if 300 in fc else fc[sorted(fc)[0]]
        obs = Observation(t_s=t_s, values=values, fresh=fresh, risk=risk,
                          forecast_kw=forecast if forecast is not None else self.features.load_level_kw)
        actions = decide(obs, self.policy_state, self.policy_config)
        if self.mode == CmcsMode.AUTOMATIC:
            await self._act(client, t_s, actions)
        elif self.mode == CmcsMode.ADVISORY:
            await self._advise(client, t_s, actions)
        await self._report(client, risk)
        await self._report_redundancy(client, values, fresh)
        self.last_risk, self.last_forecast = risk, forecast
        self.cycles += 1
        self.last_cycle_ms = (time.perf_counter() - t0) * 1000.0
        await self._publish(client, risk, forecast)
        return actions

    async def _hold_advisory(self, client: Client) -> None:
        """Mode Automatic with a bundle for another layout (a direct write of Cmcs.Mode; SetMode
        refuses it): act as Advisory and write the Mode back, so that every client sees it."""
        self.mode = CmcsMode.ADVISORY
        log.warning("CMCS: Mode Automatic refused: model bundle %s was %s; back to Advisory",
                    self.predictor.version, self.layout.reason)
        nid = self.nodes.cmcs_var.get("Mode")
        if nid is not None:
            self._written.pop(nid, None)
            await self._write(client, [(nid, int(CmcsMode.ADVISORY), ua.VariantType.Int32)])
        self._cmcs_values["Mode"] = float(CmcsMode.ADVISORY)

    async def _act(self, client: Client, t_s: float, actions: list) -> None:
        for a in actions:
            status = await self._call_action(client, a)
            self.calls.append((t_s, a, status))
            if status != "Good":
                log.warning("CMCS: %s refused: %s", _describe(a), status)
            else:
                log.info("CMCS: %s", _describe(a))

    async def _call_action(self, client: Client, a) -> str:
        if isinstance(a, SwitchSource):
            return await self._call(client, a.unit, "SwitchSource", [ua.Variant(int(a.target), ua.VariantType.Int32)])
        if isinstance(a, SetPreferredSource):
            return await self._call(client, a.unit, "SetPreferredSource",
                                    [ua.Variant(int(a.source), ua.VariantType.Int32)])
        if isinstance(a, StartBridging):
            return await self._call(client, a.des, "StartBridging", [ua.Variant(float(a.power_kw), ua.VariantType.Double),
                                                                     ua.Variant(float(a.duration_s), ua.VariantType.Double)])
        if isinstance(a, StopBridging):
            return await self._call(client, a.des, "StopBridging", [])
        return "BadNotSupported"

    async def _call(self, client: Client, device: str, method: str, args: list) -> str:
        ids = self.nodes.methods.get((device, method))
        if ids is None:
            return "BadMethodInvalid"
        req = ua.CallMethodRequest(ObjectId=ids[0], MethodId=ids[1], InputArguments=args)
        result = (await client.uaclient.call([req]))[0]
        return result.StatusCode.name

    async def _advise(self, client: Client, t_s: float, actions: list) -> None:
        for a in actions:
            key = (type(a).__name__,) + tuple(v for k, v in vars(a).items() if k not in ("reason",))
            if t_s - self._advice_at.get(key, -1e18) < ADVICE_REPEAT_S:
                continue
            self._advice_at[key] = t_s
            device = getattr(a, "unit", None) or getattr(a, "des", None)
            status = await self._call(client, "Cmcs", "Advise",
                                      [ua.Variant(device, ua.VariantType.String),
                                       ua.Variant(_describe(a), ua.VariantType.String)])
            if status == "Good":
                self.advised.append((t_s, a))
            else:
                log.warning("CMCS: advice refused: %s", status)

    async def _report(self, client: Client, risk: dict | None) -> None:
        """PredictedFailureAlarm for each component latched at risk; cleared when released."""
        latched: dict[str, float] = {}
        if risk is not None:
            for kind, i in self.policy_state.at_risk:
                name = self.names[kind][i]
                r = float(risk.get(kind, np.array([np.nan] * (i + 1)))[i])
                if name and np.isfinite(r):
                    latched[name] = r
        for name, r in latched.items():
            last = self.reported.get(name)
            if last is not None and abs(last - r) < 0.1:
                continue
            mitigation = {"Automatic": "the CMCS is moving its load / bridging with DES",
                          "Advisory": "see the CMCS's advice events",
                          "Manual": "CMCS in Manual: no automatic mitigation"}[self.mode.name.title()]
            status = await self._call(client, "Cmcs", "ReportPrediction",
                                      [ua.Variant(name, ua.VariantType.String),
                                       ua.Variant(min(max(r, 0.0), 1.0), ua.VariantType.Double),
                                       ua.Variant(lead_time_s(r), ua.VariantType.Double),
                                       ua.Variant(mitigation, ua.VariantType.String)])
            if status == "Good":
                self.reported[name] = r
            else:
                log.warning("CMCS: ReportPrediction %s refused: %s", name, status)
        for name in [n for n in self.reported if n not in latched]:
            if (await self._call(client, "Cmcs", "ClearPrediction",
                                 [ua.Variant(name, ua.VariantType.String)])) == "Good":
                del self.reported[name]

    def redundancy_fresh(self, fresh: dict) -> np.ndarray:
        """Per unit: is everything its loss-of-redundancy state depends on fresh (the unit, its DES,
        both of its PDB segments, every source)?"""
        topo = self.topology
        return (fresh["ats"] & fresh["des"] & fresh["pdb"][topo.pdb_of[:, 0]] & fresh["pdb"][topo.pdb_of[:, 1]]
                & bool(fresh["source"].all()))

    async def _report_redundancy(self, client: Client, values: dict, fresh: dict) -> None:
        """LossOfRedundancyAlarm of each fresh unit whose second path is at risk or gone; cleared when it is back."""
        state = redundancy(values, self.policy_state.at_risk, self.topology)
        ok = self.redundancy_fresh(fresh)
        reports, clears = [], []
        for u in np.flatnonzero(ok):
            unit = self.names["ats"][u]
            last = self.redundancy_reported.get(unit)
            if not state.warning[u]:
                if last is not None:
                    clears.append(unit)
                continue
            now = (state.path_at_risk[u], bool(state.gone[u]), float(state.ride_through_s[u]))
            if (last is not None and last[:2] == now[:2]
                    and abs(now[2] - last[2]) <= RIDE_THROUGH_REPORT_CHANGE * last[2]):
                continue
            reports.append((unit, now))
        requests = [(unit, "ReportLossOfRedundancy",
                     [ua.Variant(unit, ua.VariantType.String), ua.Variant(path, ua.VariantType.String),
                      ua.Variant(ride, ua.VariantType.Double), ua.Variant(gone, ua.VariantType.Boolean)])
                    for unit, (path, gone, ride) in reports]
        requests += [(unit, "ClearLossOfRedundancy", [ua.Variant(unit, ua.VariantType.String)]) for unit in clears]
        if not requests:
            return
        statuses = await self._call_many(client, "Cmcs", [(m, args) for _u, m, args in requests])
        for (unit, method, _args), status in zip(requests, statuses, strict=True):
            if status != "Good":
                log.warning("CMCS: %s %s refused: %s", method, unit, status)
            elif method == "ClearLossOfRedundancy":
                self.redundancy_reported.pop(unit, None)
        for (unit, now), status in zip(reports, statuses, strict=False):
            if status == "Good":
                self.redundancy_reported[unit] = now

    async def _call_many(self, client: Client, device: str, calls: list[tuple[str, list]]) -> list[str]:
        """Several methods of one object in one Call request per 500 (a hall losing a segment
        warns about every unit of the aisle at once); their StatusCode names, in order."""
        out: list[str] = []
        for i in range(0, len(calls), 500):
            chunk = calls[i:i + 500]
            reqs, index = [], []
            for method, args in chunk:
                ids = self.nodes.methods.get((device, method))
                index.append(ids is not None)
                if ids is not None:
                    reqs.append(ua.CallMethodRequest(ObjectId=ids[0], MethodId=ids[1], InputArguments=args))
            results = iter(await client.uaclient.call(reqs) if reqs else [])
            out += [next(results).StatusCode.name if found else "BadMethodInvalid" for found in index]
        return out

    async def _publish(self, client: Client, risk: dict | None, forecast: np.ndarray | None) -> None:
        nodes = self.nodes
        writes: list[tuple[ua.NodeId | None, object, ua.VariantType]] = []
        if risk is not None:
            unit_risk = np.fmax(risk["ats"], risk.get("des", np.full_like(risk["ats"], np.nan)))
            for kind, r in (("source", risk["source"]), ("pdb", risk["pdb"]), ("ats", unit_risk)):
                for nid, v in zip(nodes.var.get((kind, "RiskScore"), ()), r, strict=False):
                    if nid is not None and np.isfinite(v):
                        writes.append((nid, float(min(max(v, 0.0), 1.0)), ua.VariantType.Double))
        if forecast is not None:
            for nid, v in zip(nodes.var.get(("ats", "PredictedLoad"), ()), forecast, strict=False):
                if nid is not None and np.isfinite(v):
                    writes.append((nid, float(max(v, 0.0)), ua.VariantType.Double))
        writes.append((nodes.cmcs_var.get("CycleTime"), float(self.last_cycle_ms), ua.VariantType.Double))
        writes.append((nodes.cmcs_var.get("ActiveMitigations"), self.policy_state.active_mitigations(),
                       ua.VariantType.UInt32))
        await self._write(client, writes)

    async def _write(self, client: Client, writes) -> None:
        """Write the values that changed (deadband 0.1 % of the value, at least 0.001): a result
        that holds still costs the gateway and its historian nothing."""
        last = self._written
        todo = []
        for nid, v, vt in writes:
            if nid is None:
                continue
            old = last.get(nid)
            if isinstance(v, float) and isinstance(old, float) and abs(v - old) <= max(1e-3, 1e-3 * abs(old)):
                continue
            if old is not None and not isinstance(v, float) and v == old:
                continue
            last[nid] = v
            todo.append((nid, v, vt))
        wvs = [ua.WriteValue(NodeId=nid, AttributeId=ua.AttributeIds.Value,
                             Value=ua.DataValue(ua.Variant(v, vt)))
               for nid, v, vt in todo]
        for i in range(0, len(wvs), 1000):
            chunk = wvs[i:i + 1000]
            results = await client.uaclient.write(ua.WriteParameters(NodesToWrite=chunk))
            bad = [r for r in results if not r.is_good()]
            for wv, r in zip(chunk, results, strict=False):
                if not r.is_good():
                    last.pop(wv.NodeId, None)  # try again next cycle
            if bad:
                log.warning("CMCS: %d writes refused (%s): does the CMCS user have the Engineer role?",
                            len(bad), bad[0].name)


def _item(nodeid: ua.NodeId, handle: int) -> ua.MonitoredItemCreateRequest:
    params = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=0.0, QueueSize=1, DiscardOldest=True)
    return ua.MonitoredItemCreateRequest(ItemToMonitor=ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value),
                                         MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params)


def _describe(a) -> str:
    why = "; ".join(x for x in (getattr(a, "reason", ""), getattr(a, "component", "")) if x)
    why = f" ({why})" if why else ""
    if isinstance(a, SwitchSource):
        return f"SwitchSource {a.unit} -> {'SourceA' if a.target == 1 else 'SourceB'}{why}"
    if isinstance(a, SetPreferredSource):
        return f"SetPreferredSource {a.unit} = {'SourceA' if a.source == 1 else 'SourceB'}{why}"
    if isinstance(a, StartBridging):
        return f"StartBridging {a.des} {a.power_kw:.2f} kW for {a.duration_s:.0f} s{why}"
    if isinstance(a, StopBridging):
        return f"StopBridging {a.des}{why}"
    return repr(a)


# ---- discovery --------------------------------------------------------------------------------------
async def _browse(client: Client, nodeids: list[ua.NodeId]) -> dict[ua.NodeId, list[ua.ReferenceDescription]]:
    out: dict[ua.NodeId, list[ua.ReferenceDescription]] = {}
    for i in range(0, len(nodeids), 200):
        chunk = nodeids[i:i + 200]
        params = ua.BrowseParameters()
        params.View = ua.ViewDescription()
        params.RequestedMaxReferencesPerNode = 0
        params.NodesToBrowse = [ua.BrowseDescription(
            NodeId=n, BrowseDirection=ua.BrowseDirection.Forward,
            ReferenceTypeId=ua.NodeId(ua.ObjectIds.HierarchicalReferences), IncludeSubtypes=True,
            NodeClassMask=int(ua.NodeClass.Object) | int(ua.NodeClass.Variable) | int(ua.NodeClass.Method),
            ResultMask=int(ua.BrowseResultMask.All)) for n in chunk]
        results = await client.uaclient.browse(params)
        for n, res in zip(chunk, results, strict=True):
            refs = list(res.References or [])
            cp = res.ContinuationPoint
            while cp:
                nxt = await client.uaclient.browse_next(ua.BrowseNextParameters(ReleaseContinuationPoints=False,
                                                                                ContinuationPoints=[cp]))
                refs += nxt[0].References or []
                cp = nxt[0].ContinuationPoint
            out[n] = refs
    return out


def _nid(ref: ua.ReferenceDescription) -> ua.NodeId:
    n = ref.NodeId
    return ua.NodeId(n.Identifier, n.NamespaceIndex, n.NodeIdType)


async def discover(client: Client, site: Site) -> _Nodes:
    """Find the site's devices, points and methods by browsing (BrowseNames as in docs/interface.md)."""
    objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
    top = (await _browse(client, [objects]))[objects]
    site_ref = next((r for r in top if r.BrowseName.Name == site.name and r.NodeClass == ua.NodeClass.Object), None)
    if site_ref is None:
        raise ValueError(f"no object {site.name!r} under Objects: is this the gateway of that site?")
    devices = {s.name for s in site.sources} | {p.name for p in site.pdbs} | {u.name for u in site.units}
    expand = {"Sources", "Aisles", "Cmcs", "Storage"} | {a.name for a in site.aisles} | devices
    tree: dict[tuple[str, ...], ua.NodeId] = {}
    where: dict[str, tuple[str, ...]] = {}  # device/object name -> its path
    frontier = {_nid(site_ref): ()}
    for _depth in range(6):
        if not frontier:
            break
        refs = await _browse(client, list(frontier))
        nxt = {}
        for parent, rs in refs.items():
            ppath = frontier[parent]
            for r in rs:
                name = r.BrowseName.Name
                path = ppath + (name,)
                tree[path] = _nid(r)
                if r.NodeClass == ua.NodeClass.Object and name in expand:
                    nxt[_nid(r)] = path
                    if name != "Storage":
                        where.setdefault(name, path)
        frontier = nxt
    nodes = _Nodes()
    topo_names = Topology.from_site(site)
    per_kind = {"source": [(n, where.get(n)) for n in topo_names.source_names],
                "pdb": [(n, where.get(n)) for n in topo_names.pdb_names],
                "ats": [(n, where.get(n)) for n in topo_names.unit_names],
                "des": [(d, where[u] + ("Storage",) if d and u in where else None)
                        for u, d in zip(topo_names.unit_names, topo_names.des_names, strict=True)]}
    for kind, devs in per_kind.items():
        for spec in POINTS[kind]:
            ids = []
            for name, path in devs:
                nid = tree.get(path + (spec.name,)) if path else None
                if nid is None and name:
                    nodes.missing.append(f"{name}.{spec.name}")
                ids.append(nid)
            nodes.var[(kind, spec.name)] = ids
        for extra in ("RiskScore", "PredictedLoad"):
            nodes.var[(kind, extra)] = [tree.get(path + (extra,)) if path else None for _n, path in devs]
        for name, path in devs:
            if not path:
                continue
            for method in ("SwitchSource", "SetPreferredSource", "StartBridging", "StopBridging"):
                mid = tree.get(path + (method,))
                if mid is not None:
                    nodes.methods[(name, method)] = (tree[path], mid)
    cmcs = where.get("Cmcs")
    if cmcs is None:
        raise ValueError("no Cmcs object in the site's address space")
    for point in ("Mode", "RiskThreshold", "CycleTime", "ModelVersion", "ActiveMitigations"):
        if cmcs + (point,) in tree:
            nodes.cmcs_var[point] = tree[cmcs + (point,)]
    for method in ("ReportPrediction", "ClearPrediction", "Advise", "SetMode", "ReportLossOfRedundancy",
                   "ClearLossOfRedundancy"):
        if cmcs + (method,) in tree:
            nodes.methods[("Cmcs", method)] = (tree[cmcs], tree[cmcs + (method,)])
    return nodes
