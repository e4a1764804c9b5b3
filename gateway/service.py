"""Running as a systemd service: readiness and watchdog over sd_notify, SIGHUP reload, `cmcs install-service`.

sd_notify is the datagram protocol of sd_notify(3): one message `KEY=VALUE\\n...` to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' is the abstract namespace). Without the
variable (not under systemd, or Type=simple) every call is a no-op. The gateway sends READY=1
once the OPC UA server listens, STATUS= with the periodic summary, WATCHDOG=1 every half of
$WATCHDOG_USEC from its event loop (a loop blocked for longer than WatchdogSec gets the service
restarted), RELOADING=1/READY=1 around a SIGHUP reload and STOPPING=1 on SIGTERM.

The unit file is packaging/systemd/cmcs-gateway.service; `cmcs install-service` renders it with
this installation's `cmcs` path, writes it with its TSN drop-in, creates the service user and the
directories, and says what to run next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.reload import reload_gateway
from siteconfig.errors import CliError

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

UNIT_NAME = "cmcs-gateway.service"
PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "systemd"


def sd_notify(*assignments: str) -> bool:
    """Send `KEY=VALUE` lines to the service manager; False when there is none (or it did not take them)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode("utf-8"))
        return True
    except OSError as exc:
        log.debug("sd_notify to %s failed: %s", address, exc)
        return False


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asks for ($WATCHDOG_USEC, for this process), None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class ServiceHooks:
    """What `cmcs run` adds when it runs as a service: notify, watchdog, SIGHUP -> gateway.reload."""

    def __init__(self, gateway: Gateway) -> None:
        """Call on the running loop before the gateway starts: a SIGHUP during start-up is ignored, not fatal."""
        self.gateway = gateway
        self._tasks: list[asyncio.Task] = []
        self._reloading: asyncio.Task | None = None
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: log.warning("SIGHUP during start-up: ignored (send it again once started)"))

    def started(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        sd_notify("READY=1", f"STATUS=serving {self.gateway.server.endpoint}", f"MAINPID={os.getpid()}")
        interval = watchdog_interval_s()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval), name="sd watchdog"))
        summary = getattr(self.gateway, "summary", None)
        if summary is not None and os.environ.get("NOTIFY_SOCKET"):
            self._tasks.append(asyncio.create_task(self._status(summary), name="sd status"))

    def _on_sighup(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            log.warning("SIGHUP: a reload is still running; ignored")
            return

        async def run() -> None:
            sd_notify("RELOADING=1", "STATUS=reloading")
            try:
                await reload_gateway(self.gateway)
            except Exception:  # noqa: BLE001 - a failed reload leaves the gateway as it was, running
                log.exception("SIGHUP reload failed; the gateway runs on unchanged")
            finally:
                sd_notify("READY=1", f"STATUS=serving {self.gateway.server.endpoint}")

        self._reloading = asyncio.create_task(run(), name="reload")

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _status(self, summary) -> None:
        period = max(float(summary.interval_s or 60.0), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                sd_notify(f"STATUS={summary.line()}")
            except Exception:  # noqa: BLE001 - a status line is never worth stopping for
                log.debug("service status line failed", exc_info=True)

    async def stopping(self) -> None:
        sd_notify("STOPPING=1", "STATUS=stopping: flushing history")
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        except (RuntimeError, ValueError):
            pass
        for task in [*self._tasks, self._reloading]:
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                    pass


# ---- cmcs install-service ------------------------------------------------------------------------------------
def render_unit(cmcs_path: str, template: Path | None = None) -> str:
    """The unit file with ExecStart pointing at this installation's `cmcs`."""
    text = (template or PACKAGING / UNIT_NAME).read_text()
    return text.replace("/usr/local/bin/cmcs", cmcs_path)


def _cmcs_executable() -> str:
    found = shutil.which("cmcs")
    if found:
        return str(Path(found).resolve())
    candidate = Path(sys.executable).with_name("cmcs")
    if candidate.exists():
        return str(candidate)
    raise CliError("no `cmcs` executable found on PATH or next to this Python: install the package first")


def cli_install_service(args) -> int:
    """Write the unit (and the TSN drop-in with --tsn), create user and directories; --root stages into a folder."""
    root = Path(args.root) if args.root else Path("/")
    if root == Path("/") and os.geteuid() != 0:
        raise CliError("install-service writes /etc/systemd/system and creates the user cmcs: run it as root "
                       "(or stage the files with --root DIR)")
    cmcs_path = args.cmcs or _cmcs_executable()
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    unit.write_text(render_unit(cmcs_path))
    written = [unit]
    dropin_dir = unit_dir / f"{UNIT_NAME}.d"
    if args.tsn:
        dropin_dir.mkdir(exist_ok=True)
        dropin = dropin_dir / "tsn.conf"
        shutil.copyfile(PACKAGING / "tsn.conf", dropin)
        written.append(dropin)
    config_dir = root / "etc" / "cmcs"
    config_dir.mkdir(parents=True, exist_ok=True)
    site = config_dir / "site.yaml"
    if args.config and not site.exists():
        shutil.copyfile(args.config, site)
        written.append(site)
    if root == Path("/"):
        try:
            pwd.getpwnam("cmcs")
        except KeyError:
            subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/cmcs", "--no-create-home",
                            "--shell", "/usr/sbin/nologin", "cmcs"], check=True)
        os.chmod(config_dir, 0o750)
        shutil.chown(config_dir, "root", "cmcs")
        if shutil.which("systemctl"):
            subprocess.run(["systemctl", "daemon-reload"], check=False)
    for path in written:
        print(f"wrote {path}")
    if not site.exists():
        print(f"next: put the site file at {site} (cmcs config check {site})")
    print(f"next: systemctl enable --now {UNIT_NAME}; journalctl -u {UNIT_NAME} -f")
    return 0
