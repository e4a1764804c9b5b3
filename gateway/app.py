"""`cmcs run`: drivers, point table, command service and OPC UA server, wired together.

With no site file the built-in demo site runs with its device simulators in-process, serving
real Modbus TCP on loopback; the gateway polls them exactly as it would real devices.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from drivers.base import DriverUnavailable
from drivers.pointtable import PointTable, Sink
from drivers.worker import make_driver_set
from gateway.commands import AuditLog, CommandService
from gateway.datadir import prepare_data_dir
from gateway.historian import Historian
from gateway.historian import attach as attach_historian
from gateway.security import CMCS_USER, ensure_cmcs_client
from gateway.server import GatewayServer
from gateway.service import ServiceHooks
from siteconfig.errors import CliError
from siteconfig.model import MetricsConfig, Site

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Exempt what start-up built from the cyclic garbage collector's later passes.

    The address space (about 80k nodes and their attributes at 1,000 units), the point table
    and the loaded models live as long as the process, yet every full collection walked them
    again: under every-value-changing load that showed as 15 % of the gateway's CPU, charged to
    whatever allocated next (docs/notes/asyncua.md, "Throughput"). `gc.freeze` moves them to the
    permanent generation; what is allocated afterwards is collected as before. (No `gc.collect()`
    first: at 1,000 units it took 0.6 s of the start-up for the little garbage it would free.)"""
    gc.freeze()


