"""The built-in demo site, larger generated sites of the same pattern, and writing a site as YAML.

Everything here is deterministic (fixed patterns, no randomness), so a generated file is
reproducible and the demo needs no file at all.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import yaml

from siteconfig.loader import NAME_PATTERN, TLS_FIELDS
from siteconfig.model import (
    SOURCE_NAMES,
    AisleConfig,
    DeviceEndpoint,
    GatewayConfig,
    MetricsConfig,
    MicroAtsConfig,
    MqttConfig,
    PdbConfig,
    Site,
    SourceConfig,
    SourceSelection,
    StorageConfig,
    TsnConfig,
)

__all__ = ["MAX_UNITS_PER_AISLE", "demo_site", "generate_site", "site_to_yaml"]

DEMO_NAME = "demo-hall"
DEMO_AISLES = 4
DEMO_UNITS_PER_AISLE = 6
NOMINAL_VOLTAGE_V = 415.0  # line-to-line, IEC 60038 400/415 V low-voltage distribution
FREQUENCY_HZ = 60.0
DEMO_SOURCE_RATING_KW = 300.0
DEMO_PDB_RATING_A = 125.0
SOURCE_BACKUP = {"SourceA": "ups", "SourceB": "generator"}

UNIT_RATED_CURRENT_A = 40.0
FIRST_UNIT_POSITION_FT = 6.0
UNIT_SPACING_FT = 12.0  # one micro-ATS per rack-row segment
JOINTS_PER_PHASE = 4
# Mean IT load per unit, cycled along the hall: between 6 and 11 kW, mean 8.5 kW.
IT_LOAD_PATTERN_KW = (8.5, 6.0, 9.5, 11.0, 7.0, 10.0, 6.5, 9.5)
DUAL_CORDED_PATTERN = (0.0, 0.5, 0.25)
TRANSFER_TIME_PATTERN_MS = (3.0, 3.6, 4.2, 3.3, 3.9)
DES_CAPACITY_PATTERN_KWH = (5.0, 7.5, 10.0)
DES_C_RATE = 2.0  # max power = 2 C, as for high-power LFP rack batteries
DES_MAX_POWER_KW = 15.0  # inverter limit

HOST = "127.0.0.1"
BASE_PORT = 15020  # sources on BASE_PORT, aisle k on BASE_PORT + k
SOURCE_UNIT_IDS = {"SourceA": 1, "SourceB": 2}
PDB_UNIT_IDS = {"SourceA": 1, "SourceB": 2}
ATS_UNIT_ID_BASE = 10  # micro-ATS j (1-based) answers on unit id 10 + j
DES_UNIT_ID_BASE = 100  # its DES on 100 + j
# Keeps micro-ATS ids (11..100) below DES ids (101..190), all within Modbus unit ids 1..247.
MAX_UNITS_PER_AISLE = 90
MAX_AISLES = 65535 - BASE_PORT

PROFILES = {"source": "power_source_v1", "pdb": "pdb_segment_v1", "ats": "micro_ats_v1", "des": "des_v1"}

# NEC 240.6(A) standard ampere ratings of fuses and inverse-time breakers.
STANDARD_RATINGS_A = (15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90, 100, 110, 125, 150, 175, 200, 225, 250,
                      300, 350, 400, 450, 500, 600, 700, 800, 1000, 1200, 1600, 2000, 2500, 3000, 4000, 5000, 6000)


def demo_site() -> Site:
    """The built-in demo: 4 aisles x 6 micro-ATS, each with a DES, on two 300 kW sources."""
    return generate_site(DEMO_AISLES, DEMO_UNITS_PER_AISLE, name=DEMO_NAME)


def generate_site(aisles: int, units_per_aisle: int, name: str | None = None) -> Site:
    """A site of the demo's pattern with `aisles` x `units_per_aisle` micro-ATS; ValueError if out of range."""
    if not 1 <= aisles <= MAX_AISLES:
        raise ValueError(f"aisles must be 1..{MAX_AISLES}, got {aisles}")
    if not 1 <= units_per_aisle <= MAX_UNITS_PER_AISLE:
        raise ValueError(f"units per aisle must be 1..{MAX_UNITS_PER_AISLE} (Modbus unit ids), got {units_per_aisle}")
    name = name if name is not None else f"site-{aisles}x{units_per_aisle}"
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"site name must match {NAME_PATTERN}, got {name!r}")

    aisle_configs = tuple(_aisle(k, units_per_aisle) for k in range(1, aisles + 1))
    total_it_load_kw = sum(u.it_load_kw for a in aisle_configs for u in a.units)
    sources = tuple(
        SourceConfig(
            name=source_name,
            selection=SourceSelection(i + 1),
            rated_power_kw=_source_rating_kw(total_it_load_kw),
            backup=SOURCE_BACKUP[source_name],
            nominal_voltage_v=NOMINAL_VOLTAGE_V,
            frequency_hz=FREQUENCY_HZ,
            device=_endpoint("source", BASE_PORT, SOURCE_UNIT_IDS[source_name]),
        )
        for i, source_name in enumerate(SOURCE_NAMES)
    )
    return Site(name=name, nominal_voltage_v=NOMINAL_VOLTAGE_V, frequency_hz=FREQUENCY_HZ,
                sources=sources, aisles=aisle_configs)


