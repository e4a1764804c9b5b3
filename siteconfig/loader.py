"""Read and validate a site file (docs/interface.md section 5) into the typed `Site`.

Validation is strict because a wrong rating or a swapped feed in this file becomes a wrong
interlock in the command service: every problem is reported, each as one line naming the
file, the line and the key, and nothing is returned unless the whole file is sound.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from pathlib import Path
from typing import Any

from drivers.base import registered_drivers
from siteconfig.model import (
    SOURCE_NAMES,
    AisleConfig,
    DeviceEndpoint,
    GatewayConfig,
    MetricsConfig,
    MqttConfig,
    MicroAtsConfig,
    OpcUaConfig,
    PdbConfig,
    Site,
    SourceConfig,
    SourceSelection,
    StorageConfig,
    TsnConfig,
    TsnWindowConfig,
)
from siteconfig.yamlpos import (
    REQUIRED,
    ConfigError,
    ConfigErrors,
    ErrorCollector,
    MapReader,
    Value,
    did_you_mean,
    read_document,
    read_file_text,
)
from tsnwire.keys import KeyFileError, load_key_file

__all__ = ["DEFAULT_PROFILES_DIR", "INTERFACE_DRIVERS", "NAME_PATTERN", "TLS_FIELDS", "accepted_drivers", "load_site",
           "parse_site"]

DEFAULT_PROFILES_DIR = Path(__file__).resolve().parent.parent / "drivers" / "profiles"

# The name also becomes part of the OPC UA namespace URI and of BrowseNames: keep it URI-safe.
NAME_PATTERN = r"[A-Za-z0-9_.-]+"
# The `driver:` values docs/interface.md section 5 defines. A file may use one only when this build
# has a driver registered for it (drivers.base.registered_drivers()); a defined value with no driver
# yet is refused with "driver X is not built in this version", never skipped.
INTERFACE_DRIVERS = ("modbus", "modbus-tls", "tsn")
BACKUPS = ("ups", "generator", "none")
FEEDS = {name: SourceSelection(i + 1) for i, name in enumerate(SOURCE_NAMES)}
NOMINAL_FREQUENCIES_HZ = (50, 60)
MODBUS_UNIT_IDS = (0, 247)  # MODBUS over Serial Line V1.02, 2.2: 0 broadcast, 248..255 reserved

_TOP_KEYS = ("site", "gateway", "defaults", "sources", "aisles")
_SITE_KEYS = ("name", "nominal_voltage_v", "frequency_hz")
_GATEWAY_KEYS = ("opcua", "scan_groups_s", "stale_time_s", "dwell_time_s", "derating", "metrics", "log_summary_s",
                 "driver_process", "mqtt", "tsn")
_METRICS_KEYS = ("host", "port", "tls", "basic_auth")
_MQTT_KEYS = ("host", "port", "tls", "insecure", "group_id", "edge_node_id", "primary_host_id",
              "store_forward_mb", "commands", "command_user", "command_role")
_OPCUA_KEYS = ("host", "port", "path", "allow_security_none", "allow_anonymous")
_DEVICE_KEYS = ("driver", "profile", "host", "port", "unit_id", "scan_group", "tls", "mac", "vlan", "publisher_id",
                "key_file")
# gateway.tsn (docs/interface.md section 5, docs/tsn.md)
_TSN_KEYS = ("interface", "cycle_us", "base_time_ns", "windows", "link_rate_mbps", "best_effort_pcp", "security",
             "max_frame_age_ms", "realtime_priority")
_TSN_WINDOW_KEYS = ("class", "pcp", "offset_us", "length_us")
TSN_CLASSES = ("command", "telemetry")
TSN_SECURITY = ("sign_and_encrypt", "sign")
TSN_DEVICE_FIELDS = ("mac", "vlan", "publisher_id", "key_file")
MAC_PATTERN = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"
VLAN_IDS = (1, 4094)  # IEEE 802.1Q: 0 means priority-tagged only, 4095 is reserved
# device.tls key -> DeviceEndpoint field. cert, key, ca: the gateway's client certificate and key and
# the CA that signs device certificates (needed by driver modbus-tls); server_cert, server_key,
# client_ca: the device's own, read only by the simulator.
TLS_FIELDS = {"cert": "tls_cert", "key": "tls_key", "ca": "tls_ca", "server_cert": "tls_server_cert",
               "server_key": "tls_server_key", "client_ca": "tls_client_ca"}
_TLS_GATEWAY_KEYS = ("cert", "key", "ca")
_SOURCE_KEYS = ("name", "rated_power_kw", "backup", "device")
_AISLE_KEYS = ("name", "pdbs", "units")
_PDB_KEYS = ("name", "feed", "rated_current_a", "joints_per_phase", "device")
_UNIT_KEYS = ("name", "position_ft", "rated_current_a", "preferred_source", "it_load_kw",
              "dual_corded_fraction", "transfer_time_ms", "device", "storage")
_STORAGE_KEYS = ("name", "capacity_kwh", "max_power_kw", "soc_min_pct", "soc_max_pct", "device")


def load_site(path: str | Path, *, profiles_dir: Path | None = DEFAULT_PROFILES_DIR) -> Site:
    """Read and validate a site file; raises ConfigErrors listing every problem.

    TLS file paths are relative to the site file's folder; they come back absolute.
    """
    try:
        text = read_file_text(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None
    site = parse_site(text, str(path), profiles_dir=profiles_dir, base_dir=Path(path).parent.absolute())
    return dataclasses.replace(site, path=str(path))


def parse_site(text: str, filename: str = "<site>", *, profiles_dir: Path | None = DEFAULT_PROFILES_DIR,
               base_dir: Path | None = None) -> Site:
    """Validate site-file text (errors name `filename`); raises ConfigErrors listing every problem.

    Profiles are checked against `profiles_dir/<profile>.yaml` when that folder holds any
    profile; pass None to skip the check. TLS files are resolved against `base_dir` and checked
    (present, PEM, key matching its certificate); with no base_dir they are kept as written.
    """
    errors = ErrorCollector(filename)
    top = read_document(text, errors, "a mapping with keys site, sources, aisles")
    site = _SiteReader(_known_profiles(profiles_dir), base_dir).read(top) if top is not None else None
    errors.raise_if_any()
    assert site is not None  # no errors means the whole file was read
    return site


def accepted_drivers() -> tuple[str, ...]:
    """The `driver:` values a site file may use in this build: exactly the registered drivers."""
    return registered_drivers()


def _driver(r: MapReader, default: Any) -> str | None:
    """The device's `driver:`, refused (None, one error) unless a driver is registered for it."""
    accepted = accepted_drivers()
    value = r.choice("driver", tuple(dict.fromkeys(accepted + INTERFACE_DRIVERS)), default)
    if value is None or value in accepted:
        return value
    r.error(f"driver {value} is not built in this version (this build has: {', '.join(accepted)})", "driver")
    return None


