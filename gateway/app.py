"""`cmcs run`: drivers, point table, command service and OPC UA server, wired together.

With no site file the built-in demo site runs with its device simulators in-process, serving
real Modbus TCP on loopback; the gateway polls them exactly as it would real devices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from drivers.modbus.driver import ModbusDriver
from drivers.pointtable import PointTable
from gateway.cli import CliError
from gateway.commands import AuditLog, CommandService
from gateway.server import GatewayServer
from siteconfig.model import Site

log = logging.getLogger(__name__)


def prepare_data_dir(path: Path) -> Path:
    """The state directory, created private (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@dataclass
class Gateway:
    """A running gateway; `await start()`, `await stop()`."""

    site: Site
    data_dir: Path
    opcua_port: int | None = None
    opcua_host: str | None = None

    def __post_init__(self) -> None:
        self.table = PointTable()
        self.driver = ModbusDriver(self.site, self.table)
        self.audit = AuditLog(Path(self.data_dir) / "audit.log")
        self.commands = CommandService(self.site, self.table, self.driver, self.audit)
        self.server = GatewayServer(self.site, self.table, self.commands, host=self.opcua_host, port=self.opcua_port,
                                    health=self.driver.health, data_dir=Path(self.data_dir))

    historian: object = None  # gateway.historian.Historian once started

    async def start(self) -> None:
        from gateway.historian import attach as attach_historian

        await self.driver.start()
        await self.server.start()
        self.historian = await attach_historian(self.server, Path(self.data_dir))
        # alarms and audit events go to the historian too (HistoryRead of events on the Server object)
        await self.server.server.iserver.history_manager.historize_event(self.server.server.nodes.server,
                                                                          period=None)

    async def stop(self) -> None:
        await self.server.stop()
        if self.historian is not None:
            await self.historian.close()
        await self.driver.stop()


async def run_until_signalled(site: Site, data_dir: Path, simulate: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = None
    if simulate:
        from simulator.endpoints import SimulatorHost

        host = SimulatorHost(site)
        await host.start()
    gateway = Gateway(site, data_dir)
    try:
        await gateway.start()
        print(f"cmcs-gateway: site '{site.name}', {len(site.units)} micro-ATS; OPC UA at {gateway.server.endpoint}"
              + (" (demo: simulators in-process on loopback)" if simulate else "") + "; Ctrl-C to stop", flush=True)
        print(f"cmcs-gateway: {gateway.server.security.summary()}", flush=True)
        await stop.wait()
    finally:
        await gateway.stop()
        if host is not None:
            await host.stop()
        print("cmcs-gateway: stopped", flush=True)


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
        asyncio.run(run_until_signalled(site, data_dir, simulate))
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from None
    return 0
