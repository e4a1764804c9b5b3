"""SIGHUP: reload what is safe to reload in a running gateway, and say what is not.

Reloaded live:
- users (users.yaml: `cmcs users add/remove` on the data dir), through the user manager's reload;
- the trust list (pki/trusted/, pki/crl/: `cmcs certs trust/reject`), through the certificate checker's reload;
- the CMCS model bundle: when <data-dir>/models/current holds another version than the running one
  (a `cmcs train` since start), the built-in CMCS is restarted on it; its mode and threshold live
  in the address space and are kept.

The site file is re-read and validated; if it differs from the running site the differences are
logged as one line each and NOT applied: adding or removing aisles, units or devices, or changing
addresses, ratings or gateway settings needs a restart (`systemctl restart cmcs-gateway`) in this
version. A site file that no longer validates is reported with its errors; the running site stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from siteconfig.loader import load_site
from siteconfig.yamlpos import ConfigError, ConfigErrors

if TYPE_CHECKING:
    from gateway.app import Gateway
    from siteconfig.model import Site

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)  # what a reload did is always worth a line in the journal

MAX_LISTED = 12  # differences named in the log; the rest are counted


@dataclasses.dataclass
class ReloadReport:
    users: int | None = None  # users known after the reload
    trusted: int | None = None  # trusted client certificates after the reload
    cmcs_bundle: str = ""  # "" unchanged, else the version now running
    site_changes: list[str] = dataclasses.field(default_factory=list)  # not applied: need a restart
    site_error: str = ""


async def reload_gateway(gateway: Gateway) -> ReloadReport:
    """Reload users, trust list and CMCS bundle; check the site file. Logs one line per outcome."""
    report = ReloadReport()
    security = gateway.server.security
    if security is not None:
        security.users.reload()
        report.users = len(getattr(security.users, "_users", {}))
        await security.certificates.reload_if_changed()
        report.trusted = len(getattr(security.certificates, "_trusted_der", ()))
        log.info("reload: users file %s (%s users), trust list %s (%s certificates)", security.users.path,
                 report.users, security.pki.trusted, report.trusted)
    report.cmcs_bundle = await _reload_cmcs_bundle(gateway)
    _check_site_file(gateway, report)
    return report


async def _reload_cmcs_bundle(gateway: Gateway) -> str:
    live = gateway.live
    if live is None or gateway.cmcs_bundle is not None:  # no CMCS, or a bundle pinned on the command line
        return ""
    from cmcs.models import Predictor  # xgboost: loaded only when there is a CMCS to reload

    bundle = gateway.bundle_dir()
    try:
        version = await asyncio.to_thread(lambda: Predictor.load(bundle).version)
    except Exception as exc:  # noqa: BLE001 - a broken new bundle must not stop the running CMCS
        log.error("reload: CMCS model bundle %s not loaded, the CMCS keeps %s: %s", bundle, live.predictor.version, exc)
        return ""
    if version == live.predictor.version:
        log.info("reload: CMCS model bundle unchanged (%s)", version)
        return ""
    if gateway._cmcs_task is not None:
        gateway._cmcs_stop.set()
        try:
            await asyncio.wait_for(gateway._cmcs_task, 10)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - replaced anyway
            log.warning("reload: the CMCS did not stop cleanly: %s", exc)
    await gateway.start_cmcs()
    log.info("reload: CMCS restarted on model bundle %s (was %s)", version, live.predictor.version)
    return version


def _check_site_file(gateway: Gateway, report: ReloadReport) -> None:
    path = gateway.site.path
    if not path:
        log.info("reload: built-in demo site, no site file to re-read")
        return
    try:
        new = load_site(path)
    except (ConfigError, ConfigErrors) as exc:
        report.site_error = str(exc)
        log.error("reload: site file %s has errors, the running site is kept:\n%s", path, exc)
        return
    report.site_changes = site_differences(gateway.site, new)
    if not report.site_changes:
        log.info("reload: site file %s unchanged", path)
        return
    shown = report.site_changes[:MAX_LISTED]
    more = len(report.site_changes) - len(shown)
    log.warning("reload: site file %s changed; NOT applied live, these need a restart "
                "(systemctl restart cmcs-gateway): %s%s", path, "; ".join(shown), f"; and {more} more" if more else "")


def site_differences(old: Site, new: Site) -> list[str]:
    """What differs between two sites, one short phrase each (added/removed names first, then changed values)."""
    out: list[str] = []
    old_aisles, new_aisles = {a.name for a in old.aisles}, {a.name for a in new.aisles}
    out += [f"aisle {a} added" for a in sorted(new_aisles - old_aisles)]
    out += [f"aisle {a} removed" for a in sorted(old_aisles - new_aisles)]
    old_devices = {name: (kind, ep) for name, kind, ep in old.devices()}
    new_devices = {name: (kind, ep) for name, kind, ep in new.devices()}
    out += [f"{new_devices[d][0]} {d} added" for d in sorted(set(new_devices) - set(old_devices))]
    out += [f"{old_devices[d][0]} {d} removed" for d in sorted(set(old_devices) - set(new_devices))]
    for name in sorted(set(old_devices) & set(new_devices)):
        out += [f"{name}.device.{k}" for k in _changed_fields(old_devices[name][1], new_devices[name][1])]
    configs_old, configs_new = _configs(old), _configs(new)
    for name in sorted(set(configs_old) & set(configs_new)):
        out += [f"{name}.{k}" for k in _changed_fields(configs_old[name], configs_new[name], skip=("device", "storage"))]
    out += [f"gateway.{k}" for k in _changed_fields(old.gateway, new.gateway)]
    out += [f"site.{k}" for k in ("name", "nominal_voltage_v", "frequency_hz") if getattr(old, k) != getattr(new, k)]
    return out


def _configs(site: Site) -> dict[str, object]:
    configs: dict[str, object] = {s.name: s for s in site.sources}
    configs.update({p.name: p for p in site.pdbs})
    configs.update({u.name: u for u in site.units})
    configs.update({s.name: s for s in site.storages})
    return configs


def _changed_fields(old, new, skip: tuple[str, ...] = ()) -> list[str]:
    changed = []
    for f in dataclasses.fields(old):
        if f.name in skip:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            changed.append(f"{f.name} {_short(a)} -> {_short(b)}")
    return changed


def _short(value) -> str:
    text = str(value.name if hasattr(value, "name") and not dataclasses.is_dataclass(value) else value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["ReloadReport", "reload_gateway", "site_differences"]