@dataclass
class Gateway:
    """A running gateway; `await start()`, `await stop()`."""

    site: Site
    data_dir: Path
    opcua_port: int | None = None
    opcua_host: str | None = None
    cmcs: bool = False  # run the built-in CMCS (an OPC UA client of this gateway); `cmcs run` turns it on
    cmcs_bundle: Path | None = None  # model bundle (None: <data-dir>/models/current, else the shipped one)
    cmcs_time_scale: float = 1.0  # plant seconds per wall second (simulators run faster than real time)
    metrics_config: MetricsConfig | None = None  # Prometheus endpoint; None: the site file's gateway.metrics (off if absent)

    def __post_init__(self) -> None:
        self.table = PointTable()
        self.driver = make_driver_set(self.site, self.table)  # Modbus: in a worker process
        self.audit = AuditLog(Path(self.data_dir) / "audit.log")
        self.commands = CommandService(self.site, self.table, self.driver, self.audit)
        self.server = GatewayServer(self.site, self.table, self.commands, host=self.opcua_host, port=self.opcua_port,
                                    health=self.driver.health, data_dir=Path(self.data_dir))

    historian: Historian | None = None  # once started
    sparkplug: object = None  # gateway.sparkplug.EdgeNode once started (site file: gateway.mqtt)
    live: object = None  # cmcs.live.LiveCmcs once started
    _cmcs_stop: asyncio.Event | None = None
    _cmcs_task: asyncio.Task | None = None
    metrics: object = None  # gateway.metrics.GatewayMetrics when the endpoint is on
    summary: object = None  # gateway.summary.LogSummary
    _attached: tuple[Sink, ...] = ()

    async def start(self) -> None:
        # No cyclic collection while start-up builds the address space (about 80k nodes at 1,000
        # units): each pass walked the whole growing heap again (build_site 1.4-2.0 s -> 1.0-1.4 s
        # without). What start-up built is then frozen (freeze_heap) and collection resumes.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._start()
        finally:
            if collecting:
                gc.enable()

    async def _start(self) -> None:
        await self.driver.start()
        await self.server.build()  # address space, security, methods, alarm engine: not listening yet
        self.historian = await attach_historian(self.server, Path(self.data_dir))
        # alarms and audit events go to the historian too (HistoryRead of events on the Server object)
        await self.server.server.iserver.history_manager.historize_event(self.server.server.nodes.server,
                                                                          period=None)
        if self.site.gateway.mqtt is not None:
            await self.start_sparkplug()
        self.make_metrics()
        self.attach_sinks()
        await self.server.serve()  # the address space holds the birth before the first client comes
        if self.sparkplug is not None:
            self.sparkplug.start()  # its publisher thread connects to the broker, with backoff
        if self.cmcs:
            await self.start_cmcs()
        await self.start_operations()
        freeze_heap()

    # ---- where the point table's values go: every sink, here and nowhere else ----------------------
    def sinks(self) -> list[Sink]:
        """Every consumer of the point table (drivers/pointtable.py Sink), in the order each batch
        reaches them. Each gets its birth (the table's current state) when attached; each shows
        its counters in Diagnostics (Objects/<Site>/Diagnostics/Sink <name>)."""
        sinks: list[Sink] = [
            self.commands.transfer_watch,  # dwell time after automatic transfers (lossless, inline)
            self.server.values,  # the OPC UA address space (coalescing, flushed every 20 ms)
            self.server.alarms,  # alarm rules -> Part 9 conditions (lossless, inline)
            self.historian.feed,  # history.sqlite3 (lossless, written by the historian's thread)
        ]
        if self.sparkplug is not None:
            sinks.append(self.sparkplug)  # Sparkplug B edge node (lossless, its own thread and queue)
        if self.metrics is not None:
            sinks.append(self.metrics.exporter)  # Prometheus exporter (coalescing)
        return sinks

    def attach_sinks(self) -> None:
        self._attached = tuple(self.sinks())
        for sink in self._attached:
            self.table.attach(sink)

    def detach_sinks(self) -> None:
        for sink in reversed(self._attached):
            self.table.detach(sink)  # a sink detached already (e.g. on its own stop) is skipped
        self._attached = ()

    def make_metrics(self) -> None:
        """The Prometheus exporter, when an endpoint is configured (served by start_operations)."""
        metrics = self.metrics_config or self.site.gateway.metrics
        if metrics is not None:
            from gateway.metrics import GatewayMetrics  # lazy: prometheus-client, only when on

            self.metrics = GatewayMetrics(self, metrics)

    async def start_operations(self) -> None:
        """Ops loops (issue 21): the Prometheus endpoint and the periodic log summary."""
        from gateway.summary import LogSummary

        if self.metrics is not None:
            await self.metrics.start()
        self.summary = LogSummary(self, self.site.gateway.log_summary_s)
        self.summary.start()

    async def stop_operations(self) -> None:
        if self.summary is not None:
            await self.summary.stop()
        if self.metrics is not None:
            await self.metrics.stop()

    async def start_sparkplug(self) -> None:
        """The Sparkplug B edge node (gateway/sparkplug): a lossless sink of the point table (attached
        in `attach_sinks`), plus the CMCS results and alarms of the OPC UA server; `start()` after the
        attach connects it to the broker on its own thread."""
        from gateway.sparkplug import EdgeNode

        node = EdgeNode(self.site, self.site.gateway.mqtt, Path(self.data_dir), commands=self.commands,
                        loop=asyncio.get_running_loop())
        await node.attach_server(self.server)
        self.sparkplug = node

    def bundle_dir(self) -> Path:
        from cmcs.models import SHIPPED_BUNDLE

        if self.cmcs_bundle is not None:
            return Path(self.cmcs_bundle)
        current = Path(self.data_dir) / "models" / "current"
        return current if (current / "bundle.json").exists() else SHIPPED_BUNDLE

    async def start_cmcs(self) -> None:
        """The built-in CMCS: an OPC UA client of this server, with its own certificate and the
        Engineer role (gateway.security.ensure_cmcs_client), like any other client."""
        from cmcs.live import LiveCmcs, LiveOptions  # lazy: loads xgboost, only when the CMCS runs

        cert, key, uri = ensure_cmcs_client(Path(self.data_dir))
        srv = self.server
        host = srv.host if srv.host not in ("0.0.0.0", "", "::") else "127.0.0.1"
        options = LiveOptions(endpoint=f"opc.tcp://{host}:{srv.port}{srv.path}", certificate=cert, private_key=key,
                              application_uri=uri, bundle=self.bundle_dir(), time_scale=self.cmcs_time_scale)
        loop = asyncio.get_running_loop()
        self.live = await loop.run_in_executor(None, LiveCmcs, self.site, options)  # loads xgboost boosters
        srv.model_version = self.live.model_version
        # a bundle trained for another layout: SetMode(Automatic) is refused (BadInvalidState), with this reason
        srv.cmcs_advisory_only = self.live.layout.reason if self.live.advisory_only else ""
        self._cmcs_stop = asyncio.Event()
        self._cmcs_task = asyncio.create_task(self.live.run(self._cmcs_stop), name="cmcs")

    async def stop_cmcs(self) -> None:
        """Stop the built-in CMCS (if it runs); `start_cmcs()` starts it again (a reload does both)."""
        if self._cmcs_task is not None:
            self._cmcs_stop.set()
            try:
                await asyncio.wait_for(self._cmcs_task, 10)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping anyway
                log.warning("CMCS did not stop cleanly: %s", exc)
            self._cmcs_task = None

    async def stop(self) -> None:
        await self.stop_operations()
        await self.stop_cmcs()
        if self.sparkplug is not None:
            self.table.detach(self.sparkplug)
            await self.sparkplug.aclose()
        await self.server.stop()
        self.detach_sinks()
        if self.historian is not None:
            await self.historian.close()
        await self.driver.stop()