def _endpoint(kind: str, port: int, unit_id: int) -> DeviceEndpoint:
    return DeviceEndpoint(driver="modbus", profile=PROFILES[kind], host=HOST, port=port, unit_id=unit_id)


def _it_load_kw(unit_index: int) -> float:
    return IT_LOAD_PATTERN_KW[unit_index % len(IT_LOAD_PATTERN_KW)]


# The demo's loading ratio (24 units, 204 kW mean on 300 kW, 68 %) holds for every generated site,
# so either source alone carries the hall with the same headroom.
_DEMO_SOURCE_LOADING = sum(map(_it_load_kw, range(DEMO_AISLES * DEMO_UNITS_PER_AISLE))) / DEMO_SOURCE_RATING_KW


def _source_rating_kw(total_it_load_kw: float) -> float:
    # Rounded up to 10 kW; round() first so 300.00000000000006 does not become 310.
    return math.ceil(round(total_it_load_kw / _DEMO_SOURCE_LOADING / 10, 6)) * 10.0


def _pdb_rating_a(units_per_aisle: int) -> float:
    needed_a = round(DEMO_PDB_RATING_A * units_per_aisle / DEMO_UNITS_PER_AISLE, 6)
    return float(next((r for r in STANDARD_RATINGS_A if r >= needed_a), math.ceil(needed_a)))


def _aisle(k: int, units_per_aisle: int) -> AisleConfig:
    aisle_name = f"Aisle{k:02d}"
    port = BASE_PORT + k
    pdbs = tuple(
        PdbConfig(
            name=f"PDB-{k:02d}-{feed_name[-1]}",
            aisle=aisle_name,
            feed=SourceSelection(i + 1),
            rated_current_a=_pdb_rating_a(units_per_aisle),
            joints_per_phase=JOINTS_PER_PHASE,
            device=_endpoint("pdb", port, PDB_UNIT_IDS[feed_name]),
        )
        for i, feed_name in enumerate(SOURCE_NAMES)
    )
    units = []
    for j in range(1, units_per_aisle + 1):
        unit_index = (k - 1) * units_per_aisle + (j - 1)  # along the whole hall, so aisles differ
        capacity_kwh = DES_CAPACITY_PATTERN_KWH[(j - 1) % len(DES_CAPACITY_PATTERN_KWH)]
        units.append(MicroAtsConfig(
            name=f"MATS-{k:02d}-{j:02d}",
            aisle=aisle_name,
            position_ft=FIRST_UNIT_POSITION_FT + (j - 1) * UNIT_SPACING_FT,
            rated_current_a=UNIT_RATED_CURRENT_A,
            # Alternating preference splits the aisle's load evenly over both feeds.
            preferred_source=SourceSelection.SOURCE_A if j % 2 == 1 else SourceSelection.SOURCE_B,
            it_load_kw=_it_load_kw(unit_index),
            dual_corded_fraction=DUAL_CORDED_PATTERN[(j - 1) % len(DUAL_CORDED_PATTERN)],
            transfer_time_ms=TRANSFER_TIME_PATTERN_MS[unit_index % len(TRANSFER_TIME_PATTERN_MS)],
            device=_endpoint("ats", port, ATS_UNIT_ID_BASE + j),
            storage=StorageConfig(
                name=f"DES-{k:02d}-{j:02d}",
                capacity_kwh=capacity_kwh,
                max_power_kw=min(DES_C_RATE * capacity_kwh, DES_MAX_POWER_KW),
                soc_min_pct=10.0,
                soc_max_pct=90.0,
                device=_endpoint("des", port, DES_UNIT_ID_BASE + j),
            ),
        ))
    return AisleConfig(name=aisle_name, pdbs=pdbs, units=tuple(units))


