"""SIGHUP: reload what can change in a running gateway, apply site-file changes that can be made
live, and refuse (with the reason) those that cannot.

Reloaded live:
- users (users.yaml: `cmcs users add/remove` on the data dir), through the user manager's reload;
- the trust list (pki/trusted/, pki/crl/: `cmcs certs trust/reject`), through the certificate checker's reload;
- the CMCS model bundle: when <data-dir>/models/current holds another version than the running one
  (a `cmcs train` since start), the built-in CMCS is restarted on it; its mode and threshold live
  in the address space and are kept;
- the site file's aisles and micro-ATS units, added or removed:
  - an added aisle (with its PDB segments, units and their DES) or an added unit (with its DES) in an
    aisle that stays comes into service: its objects are instantiated in the address space with the
    NodeIds, types and values a fresh start would give them (information_model.instantiate.extend_site),
    its points are defined in the point table, the Modbus driver polls it (on the connection that
    already serves its address, else on a new one), and the command service, its interlocks, the
    alarm rules, the historian and the metrics know it;
  - a removed aisle or unit goes: its polling stops, its alarms are sent once more as inactive
    and acknowledged, its nodes are deleted (a subscribed client gets BadNodeIdUnknown on them),
    its points are dropped; a method call on it is refused (BadNodeIdUnknown); its history stays
    in the history database;
  - the built-in CMCS is restarted on the new site: a bundle trained for the old layout no longer
    matches (cmcs.layout), so the CMCS stays Advisory and Cmcs.ModelVersion says why, until a
    bundle for the new layout is installed (`cmcs train --config SITE`, then SIGHUP again).

Refused, as a whole (all or nothing: a refused reload changes nothing), one log line per reason
"site reload refused: <what> changed (...) (needs a restart)": any other difference. That is: the
site's name, voltage or frequency; the sources; the gateway settings (OPC UA, scan groups, stale
and dwell times, derating, metrics, MQTT, TSN, log summary); a PDB segment added to, removed from
or changed in an aisle that stays; any field of a device that stays (rating, position, preferred
source, loads, transfer time, its address, unit id, profile, driver, TLS files; a DES added to or
removed from a unit); a device that moves to another aisle; a device of a driver that cannot
change its devices while running (TSN); a new device whose address is shared with running devices
under other TLS settings; and any added or removed device while the Sparkplug edge node
(gateway.mqtt) runs, since its device list and metric aliases are fixed for the session
(`systemctl restart cmcs-gateway` applies these). A site file that no longer validates is reported
with its errors; the running site stays.
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
    from siteconfig.model import AisleConfig, MicroAtsConfig, Site

log = logging.getLogger(__name__)
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)  # what a reload did is always worth a line in the journal

MAX_LISTED = 12  # added/removed names in the applied line; the rest are counted


@dataclasses.dataclass
class ReloadReport:
    users: int | None = None  # users known after the reload
    trusted: int | None = None  # trusted client certificates after the reload
    cmcs_bundle: str = ""  # "" unchanged, else the version now running
    # what was applied, e.g. "aisle Aisle03 added (2 PDB, 4 units)", "ats MATS-01-04 removed from Aisle01"
    site_applied: list[str] = dataclasses.field(default_factory=list)
    site_refused: list[str] = dataclasses.field(default_factory=list)  # why nothing of the site file was applied
    site_error: str = ""  # the site file does not validate

    @property
    def site_changes(self) -> list[str]:
        """Every difference found in the site file, applied or refused."""
        return self.site_applied + self.site_refused


# ---- the difference between the running site and the new one ----------------------------------------
@dataclasses.dataclass
class SitePlan:
    """What a new site file changes: what can be applied live, and why the rest cannot."""

    new: Site
    added_aisles: list[AisleConfig] = dataclasses.field(default_factory=list)
    added_units: list[MicroAtsConfig] = dataclasses.field(default_factory=list)  # into aisles that stay
    removed_aisles: list[AisleConfig] = dataclasses.field(default_factory=list)
    removed_units: list[MicroAtsConfig] = dataclasses.field(default_factory=list)  # from aisles that stay
    refused: list[str] = dataclasses.field(default_factory=list)  # "<what> changed (old -> new)"

    @property
    def structural(self) -> bool:
        return bool(self.added_aisles or self.added_units or self.removed_aisles or self.removed_units)

    def added_devices(self) -> list[str]:
        return _devices_of(self.added_aisles, self.added_units)

    def removed_devices(self) -> list[str]:
        return _devices_of(self.removed_aisles, self.removed_units)

    def applied(self) -> list[str]:
        """One phrase per aisle or unit added or removed."""
        out = [f"aisle {a.name} added ({len(a.pdbs)} PDB, {len(a.units)} units)" for a in self.added_aisles]
        out += [f"ats {u.name} added to {u.aisle}" for u in self.added_units]
        out += [f"aisle {a.name} removed" for a in self.removed_aisles]
        out += [f"ats {u.name} removed from {u.aisle}" for u in self.removed_units]
        return out


def _devices_of(aisles, units) -> list[str]:
    """Device names of whole aisles (PDB segments, units, DES) and of single units (with their DES)."""
    out = []
    for a in aisles:
        out += [p.name for p in a.pdbs]
    for u in [u for a in aisles for u in a.units] + list(units):
        out.append(u.name)
        if u.storage is not None:
            out.append(u.storage.name)
    return out


def plan_site_change(old: Site, new: Site) -> SitePlan:
    """Compare the running site with a new one: aisles and units added or removed (live), and every
    other difference (refused, one phrase each). Pure: nothing of the gateway is asked."""
    plan = SitePlan(new)
    refuse = plan.refused.extend
    refuse(f"site.{k} changed ({getattr(old, k)} -> {getattr(new, k)})"
           for k in ("name", "nominal_voltage_v", "frequency_hz") if getattr(old, k) != getattr(new, k))
    refuse(f"gateway.{k}" for k in _changed_fields(old.gateway, new.gateway))
    old_sources, new_sources = {s.name: s for s in old.sources}, {s.name: s for s in new.sources}
    refuse(f"source {s} added" for s in new_sources if s not in old_sources)
    refuse(f"source {s} removed" for s in old_sources if s not in new_sources)
    for name in old_sources.keys() & new_sources.keys():
        refuse(f"{name}.{k}" for k in _changed_fields(old_sources[name], new_sources[name]))

    old_aisles, new_aisles = {a.name: a for a in old.aisles}, {a.name: a for a in new.aisles}
    plan.added_aisles = [a for a in new.aisles if a.name not in old_aisles]
    plan.removed_aisles = [a for a in old.aisles if a.name not in new_aisles]
    for name in [a.name for a in new.aisles if a.name in old_aisles]:
        a, b = old_aisles[name], new_aisles[name]
        old_pdbs, new_pdbs = {p.name: p for p in a.pdbs}, {p.name: p for p in b.pdbs}
        refuse(f"pdb {p} added to aisle {name}" for p in new_pdbs if p not in old_pdbs)
        refuse(f"pdb {p} removed from aisle {name}" for p in old_pdbs if p not in new_pdbs)
        for p in old_pdbs.keys() & new_pdbs.keys():
            refuse(f"{p}.{k}" for k in _changed_fields(old_pdbs[p], new_pdbs[p]))
        old_units, new_units = {u.name: u for u in a.units}, {u.name: u for u in b.units}
        plan.added_units += [u for u in b.units if u.name not in old_units]
        plan.removed_units += [u for u in a.units if u.name not in new_units]
        for u in [u.name for u in b.units if u.name in old_units]:
            refuse(f"{u}.{k}" for k in _changed_fields(old_units[u], new_units[u], skip=("storage",)))
            s_old, s_new = old_units[u].storage, new_units[u].storage
            if (s_old is None) != (s_new is None):
                was, now = (s.name if s else "none" for s in (s_old, s_new))
                refuse([f"{u}.storage changed ({was} -> {now})"])
            elif s_old is not None and s_new is not None:
                refuse(f"{s_old.name}.{k}" for k in _changed_fields(s_old, s_new))
    again = set(plan.added_devices()) & set(plan.removed_devices())
    refuse(f"device {d} changed place (removed and added in one reload)" for d in sorted(again))
    return plan


def _changed_fields(old, new, skip: tuple[str, ...] = ()) -> list[str]:
    """'<field> changed (old -> new)' per differing field; a nested dataclass (a device endpoint) by its own fields."""
    changed = []
    for f in dataclasses.fields(old):
        if f.name in skip:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
            changed += [f"{f.name}.{k}" for k in _changed_fields(a, b)]
        else:
            changed.append(f"{f.name} changed ({_short(a)} -> {_short(b)})")
    return changed


def _short(value) -> str:
    text = str(value.name if hasattr(value, "name") and not dataclasses.is_dataclass(value) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def gateway_refusals(gateway: Gateway, plan: SitePlan) -> list[str]:
    """What of a structural plan this running gateway cannot apply live (drivers, Sparkplug)."""
    if not plan.structural:
        return []
    out: list[str] = []
    if gateway.sparkplug is not None:
        out.append("devices added or removed while gateway.mqtt runs: the Sparkplug edge node's device list "
                   "and metric aliases are fixed for its session")
    out += gateway.driver.check_add(plan.new, plan.added_devices())
    out += gateway.driver.check_remove(plan.removed_devices())
    model = gateway.server.model
    if model is not None:  # a new name whose NodeId the address space already uses (e.g. an aisle "Diagnostics")
        from asyncua import ua

        nodes = gateway.server.server.iserver.aspace._nodes
        going = set(plan.removed_devices()) | {a.name for a in plan.removed_aisles}
        for name in [a.name for a in plan.added_aisles] + plan.added_devices():
            if name not in going and ua.NodeId(name, model.ns_index, ua.NodeIdType.String) in nodes:
                out.append(f"{name}: its NodeId is taken in the address space")
    return out


# ---- SIGHUP ----------------------------------------------------------------------------------------
async def reload_gateway(gateway: Gateway) -> ReloadReport:
    """Reload users, trust list and CMCS bundle; apply the site file's live changes or refuse them.
    Logs one line per outcome."""
    report = ReloadReport()
    security = gateway.server.security
    if security is not None:
        security.users.reload()
        report.users = security.users.count
        await security.certificates.reload_if_changed()
        report.trusted = security.certificates.count
        log.info("reload: users file %s (%s users), trust list %s (%s certificates)", security.users.path,
                 report.users, security.pki.trusted, report.trusted)
    report.cmcs_bundle = await _reload_cmcs_bundle(gateway)
    await _reload_site_file(gateway, report)
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
    await gateway.stop_cmcs()
    await gateway.start_cmcs()
    log.info("reload: CMCS restarted on model bundle %s (was %s)", version, live.predictor.version)
    return version


async def _reload_site_file(gateway: Gateway, report: ReloadReport) -> None:
    path = gateway.site.path
    if not path:
        log.info("reload: built-in demo site, no site file to re-read")
        return
    try:
        new = await asyncio.to_thread(load_site, path)
    except (ConfigError, ConfigErrors) as exc:
        report.site_error = str(exc)
        log.error("reload: site file %s has errors, the running site is kept:\n%s", path, exc)
        return
    plan = plan_site_change(gateway.site, new)
    plan.refused += gateway_refusals(gateway, plan)
    if plan.refused:
        report.site_refused = list(plan.refused)
        for reason in plan.refused:
            log.warning("site reload refused: %s (needs a restart)", reason)
        log.warning("reload: site file %s NOT applied (%d reason%s above); the running site is kept: nothing of "
                    "the file is applied until `systemctl restart cmcs-gateway`", path, len(plan.refused),
                    "" if len(plan.refused) == 1 else "s")
        return
    if not plan.structural:
        log.info("reload: site file %s unchanged", path)
        return
    report.site_applied = plan.applied()
    try:
        await apply_site_plan(gateway, plan)
    except Exception as exc:  # noqa: BLE001 - checked beforehand; if it fails anyway, say what is known
        report.site_error = f"applying the site file failed part-way: {exc}"
        log.exception("reload: applying site file %s failed part-way; the site may be partly applied: restart "
                      "(systemctl restart cmcs-gateway) to run it as the file says", path)
        return
    shown = report.site_applied[:MAX_LISTED]
    more = len(report.site_applied) - len(shown)
    log.info("reload: site file %s applied live: %s%s", path, "; ".join(shown), f"; and {more} more" if more else "")


async def apply_site_plan(gateway: Gateway, plan: SitePlan) -> None:
    """Take a structural plan (no refusals) into the running gateway: removals first, then additions."""
    new = plan.new
    removed, added = plan.removed_devices(), plan.added_devices()
    cmcs_running = gateway._cmcs_task is not None and not gateway._cmcs_task.done()
    if cmcs_running:
        await gateway.stop_cmcs()  # its subscription and topology are the old site's
    try:
        await _apply(gateway, plan, removed, added)
    finally:
        if cmcs_running:
            await gateway.start_cmcs()  # on the site now running: its layout check decides Advisory or not
    live = gateway.live
    if cmcs_running and live is not None and live.advisory_only:
        log.warning("reload: CMCS restarted on the new site: its model bundle %s was %s; the CMCS stays Advisory "
                    "until a bundle for this layout is installed (cmcs train --config %s --data-dir %s)",
                    live.predictor.version, live.layout.reason, new.path, gateway.data_dir)


async def _apply(gateway: Gateway, plan: SitePlan, removed: list[str], added: list[str]) -> None:
    new = plan.new
    server = gateway.server
    if removed:
        gateway.commands.set_site(new)  # a command to a removed unit: BadNodeIdUnknown from now on
        await gateway.commands.quiesce(removed)  # the commands in progress on them end first
        await gateway.driver.remove_devices(removed)  # no request reaches them after this
        await server.remove_from_site(new, set(removed), [a.name for a in plan.removed_aisles])
        if gateway.historian is not None:
            gateway.historian.feed.remove_devices(set(removed))
    if added:
        model_added = await server.add_to_site(new, plan.added_aisles, plan.added_units)
        gateway.commands.set_site(new)
        # no await from here to the end of the block: the first poll of a new device finds every sink ready
        gateway.driver.add_devices(new, added)
        if server.alarms is not None:
            server.alarms.add_devices(new, set(added))
        if gateway.historian is not None:
            gateway.historian.feed.add_points(model_added, gateway.table)
    if gateway.metrics is not None:
        gateway.metrics.site_changed(set(removed))
    gateway.site = new
    server.site = new
    await server.sync_connection_objects()


__all__ = ["ReloadReport", "SitePlan", "apply_site_plan", "gateway_refusals", "plan_site_change", "reload_gateway"]