async def run_until_signalled(site: Site, data_dir: Path, simulate: bool, cmcs: bool = True,
                              bundle: Path | None = None, metrics: MetricsConfig | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = None
    if simulate:
        from simulator.endpoints import SimulatorHost

        host = SimulatorHost(site)
        await host.start()
    gateway = Gateway(site, data_dir, cmcs=cmcs, cmcs_bundle=bundle, metrics_config=metrics)
    service = ServiceHooks(gateway)  # sd_notify, watchdog, SIGHUP reload (gateway/service.py)
    try:
        await gateway.start()
        service.started()
        print(f"cmcs-gateway: site '{site.name}', {len(site.units)} micro-ATS; OPC UA at {gateway.server.endpoint}"
              + (" (demo: simulators in-process on loopback)" if simulate else "") + "; Ctrl-C to stop", flush=True)
        print(f"cmcs-gateway: {gateway.server.security.summary()}", flush=True)
        if gateway.live is not None:
            print(f"cmcs-gateway: built-in CMCS (user '{CMCS_USER}', model {gateway.live.predictor.version}), "
                  f"mode {gateway.server.cmcs_mode.name.title()}", flush=True)
            if gateway.live.advisory_only:
                print(f"cmcs-gateway: {layout_mismatch_line(gateway)}", flush=True)
        if gateway.metrics is not None:
            print(f"cmcs-gateway: metrics at {gateway.metrics.http.url}", flush=True)
        await stop.wait()
    finally:
        await service.stopping()
        await gateway.stop()
        if host is not None:
            await host.stop()
        print("cmcs-gateway: stopped", flush=True)


def metrics_from_args(args, site: Site) -> MetricsConfig | None:
    """`--metrics [HOST:]PORT` overrides gateway.metrics' address (keeping its TLS and basic auth)."""
    text = getattr(args, "metrics", None)
    if text is None:
        return None
    from dataclasses import replace

    from gateway.metrics import parse_metrics_address

    try:
        host, port = parse_metrics_address(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return replace(site.gateway.metrics or MetricsConfig(), host=host, port=port)


def layout_mismatch_line(gateway: Gateway) -> str:
    """The start-up line of a CMCS whose bundle was trained for another layout (cmcs.layout)."""
    live = gateway.live
    rec, check = live.layout.bundle, live.layout
    site_file = gateway.site.path or "SITE"
    return (f"model bundle {live.predictor.version} was trained for another layout ({rec.get('summary', '?')}); "
            f"this site is {check.site_summary}: CMCS stays Advisory until a matching bundle is installed "
            f"(cmcs train --config {site_file} --data-dir {gateway.data_dir})")


def cli_run(args) -> int:
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    if args.config is None:
        from siteconfig.demo import demo_site

        site, simulate = demo_site(), True
    else:
        from siteconfig.loader import load_site

        try:
            site = load_site(args.config)
        except (ConfigError, ConfigErrors) as exc:
            raise CliError(str(exc), exit_code=1) from None
        simulate = False
    data_dir = prepare_data_dir(args.data_dir)
    try:
        if args.bundle is not None and not (Path(args.bundle) / "bundle.json").exists():
            raise CliError(f"--bundle {args.bundle}: no bundle.json there")
        asyncio.run(run_until_signalled(site, data_dir, simulate, cmcs=not args.no_cmcs, bundle=args.bundle,
                                        metrics=metrics_from_args(args, site)))
    except (OSError, DriverUnavailable) as exc:  # DriverUnavailable: e.g. driver tsn without its interface
        raise CliError(f"cannot start: {exc}") from None
    except Exception as exc:
        from cmcs.models import BundleError

        if isinstance(exc, BundleError):
            raise CliError(f"CMCS model bundle: {exc} (or start with --no-cmcs)") from None
        raise
    return 0