def _metrics_dict(metrics: MetricsConfig) -> dict[str, Any]:
    """`gateway.metrics` as the site file writes it."""
    out: dict[str, Any] = {"host": metrics.host, "port": metrics.port}
    if metrics.tls_cert:
        out["tls"] = {"cert": metrics.tls_cert, "key": metrics.tls_key}
    if metrics.basic_auth_user:
        out["basic_auth"] = {"user": metrics.basic_auth_user, "password_hash": metrics.basic_auth_password_hash}
    return out


def _mqtt_dict(mqtt: MqttConfig) -> dict[str, Any]:
    """`gateway.mqtt` as the site file writes it (keys left unset stay out: the loader's defaults)."""
    out: dict[str, Any] = {"host": mqtt.host, "port": mqtt.port}
    tls = {"ca": mqtt.tls_ca, "cert": mqtt.tls_cert, "key": mqtt.tls_key}
    if any(tls.values()):
        out["tls"] = {key: path for key, path in tls.items() if path is not None}
    out.update({"insecure": mqtt.insecure, "group_id": mqtt.group_id})
    for key in ("edge_node_id", "primary_host_id"):
        if getattr(mqtt, key) is not None:
            out[key] = getattr(mqtt, key)
    out.update({"store_forward_mb": _num(mqtt.store_forward_mb), "commands": mqtt.commands,
                "command_user": mqtt.command_user, "command_role": mqtt.command_role})
    return out


def _tsn_dict(tsn: TsnConfig) -> dict[str, Any]:
    """`gateway.tsn` as the site file writes it."""
    return {
        "interface": tsn.interface, "cycle_us": _num(tsn.cycle_us),
        "windows": [{"class": w.traffic_class, "pcp": w.pcp, "offset_us": _num(w.offset_us),
                     "length_us": _num(w.length_us)} for w in tsn.windows],
        "base_time_ns": tsn.base_time_ns, "link_rate_mbps": _num(tsn.link_rate_mbps),
        "best_effort_pcp": tsn.best_effort_pcp, "security": tsn.security,
        "max_frame_age_ms": _num(tsn.max_frame_age_ms), "realtime_priority": tsn.realtime_priority,
    }


def site_to_yaml(site: Site) -> str:
    """The site as a site file that parse_site reads back to an equal Site."""
    endpoints = [endpoint for _, _, endpoint in site.devices()]
    shared = {key: values.pop() for key in ("host", "driver")
              if len(values := {getattr(e, key) for e in endpoints}) == 1}
    gateway = site.gateway
    document: dict[str, Any] = {
        "site": {"name": site.name, "nominal_voltage_v": _num(site.nominal_voltage_v),
                 "frequency_hz": _num(site.frequency_hz)},
        "gateway": {
            "opcua": {
                "host": gateway.opcua.host,
                "port": gateway.opcua.port,
                "path": gateway.opcua.path,
                "allow_security_none": gateway.opcua.allow_security_none,
                "allow_anonymous": gateway.opcua.allow_anonymous,
            },
            "scan_groups_s": {group: _num(period) for group, period in gateway.scan_groups_s.items()},
            "stale_time_s": _num(gateway.stale_time_s),
            "dwell_time_s": _num(gateway.dwell_time_s),
            "derating": _num(gateway.derating),
        },
    }
    if gateway.metrics is not None:
        document["gateway"]["metrics"] = _metrics_dict(gateway.metrics)
    if gateway.log_summary_s != GatewayConfig.log_summary_s:
        document["gateway"]["log_summary_s"] = _num(gateway.log_summary_s)
    if gateway.mqtt is not None:
        document["gateway"]["mqtt"] = _mqtt_dict(gateway.mqtt)
    if gateway.tsn is not None:
        document["gateway"]["tsn"] = _tsn_dict(gateway.tsn)
    if shared:
        document["defaults"] = {"device": shared}
    document["sources"] = [
        {"name": s.name, "rated_power_kw": _num(s.rated_power_kw), "backup": s.backup,
         "device": _device_dict(s.device, shared)}
        for s in site.sources
    ]
    document["aisles"] = [
        {
            "name": aisle.name,
            "pdbs": [
                {"name": p.name, "feed": SOURCE_NAMES[p.feed - 1], "rated_current_a": _num(p.rated_current_a),
                 "joints_per_phase": p.joints_per_phase, "device": _device_dict(p.device, shared)}
                for p in aisle.pdbs
            ],
            "units": [_unit_dict(u, shared) for u in aisle.units],
        }
        for aisle in site.aisles
    ]
    header = (f"# cmcs site file: {len(site.aisles)} aisles, {len(site.units)} micro-ATS units.\n"
              "# Check it with `cmcs config check FILE`; the format is in docs/interface.md section 5.\n")
    # default_flow_style=None writes the innermost mappings (devices, opcua) on one line each.
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120)