def _known_profiles(profiles_dir: Path | None) -> set[str] | None:
    if profiles_dir is None or not profiles_dir.is_dir():
        return None
    names = {p.stem for p in profiles_dir.glob("*.yaml")}
    return names or None  # an empty folder: the profiles are not written yet, nothing to check


class _SiteReader:
    """One pass over a site file, holding what cross-checks need (names, addresses, scan groups)."""

    def __init__(self, profiles: set[str] | None, base_dir: Path | None = None):
        self.profiles = profiles
        self.base_dir = base_dir
        self.pem_checked: set[tuple[str, ...]] = set()  # TLS file sets already checked (and reported)
        self.endpoint_security: dict[tuple[str, int], tuple[tuple, str, int]] = {}  # -> (settings, device, line)
        self.scan_groups: set[str] = set()
        self.device_defaults: dict[str, Any] = {}
        self.names: dict[str, tuple[int, str]] = {}  # name -> (line, key path) of its first use
        self.addresses: dict[tuple[str, int, int], tuple[str, int]] = {}  # -> (device name, line)
        self.tsn: TsnConfig | None = None
        self.tsn_ids: dict[str, dict[Any, int]] = {}  # mac / publisher_id -> line of its first use
        self.key_files_checked: set[str] = set()

    def read(self, top: MapReader) -> Site:
        top.reject_unknown(_TOP_KEYS)
        site = top.mapping("site", required=True)
        if site is not None:
            site.reject_unknown(_SITE_KEYS)
            name = self._name(site)
            voltage_v = site.number("nominal_voltage_v", gt=0)
            frequency_hz = site.choice("frequency_hz", NOMINAL_FREQUENCIES_HZ)
        else:
            name = voltage_v = frequency_hz = None
        gateway = self._gateway(top.mapping("gateway"))
        self._defaults(top.mapping("defaults"))
        sources = self._sources(top, voltage_v, frequency_hz)
        aisles = _mapping_items(top, "aisles", "aisle")
        return Site(
            name=name,
            nominal_voltage_v=voltage_v,
            frequency_hz=float(frequency_hz) if frequency_hz is not None else None,
            sources=sources,
            aisles=tuple(self._aisle(a) for a in aisles if a is not None),
            gateway=gateway,
        )

    def _name(self, r: MapReader) -> str | None:
        """The `name` key, checked for format and uniqueness across the whole site."""
        name = r.string("name", pattern=NAME_PATTERN)
        if name is not None:
            line, path = r.line_of("name"), r.key_path("name")
            if name in self.names:
                first_line, first_path = self.names[name]
                r.error(f"duplicate name '{name}' (first used at line {first_line}, {first_path})", "name")
            else:
                self.names[name] = (line, path)
        return name

    def _gateway(self, r: MapReader | None) -> GatewayConfig:
        defaults = GatewayConfig()
        if r is None:
            self.scan_groups = set(defaults.scan_groups_s)
            return defaults
        r.reject_unknown(_GATEWAY_KEYS)
        opcua = self._opcua(r.mapping("opcua"))
        scan_groups_s = dict(defaults.scan_groups_s)
        groups = r.mapping("scan_groups_s")
        if groups is not None:  # given: it replaces the default groups, so a removed group is caught
            scan_groups_s = {}
            for group in groups.keys():
                period_s = groups.number(group, gt=0)
                if period_s is not None:
                    scan_groups_s[group] = period_s
            if not groups.keys():
                r.error("at least one scan group is needed", "scan_groups_s")
        self.scan_groups = set(scan_groups_s)
        self.tsn = self._tsn(r.mapping("tsn"))
        return GatewayConfig(
            opcua=opcua,
            scan_groups_s=scan_groups_s,
            stale_time_s=r.number("stale_time_s", defaults.stale_time_s, gt=0),
            dwell_time_s=r.number("dwell_time_s", defaults.dwell_time_s, ge=0),
            derating=r.number("derating", defaults.derating, gt=0, le=1),
            metrics=self._metrics(r.mapping("metrics")),
            log_summary_s=r.number("log_summary_s", defaults.log_summary_s, ge=0),
            driver_process=r.boolean("driver_process", defaults.driver_process),
            mqtt=self._mqtt(r.mapping("mqtt")),
            tsn=self.tsn,
        )

    @staticmethod
    def _tsn(r: MapReader | None) -> TsnConfig | None:
        """gateway.tsn: the gate control list (windows inside the cycle, not overlapping) and frame security."""
        if r is None:
            return None
        r.reject_unknown(_TSN_KEYS)
        d = TsnConfig(interface="")
        cycle_us = r.number("cycle_us", d.cycle_us, gt=0)
        windows = d.windows
        items = r.sequence("windows")
        if items is not None:
            windows = []
            for item in items:
                w = item.as_mapping()
                if w is None:
                    continue
                w.reject_unknown(_TSN_WINDOW_KEYS)
                window = TsnWindowConfig(w.choice("class", TSN_CLASSES), w.integer("pcp", ge=0, le=7),
                                         w.number("offset_us", ge=0), w.number("length_us", gt=0))
                if None not in (cycle_us, window.offset_us, window.length_us) and \
                        window.offset_us + window.length_us > cycle_us:
                    w.error(f"window ends at {window.offset_us + window.length_us:g} us, past the {cycle_us:g} us cycle")
                windows.append(window)
            windows = tuple(windows)
            spans = sorted((w.offset_us, w.offset_us + w.length_us, w.traffic_class) for w in windows
                           if None not in (w.offset_us, w.length_us))
            for (_s0, e0, c0), (s1, _e1, c1) in zip(spans, spans[1:]):
                if s1 < e0:
                    r.error(f"windows {c0} and {c1} overlap", "windows")
            classes = [w.traffic_class for w in windows if w.traffic_class]
            if len(set(classes)) != len(classes):
                r.error("one window per class", "windows")
        return TsnConfig(
            interface=r.string("interface", pattern=r"[A-Za-z0-9_.@-]{1,15}"),
            cycle_us=cycle_us,
            windows=windows,
            base_time_ns=r.integer("base_time_ns", d.base_time_ns, ge=0),
            link_rate_mbps=r.number("link_rate_mbps", d.link_rate_mbps, gt=0),
            best_effort_pcp=r.integer("best_effort_pcp", d.best_effort_pcp, ge=0, le=7),
            security=r.choice("security", TSN_SECURITY, d.security),
            max_frame_age_ms=r.number("max_frame_age_ms", d.max_frame_age_ms, gt=0),
            realtime_priority=r.integer("realtime_priority", d.realtime_priority, ge=0, le=99),
        )

    def _metrics(self, r: MapReader | None) -> MetricsConfig | None:
        """`gateway.metrics` (docs/interface.md section 5): {host, port, tls: {cert, key}, basic_auth: {user, password_hash}}."""
        if r is None:
            return None
        r.reject_unknown(_METRICS_KEYS)
        defaults = MetricsConfig()
        cert = key = user = password_hash = None
        tls = r.mapping("tls")
        if tls is not None:
            tls.reject_unknown(("cert", "key"))
            cert, key = self._tls_file(tls, "cert"), self._tls_file(tls, "key")
            if ("cert" in tls) != ("key" in tls):
                tls.error("TLS for the metrics endpoint needs both cert and key")
            elif cert and key and self.base_dir is not None:
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
                except (ssl.SSLError, OSError) as exc:
                    tls.error(f"cert and key are not a matching PEM certificate and private key ({_ssl_reason(exc)})")
        auth = r.mapping("basic_auth")
        if auth is not None:
            auth.reject_unknown(("user", "password_hash"))
            user = auth.string("user")
            password_hash = auth.string("password_hash", pattern=r"scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+")
        return MetricsConfig(host=r.string("host", defaults.host), port=r.integer("port", defaults.port, ge=1, le=65535),
                             tls_cert=cert, tls_key=key, basic_auth_user=user, basic_auth_password_hash=password_hash)

    @staticmethod
    def _opcua(r: MapReader | None) -> OpcUaConfig:
        defaults = OpcUaConfig()
        if r is None:
            return defaults
        r.reject_unknown(_OPCUA_KEYS)
        return OpcUaConfig(
            host=r.string("host", defaults.host),
            port=r.integer("port", defaults.port, ge=1, le=65535),
            path=r.string("path", defaults.path, pattern=r"/[A-Za-z0-9_./-]*"),
            allow_security_none=r.boolean("allow_security_none", defaults.allow_security_none),
            allow_anonymous=r.boolean("allow_anonymous", defaults.allow_anonymous),
        )

    def _mqtt(self, r: MapReader | None) -> MqttConfig | None:
        """`gateway.mqtt` (docs/interface.md section 5): TLS files relative to the site file, checked."""
        if r is None:
            return None
        r.reject_unknown(_MQTT_KEYS)
        defaults = MqttConfig()
        insecure = r.boolean("insecure", defaults.insecure)
        tls = r.mapping("tls")
        files: dict[str, str | None] = {"ca": None, "cert": None, "key": None}
        if tls is not None:
            tls.reject_unknown(_TLS_GATEWAY_KEYS)
            files = {key: self._tls_file(tls, key) for key in _TLS_GATEWAY_KEYS}
            if all(files.values()):  # a missing one was reported by _tls_file
                self._check_pem(tls, {"tls_cert": files["cert"], "tls_key": files["key"], "tls_ca": files["ca"]})
        elif not insecure:
            r.error("needs tls: {ca, cert, key} (or insecure: true for plain TCP)", None)
        spb_id = r"[^/+#]+"  # Sparkplug 3.0 4.1.1: no '/', '+' or '#' in a topic element
        return MqttConfig(
            host=r.string("host", defaults.host),
            port=r.integer("port", 1883 if insecure and tls is None else defaults.port, ge=1, le=65535),
            tls_ca=files["ca"], tls_cert=files["cert"], tls_key=files["key"],
            insecure=bool(insecure),
            group_id=r.string("group_id", defaults.group_id, pattern=spb_id),
            edge_node_id=r.string("edge_node_id", None, pattern=spb_id),
            primary_host_id=r.string("primary_host_id", None, pattern=spb_id),
            store_forward_mb=r.number("store_forward_mb", defaults.store_forward_mb, gt=0),
            commands=r.boolean("commands", defaults.commands),
            command_user=r.string("command_user", defaults.command_user, pattern=NAME_PATTERN),
            command_role=r.choice("command_role", {k: k for k in ("Viewer", "Operator", "Engineer", "Admin")},
                                  defaults.command_role),
        )

    def _defaults(self, r: MapReader | None) -> None:
        if r is None:
            return
        r.reject_unknown(("device",))
        device = r.mapping("device")
        if device is not None:
            # Validated once here, so a bad default is one error rather than one per device; a bad
            # one stays in as None, which devices inherit silently instead of "missing" errors.
            self.device_defaults = self._device_fields(device, inherited={}, only_present=True)

    def _device_fields(self, r: MapReader, inherited: dict[str, Any], only_present: bool = False) -> dict[str, Any]:
        r.reject_unknown(_DEVICE_KEYS)
        readers = {
            "driver": lambda d: _driver(r, d),
            "profile": lambda d: self._profile(r, d),
            "host": lambda d: r.string("host", d),
            "port": lambda d: r.integer("port", d, ge=1, le=65535),
            "unit_id": lambda d: r.integer("unit_id", d, ge=MODBUS_UNIT_IDS[0], le=MODBUS_UNIT_IDS[1]),
            "scan_group": lambda d: self._scan_group(r, d),
        }
        builtin = {"driver": REQUIRED, "profile": REQUIRED, "host": "127.0.0.1",
                   "port": 0 if _driver_named(r, inherited) == "tsn" else REQUIRED,  # tsn: mac, not host:port
                   "unit_id": 1, "scan_group": "normal"}
        fields = {key: read(inherited.get(key, builtin[key]))
                  for key, read in readers.items() if not only_present or key in r}
        tls, broken = self._tls_fields(r, inherited, only_present, fields)
        if not only_present:
            self._check_tls_for_driver(r, tls, broken, fields)
        self._tsn_device_fields(r, inherited, only_present, fields)
        return fields

    def _tsn_device_fields(self, r: MapReader, inherited: dict[str, Any], only_present: bool,
                           fields: dict[str, Any]) -> None:
        """mac, vlan, publisher_id, key_file: required with driver tsn, refused with any other."""
        readers = {
            "mac": lambda d: r.string("mac", d, pattern=MAC_PATTERN),
            "vlan": lambda d: r.integer("vlan", d, ge=VLAN_IDS[0], le=VLAN_IDS[1]),
            "publisher_id": lambda d: r.integer("publisher_id", d, ge=2, le=65535),  # 1 is the gateway's
            "key_file": lambda d: self._key_file(r, d),
        }
        if only_present:
            fields.update({k: read(None) for k, read in readers.items() if k in r})
            return
        driver = fields["driver"]
        if driver == "tsn":
            if self.tsn is None:
                r.error("driver tsn needs a gateway.tsn block (interface, cycle, windows)", "driver")
            inherited_vlan = inherited.get("vlan")
            fields.update({k: read(inherited_vlan if k == "vlan" and inherited_vlan is not None else
                                   (inherited.get(k) if k == "key_file" and inherited.get(k) else REQUIRED))
                           for k, read in readers.items()})
            self._check_unique_tsn(r, fields)
        else:
            for key in TSN_DEVICE_FIELDS:
                if key in r and driver is not None:
                    r.error(f"only used with driver tsn (this device's driver is '{driver}')", key)
                fields[key] = None

    def _key_file(self, r: MapReader, default: Any) -> str | None:
        """The key file path, absolute and checked to be a usable group key when the site's folder is known."""
        path = r.string("key_file", default)
        if path is None or self.base_dir is None:
            return path
        resolved = os.path.normpath(self.base_dir / Path(path).expanduser())
        if resolved not in self.key_files_checked:
            self.key_files_checked.add(resolved)
            try:
                load_key_file(resolved)
            except KeyFileError as exc:
                r.error(str(exc), "key_file" if "key_file" in r else None)
                return None
        return resolved

    def _check_unique_tsn(self, r: MapReader, fields: dict[str, Any]) -> None:
        for key in ("mac", "publisher_id"):
            value = fields.get(key)
            if value is None:
                continue
            seen = self.tsn_ids.setdefault(key, {})
            norm = value.lower() if isinstance(value, str) else value
            if norm in seen:
                r.error(f"{key} {value} is already used by the device at line {seen[norm]}", key)
            else:
                seen[norm] = r.line

    def _tls_fields(self, r: MapReader, inherited: dict[str, Any], only_present: bool,
                    fields: dict[str, Any]) -> tuple[MapReader | None, set[str]]:
        """Add the device.tls paths (own, else inherited from defaults) to `fields`.

        Returns the tls reader and the keys given but unusable (reported already, so not as missing).
        """
        tls = r.mapping("tls")
        broken: set[str] = set()
        if tls is not None:
            tls.reject_unknown(TLS_FIELDS)
        for key, field in TLS_FIELDS.items():
            if tls is not None and key in tls:
                fields[field] = self._tls_file(tls, key)
                if fields[field] is None:
                    broken.add(key)
            elif not only_present:
                fields[field] = inherited.get(field)
        if tls is not None:
            self._check_pem(tls, fields)
        return tls, broken

    @staticmethod
    def _check_tls_for_driver(r: MapReader, tls: MapReader | None, broken: set[str], fields: dict[str, Any]) -> None:
        """modbus-tls needs the gateway's cert, key and CA; other drivers take no tls (defaults do not apply)."""
        driver = fields["driver"]
        if driver == "modbus-tls":
            missing = [k for k in _TLS_GATEWAY_KEYS if fields[TLS_FIELDS[k]] is None and k not in broken]
            if missing:
                what = ", ".join(f"tls.{k}" for k in missing)
                message = (f"driver modbus-tls needs {what} (the gateway's client certificate, its private key "
                           f"and the CA that signs device certificates)")
                r.error(message, "tls" if tls is not None else "driver")
        elif driver is not None:
            if tls is not None:
                r.error(f"only used with driver modbus-tls (this device's driver is '{driver}')", "tls")
            for field in TLS_FIELDS.values():
                fields[field] = None

    def _tls_file(self, tls: MapReader, key: str) -> str | None:
        """A PEM file path, absolute and checked to exist when the site file's folder is known."""
        path = tls.string(key)
        if path is None or self.base_dir is None:
            return path
        resolved = os.path.normpath(self.base_dir / Path(path).expanduser())
        if not os.path.isfile(resolved):
            tls.error(f"file not found: {resolved}" if not os.path.exists(resolved)
                      else f"not a file: {resolved}", key)
            return None
        if not os.access(resolved, os.R_OK):
            tls.error(f"cannot read {resolved} (permissions)", key)
            return None
        return resolved

    def _check_pem(self, tls: MapReader, fields: dict[str, Any]) -> None:
        """Certificates, keys and CAs load (stdlib ssl), each key matching its certificate; once per file set."""
        if self.base_dir is None:
            return
        pairs = (("cert", "key"), ("server_cert", "server_key"))
        for cert_key, key_key in pairs:
            cert, key = fields.get(TLS_FIELDS[cert_key]), fields.get(TLS_FIELDS[key_key])
            if cert and key and (cert, key) not in self.pem_checked:
                self.pem_checked.add((cert, key))
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
                except (ssl.SSLError, OSError) as exc:
                    where = key_key if key_key in tls else cert_key if cert_key in tls else None
                    tls.error(f"{cert_key} and {key_key} are not a matching PEM certificate and private key "
                              f"({_ssl_reason(exc)})", where)
        for ca_key in ("ca", "client_ca"):
            ca = fields.get(TLS_FIELDS[ca_key])
            if ca and (ca,) not in self.pem_checked:
                self.pem_checked.add((ca,))
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
                except (ssl.SSLError, OSError) as exc:
                    tls.error(f"not a PEM CA certificate ({_ssl_reason(exc)})", ca_key if ca_key in tls else None)

    def _profile(self, r: MapReader, default: Any) -> str | None:
        profile = r.string("profile", default, pattern=NAME_PATTERN)
        if profile is not None and self.profiles is not None and profile not in self.profiles:
            hint = did_you_mean(profile, sorted(self.profiles)) or f"; known: {', '.join(sorted(self.profiles))}"
            r.error(f"no register-map profile '{profile}' in drivers/profiles/{hint}", "profile")
        return profile

    def _scan_group(self, r: MapReader, default: Any) -> str | None:
        group = r.string("scan_group", default)
        if group is not None and self.scan_groups and group not in self.scan_groups:
            r.error(f"scan group '{group}' is not in gateway.scan_groups_s ({', '.join(sorted(self.scan_groups))})",
                    "scan_group")
        return group

    def _device(self, owner: MapReader, owner_name: str | None) -> DeviceEndpoint | None:
        r = owner.mapping("device", required=True)
        if r is None:
            return None
        fields = self._device_fields(r, self.device_defaults)
        self._check_endpoint_security(r, owner_name or owner.key_path("device"), fields)
        address = (fields["host"], fields["port"], fields["unit_id"])
        if None not in address and fields["driver"] != "tsn":
            if address in self.addresses:
                other, other_line = self.addresses[address]
                r.error(f"device address {address[0]}:{address[1]} unit {address[2]} is already used by "
                        f"{other} (line {other_line})")
            else:
                self.addresses[address] = (owner_name or owner.key_path("device"), r.line)
        return DeviceEndpoint(**fields)

    def _check_endpoint_security(self, r: MapReader, name: str, fields: dict[str, Any]) -> None:
        """Devices at one host:port are one TLS peer (one certificate) or one plain one: they must agree."""
        if fields["driver"] not in ("modbus", "modbus-tls") or None in (fields["host"], fields["port"]):
            return
        endpoint = (fields["host"], fields["port"])
        settings = (fields["driver"], *(fields[f] for f in TLS_FIELDS.values()))
        if endpoint not in self.endpoint_security:
            self.endpoint_security[endpoint] = (settings, name, r.line)
            return
        first, other, other_line = self.endpoint_security[endpoint]
        if settings != first:
            r.error(f"{endpoint[0]}:{endpoint[1]} is also the endpoint of {other} (line {other_line}) with another "
                    f"driver or other tls files; devices sharing an address share one (TLS) connection")

    def _sources(self, top: MapReader, voltage_v: float | None, frequency_hz: float | None) -> tuple[SourceConfig, ...]:
        items = top.sequence("sources", required=True)
        if items is not None and len(items) != len(SOURCE_NAMES):
            top.error(f"expected exactly {len(SOURCE_NAMES)} sources ({', '.join(SOURCE_NAMES)}), "
                      f"got {len(items)}", "sources")
        readers = [item.as_mapping() for item in items or []]
        sources = []
        for r, expected_name in zip(readers, SOURCE_NAMES):
            if r is None:
                continue
            r.reject_unknown(_SOURCE_KEYS)
            name = self._name(r)
            if name is not None and name != expected_name:
                # The position decides the SourceSelection value clients see: A first, then B.
                r.error(f"must be '{expected_name}' (sources are listed as {', '.join(SOURCE_NAMES)}, in order)",
                        "name")
            sources.append(SourceConfig(
                name=name,
                selection=FEEDS[expected_name],
                rated_power_kw=r.number("rated_power_kw", gt=0),
                backup=r.choice("backup", BACKUPS),
                nominal_voltage_v=voltage_v,
                frequency_hz=float(frequency_hz) if frequency_hz is not None else None,
                device=self._device(r, name),
            ))
        return tuple(sources)

    def _aisle(self, r: MapReader) -> AisleConfig:
        r.reject_unknown(_AISLE_KEYS)
        name = self._name(r)
        pdb_readers = _mapping_items(r, "pdbs", "PDB segment")
        pdbs = tuple(self._pdb(p, name) for p in pdb_readers if p is not None)
        self._check_one_pdb_per_feed(r, pdb_readers, pdbs)
        units = tuple(self._unit(u, name) for u in _mapping_items(r, "units", "micro-ATS unit") if u is not None)
        return AisleConfig(name=name, pdbs=pdbs, units=units)

    @staticmethod
    def _check_one_pdb_per_feed(aisle: MapReader, readers: list[MapReader | None], pdbs: tuple[PdbConfig, ...]) -> None:
        # Each micro-ATS switches between its aisle's A and B segments: both must exist, once each.
        first_on_feed: dict[SourceSelection, str] = {}
        for r, pdb in zip((r for r in readers if r is not None), pdbs):
            if pdb.feed in first_on_feed:
                r.error(f"a second PDB segment on feed {SOURCE_NAMES[pdb.feed - 1]} (already fed by "
                        f"{first_on_feed[pdb.feed]}); each aisle has one per feed", "feed")
            elif pdb.feed is not None:
                first_on_feed[pdb.feed] = pdb.name
        all_feeds_read = bool(readers) and None not in readers and all(p.feed is not None for p in pdbs)
        if all_feeds_read:  # otherwise a feed may only look missing because its entry is broken
            for feed_name, feed in FEEDS.items():
                if feed not in first_on_feed:
                    aisle.error(f"no PDB segment for feed {feed_name}; each aisle needs one per feed", "pdbs")

    def _pdb(self, r: MapReader, aisle: str | None) -> PdbConfig:
        r.reject_unknown(_PDB_KEYS)
        name = self._name(r)
        return PdbConfig(
            name=name,
            aisle=aisle,
            feed=r.choice("feed", FEEDS),
            rated_current_a=r.number("rated_current_a", gt=0),
            joints_per_phase=r.integer("joints_per_phase", 4, ge=1),
            device=self._device(r, name),
        )

    def _unit(self, r: MapReader, aisle: str | None) -> MicroAtsConfig:
        r.reject_unknown(_UNIT_KEYS)
        name = self._name(r)
        storage = r.mapping("storage")
        return MicroAtsConfig(
            name=name,
            aisle=aisle,
            position_ft=r.number("position_ft", ge=0),
            rated_current_a=r.number("rated_current_a", gt=0),
            preferred_source=r.choice("preferred_source", FEEDS),
            it_load_kw=r.number("it_load_kw", ge=0),
            dual_corded_fraction=r.number("dual_corded_fraction", 0.0, ge=0, le=1),
            # 4 ms default: about a quarter cycle at 60 Hz, typical of a micro-ATS; past 1 s IT load drops anyway.
            transfer_time_ms=r.number("transfer_time_ms", 4.0, gt=0, le=1000),
            device=self._device(r, name),
            storage=self._storage(storage) if storage is not None else None,
        )

    def _storage(self, r: MapReader) -> StorageConfig:
        r.reject_unknown(_STORAGE_KEYS)
        name = self._name(r)
        soc_min_pct = r.number("soc_min_pct", 10.0, ge=0, le=100)
        soc_max_pct = r.number("soc_max_pct", 90.0, ge=0, le=100)
        if soc_min_pct is not None and soc_max_pct is not None and soc_min_pct >= soc_max_pct:
            given = "soc_max_pct" if "soc_max_pct" in r else "soc_min_pct"  # point at a key that is written
            r.error(f"empty state-of-charge window: soc_min_pct {soc_min_pct:g} must be below "
                    f"soc_max_pct {soc_max_pct:g}", given)
        return StorageConfig(
            name=name,
            capacity_kwh=r.number("capacity_kwh", gt=0),
            max_power_kw=r.number("max_power_kw", gt=0),
            soc_min_pct=soc_min_pct,
            soc_max_pct=soc_max_pct,
            device=self._device(r, name),
        )


def _driver_named(r: MapReader, inherited: dict[str, Any]) -> Any:
    """The device's driver as written (or inherited), before it is validated: decides which keys it needs."""
    value = r.get("driver", None)
    if isinstance(value, Value):
        return getattr(value.node, "value", None)
    return inherited.get("driver")


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def _mapping_items(r: MapReader, key: str, what: str) -> list[MapReader | None]:
    """The items of a required, non-empty list of mappings; None stands for a broken item."""
    items = r.sequence(key, required=True)
    if items is None:
        return []
    if not items:
        r.error(f"at least one {what} is needed", key)
    return [item.as_mapping() for item in items]
