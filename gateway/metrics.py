"""The Prometheus endpoint (docs/interface.md section 9): the gateway's own health, for the monitoring a site has.

The exporter is a point-table sink (kind "coalescing": it keeps only what it shows, the latest
device quality) plus a once-a-second refresh on the gateway's loop that reads the services:
the drivers' `ConnectionHealth`, asyncua's sessions and monitored items, the RiskScore and
CycleTime the CMCS writes into the address space, the alarm engine, and the MQTT publisher's
queue. Command outcomes arrive from the command service's audit log (`AuditLog.listeners`).

prometheus_client's metric objects are thread-safe, so the HTTP server (its own thread) only
renders them; it never touches the address space or the point table.

Series (all prefixed `cmcs_`):
- device_up{device}                       1 while the device's data is Good, else 0
- poll_duration_seconds{connection}       histogram of the drivers' poll cycles, sampled once per
                                          refresh (the last completed poll of each connection)
- poll_overruns_total{connection}         scans that came a whole period late
- opcua_sessions, opcua_monitored_items   what clients hold on the OPC UA server
- cycle_seconds                           duration of the CMCS's last cycle (Cmcs.CycleTime)
- risk_score{component}                   the CMCS's RiskScore of each component, once it has run a cycle
- commands_total{method,status}           every method call by its StatusCode name; every method of
                                          docs/interface.md's object types x every status of its
                                          "Method results" table exists at 0 from start-up
- mqtt_queue_messages                     Sparkplug messages waiting for the broker (0 without MQTT)
- build_info{version}                     1
- alarms_active, sink_errors_total{sink}              extras: active alarm conditions, sink exceptions
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from asyncua import ua
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from drivers.pointtable import Birth, Quality, Sink
from gateway.cli import package_version
from gateway.users import hash_password, verify_password
from siteconfig.model import MetricsConfig

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

REFRESH_INTERVAL_S = 1.0
disable_created_metrics()  # no *_created series: they double what a scraper stores and say nothing here

# The client-callable methods of docs/interface.md section 3 (object types) ...
COMMAND_METHODS = ("SwitchSource", "SetPreferredSource", "StartBridging", "StopBridging", "SetMode")
# ... and the StatusCodes of its "Method results" table, plus Good.
COMMAND_STATUSES = ("Good", "BadUserAccessDenied", "BadOutOfRange", "BadInvalidArgument", "BadInvalidState",
                    "BadRequestNotAllowed", "BadTooManyOperations", "BadCommunicationError")

# Modbus polls take milliseconds on a LAN; a poll near a second is a scan at risk.
POLL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsExporter(Sink):
    """The metric objects, fed by the point table (device quality) and by `refresh()` from the services."""

    name = "metrics"
    kind = "coalescing"

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.device_up = Gauge("cmcs_device_up", "1 while the device's data is Good, else 0", ["device"], registry=r)
        self.poll_duration = Histogram("cmcs_poll_duration_seconds", "duration of the drivers' poll cycles, "
                                       "sampled once a second per connection", ["connection"], buckets=POLL_BUCKETS_S,
                                       registry=r)
        self.poll_overruns = Counter("cmcs_poll_overruns", "scans that came a whole scan period late",
                                     ["connection"], registry=r)
        self.opcua_sessions = Gauge("cmcs_opcua_sessions", "OPC UA client sessions open", registry=r)
        self.opcua_monitored_items = Gauge("cmcs_opcua_monitored_items", "monitored items of every OPC UA subscription",
                                           registry=r)
        self.cycle_seconds = Gauge("cmcs_cycle_seconds", "duration of the CMCS's last cycle (Cmcs.CycleTime)",
                                   registry=r)
        self.risk_score = Gauge("cmcs_risk_score", "the CMCS's RiskScore (0..1) of a component", ["component"],
                                registry=r)
        self.commands = Counter("cmcs_commands", "method calls by method and result StatusCode", ["method", "status"],
                                registry=r)
        self.mqtt_queue = Gauge("cmcs_mqtt_queue_messages", "Sparkplug messages waiting for the broker", registry=r)
        self.build_info = Gauge("cmcs_build_info", "the running build", ["version"], registry=r)
        self.alarms_active = Gauge("cmcs_alarms_active", "alarm conditions active now", registry=r)
        self.sink_errors = Counter("cmcs_sink_errors", "exceptions raised by a point-table sink", ["sink"], registry=r)
        self.build_info.labels(version=version).set(1)
        for method in COMMAND_METHODS:
            for status in COMMAND_STATUSES:
                self.commands.labels(method=method, status=status)
        self.mqtt_queue.set(0)
        self._polls_seen: dict[str, int] = {}
        self._overruns_seen: dict[str, int] = {}
        self._sink_errors_seen: dict[str, int] = {}

    # ---- the sink contract --------------------------------------------------------------------
    def attach(self, birth: Birth) -> None:
        for device, quality in birth.device_quality.items():
            self.device_up.labels(device=device).set(1 if quality is Quality.GOOD else 0)

    def device_quality(self, device: str, quality: Quality, ts: float) -> None:
        self.device_up.labels(device=device).set(1 if quality is Quality.GOOD else 0)

    def forget(self, devices: set[str]) -> None:
        """Drop the series of devices a site reload removed (device_up, risk_score)."""
        for device in devices:
            for metric in (self.device_up, self.risk_score):
                try:
                    metric.remove(device)
                except KeyError:
                    pass  # never had a value

    # ---- the audit log's listener ----------------------------------------------------------------
    def on_audit(self, record: dict) -> None:
        """One audited call (gateway.commands.AuditLog): count it by method and StatusCode name."""
        method, status = record.get("method"), record.get("status")
        if method and status:
            self.commands.labels(method=str(method), status=str(status)).inc()

    # ---- the services, once a second --------------------------------------------------------------
    def observe_health(self, health: list) -> None:
        """Driver ConnectionHealth entries: a poll-duration sample per new poll cycle, overruns as they grow."""
        for h in health:
            key = h.key
            if h.polls != self._polls_seen.get(key, 0):
                self._polls_seen[key] = h.polls
                self.poll_duration.labels(connection=key).observe(h.poll_duration_ms / 1000.0)
            else:
                self.poll_duration.labels(connection=key)  # the series exists before the first poll
            grown = h.overruns - self._overruns_seen.get(key, 0)
            counter = self.poll_overruns.labels(connection=key)
            if grown > 0:
                counter.inc(grown)
            self._overruns_seen[key] = h.overruns

    def observe_sink_errors(self, sink_errors: dict[str, int]) -> None:
        for sink, count in sink_errors.items():
            grown = count - self._sink_errors_seen.get(sink, 0)
            if grown > 0:
                self.sink_errors.labels(sink=sink).inc(grown)
            self._sink_errors_seen[sink] = count


# ---- reading asyncua's server internals -------------------------------------------------------------
def opcua_sessions(iserver) -> int:
    """Client sessions asyncua has registered (InternalServer._external_sessions: created, not yet closed)."""
    return len(getattr(iserver, "_external_sessions", {}))


def opcua_monitored_items(iserver) -> int:
    """Monitored items of every subscription (MonitoredItemService._monitored_items)."""
    subscriptions = getattr(iserver.subscription_service, "subscriptions", {})
    return sum(len(getattr(sub.monitored_item_srv, "_monitored_items", ())) for sub in list(subscriptions.values()))


def address_space_value(iserver, nodeid):
    """The Value attribute stored in the address space, or None when it is not Good or not set."""
    dv = iserver.aspace.read_attribute_value(nodeid, ua.AttributeIds.Value)
    if dv is None or dv.StatusCode is None or not dv.StatusCode.is_good() or dv.Value is None:
        return None
    return dv.Value.Value


def mqtt_queue_messages(sinks: list[Sink]) -> int:
    """Messages the Sparkplug publisher has not handed to the broker: its sink's stats()["queue_messages"]
    (gateway/sparkplug/edge.py; messages in the store-and-forward queue); 0 without one."""
    total = 0
    for sink in sinks:
        if any(word in sink.name.lower() for word in ("sparkplug", "mqtt")):
            stats = sink.stats()
            total += int(stats.get("queue_messages", 0) or 0)
    return total


def alarms_active(alarms) -> int:
    if alarms is None:
        return 0
    return sum(1 for c in list(alarms.conditions.values()) if c.active)


@dataclass
class GatewayMetrics:
    """The exporter attached to a running gateway, its refresh task and its HTTP server."""

    gateway: Gateway
    config: MetricsConfig
    exporter: MetricsExporter | None = None
    http: MetricsHttpServer | None = None
    mqtt_queue_source: Callable[[], int] | None = None  # set by the MQTT publisher's wiring if it has a better count
    _task: asyncio.Task | None = None
    _risk_nodes: list | None = None  # (component, RiskScore NodeId), found once

    def __post_init__(self) -> None:
        # made here so that the gateway's wiring can attach it with the other sinks (gateway/app.py
        # Gateway.sinks) before start() serves it
        if self.exporter is None:
            self.exporter = MetricsExporter(package_version())

    def site_changed(self, removed: set[str]) -> None:
        """A site reload added or removed devices: removed ones lose their series, the RiskScore
        nodes are found again (new devices' series appear with their first values)."""
        self.exporter.forget(removed)
        self._risk_nodes = None

    async def start(self) -> None:
        gw = self.gateway
        if self.exporter not in gw.table.sinks():  # not wired by Gateway.attach_sinks: attach it here
            gw.table.attach(self.exporter)
        gw.audit.listeners.append(self.exporter.on_audit)
        self.refresh()
        self.http = MetricsHttpServer(self.exporter.registry, self.config)
        self.http.start()
        self._task = asyncio.create_task(self._refresh_loop(), name="metrics refresh")
        log.info("metrics: Prometheus endpoint at %s", self.http.url)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.http is not None:
            self.http.stop()
        if self.exporter is not None:
            self.gateway.table.detach(self.exporter)
            if self.exporter.on_audit in self.gateway.audit.listeners:
                self.gateway.audit.listeners.remove(self.exporter.on_audit)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the metrics must never take the gateway down
                log.exception("metrics: refresh failed")

    def refresh(self) -> None:
        """Read the services into the metric objects (on the gateway's loop)."""
        gw, ex = self.gateway, self.exporter
        ex.observe_health(gw.driver.health())
        ex.observe_sink_errors(gw.table.sink_errors)
        server = gw.server
        iserver = server.server.iserver
        ex.opcua_sessions.set(opcua_sessions(iserver))
        ex.opcua_monitored_items.set(opcua_monitored_items(iserver))
        ex.alarms_active.set(alarms_active(server.alarms))
        ex.mqtt_queue.set(self.mqtt_queue_source() if self.mqtt_queue_source else mqtt_queue_messages(gw.table.sinks()))
        model = server.model
        if model is None:
            return
        if self._risk_nodes is None:
            self._risk_nodes = [(device, nodeid) for (device, point), nodeid in model.points.items() if point == "RiskScore"]
        for device, nodeid in self._risk_nodes:
            risk = address_space_value(iserver, nodeid)
            if risk is not None:  # the series appears with the CMCS's first write
                ex.risk_score.labels(component=device).set(float(risk))
        cycle_nodeid = model.points.get(("Cmcs", "CycleTime"))
        if cycle_nodeid is not None:
            cycle_ms = address_space_value(iserver, cycle_nodeid)
            if cycle_ms is not None:
                ex.cycle_seconds.set(float(cycle_ms) / 1000.0)


# ---- HTTP(S) with optional basic auth -----------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.debug("metrics: " + format, *args)


class MetricsHttpServer:
    """prometheus_client's WSGI app on its own thread; TLS when a cert is configured, basic auth when a user is."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig) -> None:
        self.config = config
        self.app = make_wsgi_app(registry)
        if config.basic_auth_user:
            self.app = _basic_auth(self.app, config.basic_auth_user, config.basic_auth_password_hash or "")
        self._httpd = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"{scheme}://{host}:{self.port}/metrics"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self.config.port

    def start(self) -> None:
        class Server(ThreadingWSGIServer):
            pass

        if ":" in self.config.host:
            Server.address_family = socket.AF_INET6
        self._httpd = make_server(self.config.host, self.config.port, self.app, Server, handler_class=_QuietHandler)
        if self.config.tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def _basic_auth(app, user: str, password_hash: str):
    """Wrap a WSGI app: 401 unless the request's Basic credentials match (password checked against its scrypt hash)."""
    # scrypt costs ~0.1 s a check: remember the last header that passed, so a scraper every 15 s costs nothing
    accepted: set[str] = set()
    lock = threading.Lock()

    def guarded(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        ok = header in accepted
        if not ok and header.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", ""
            ok = name == user and verify_password(password, password_hash)
            if ok:
                with lock:
                    accepted.clear()
                    accepted.add(header)
        if not ok:
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="cmcs-gateway metrics"'),
                                                ("Content-Type", "text/plain")])
            return [b"authentication required\n"]
        return app(environ, start_response)

    return guarded


def parse_metrics_address(text: str) -> tuple[str, int]:
    """`cmcs run --metrics [HOST:]PORT` -> (host, port); host defaults to loopback. ValueError with one line."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--metrics {text}: expected [HOST:]PORT, e.g. 9464 or 0.0.0.0:9464") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics {text}: port must be 0..65535")
    return host, port


def cli_hash_password(args) -> int:
    """`cmcs metrics hash-password`: the scrypt hash to put in gateway.metrics.basic_auth.password_hash."""
    import getpass
    import sys

    from siteconfig.errors import CliError

    password = getpass.getpass("scraper password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("empty password")
    print(hash_password(password))
    return 0