def _unit_dict(unit: MicroAtsConfig, shared: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": unit.name,
        "position_ft": _num(unit.position_ft),
        "rated_current_a": _num(unit.rated_current_a),
        "preferred_source": SOURCE_NAMES[unit.preferred_source - 1],
        "it_load_kw": _num(unit.it_load_kw),
        "dual_corded_fraction": _num(unit.dual_corded_fraction),
        "transfer_time_ms": _num(unit.transfer_time_ms),
        "device": _device_dict(unit.device, shared),
    }
    if unit.storage is not None:
        s = unit.storage
        entry["storage"] = {
            "name": s.name, "capacity_kwh": _num(s.capacity_kwh), "max_power_kw": _num(s.max_power_kw),
            "soc_min_pct": _num(s.soc_min_pct), "soc_max_pct": _num(s.soc_max_pct),
            "device": _device_dict(s.device, shared),
        }
    return entry


def _device_dict(device: DeviceEndpoint, shared: dict[str, Any]) -> dict[str, Any]:
    tls = {key: getattr(device, field) for key, field in TLS_FIELDS.items() if getattr(device, field) is not None}
    entry = {
        "driver": device.driver, "host": device.host, "port": device.port, "unit_id": device.unit_id,
        "profile": device.profile, "scan_group": device.scan_group, "tls": tls or None,
        "mac": device.mac, "vlan": device.vlan, "publisher_id": device.publisher_id, "key_file": device.key_file,
    }
    if device.driver == "tsn":  # reached by its MAC address: the loader fills in port 0, a written one is refused
        del entry["port"]
    # Leave out what `defaults.device` already says and what the loader fills in anyway.
    return {key: value for key, value in entry.items()
            if key not in shared and value is not None and not (key == "scan_group" and value == "normal")}


def _num(value: float) -> int | float:
    """Whole numbers without a trailing .0, so the file reads like one written by hand."""
    return int(value) if float(value).is_integer() else value


def bind_free_port(host: str = "127.0.0.1"):
    """A TCP socket bound to a free port on `host`, below the kernel's ephemeral range; the caller closes it
    just before the port's real user binds it. A port the kernel picks for bind(0) comes from the ephemeral
    range, so any outgoing connection (a Modbus client, an OPC UA client) can be given it as its local port
    in between, and the server then fails with "address already in use"; a port below that range is never
    handed out that way. Falls back to a kernel-picked port where that range cannot be read or is empty."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, ephemeral_low - 1
    pick = random.SystemRandom()
    for _ in range(200 if high > low else 0):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind((host, pick.randint(low, high)))
            return probe
        except OSError:
            probe.close()
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind((host, 0))
    return probe


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, below the ephemeral range (bind_free_port)."""
    with bind_free_port(host) as probe:
        return probe.getsockname()[1]


def relocate_site(site: Site, host: str = "127.0.0.1") -> Site:
    """The same site with every distinct device address moved to a free port on `host`.

    For tests and benchmarks that must not collide with a running demo (fixed ports)."""
    import dataclasses

    new_port: dict[tuple[str, int], int] = {}
    held = []  # keep each probe bound until all are chosen: no port twice

    def moved(endpoint):
        key = (endpoint.host, endpoint.port)
        if key not in new_port:
            probe = bind_free_port(host)
            held.append(probe)
            new_port[key] = probe.getsockname()[1]
        return dataclasses.replace(endpoint, host=host, port=new_port[key])

    try:
        sources = tuple(dataclasses.replace(s, device=moved(s.device)) for s in site.sources)
        aisles = tuple(dataclasses.replace(
            a, pdbs=tuple(dataclasses.replace(p, device=moved(p.device)) for p in a.pdbs),
            units=tuple(dataclasses.replace(u, device=moved(u.device), storage=dataclasses.replace(
                u.storage, device=moved(u.storage.device)) if u.storage else None) for u in a.units))
            for a in site.aisles)
    finally:
        for probe in held:
            probe.close()
    return dataclasses.replace(site, sources=sources, aisles=aisles)
