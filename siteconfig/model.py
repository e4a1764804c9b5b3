"""Typed site description: what the site file (docs/interface.md section 5) turns into.

Pure data: the simulator, the drivers and the gateway all read it; nothing here knows
about OPC UA, Modbus or the plant physics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class SourceSelection(IntEnum):
    """docs/interface.md enumeration `SourceSelection`."""

    NONE = 0
    SOURCE_A = 1
    SOURCE_B = 2


class AtsState(IntEnum):
    NORMAL = 0
    TRANSFERRING = 1
    BRIDGING = 2
    FAULT = 3
    OFFLINE = 4


class StorageMode(IntEnum):
    STANDBY = 0
    CHARGING = 1
    BRIDGING = 2
    SMOOTHING = 3
    FAULT = 4


class CmcsMode(IntEnum):
    MANUAL = 0
    ADVISORY = 1
    AUTOMATIC = 2


# Source names in the site file map onto SourceSelection by position: the first source is A.
SOURCE_NAMES = ("SourceA", "SourceB")


@dataclass(frozen=True)
class DeviceEndpoint:
    """Where and how a device is reached."""

    driver: str  # a registered driver (drivers.base): "modbus" | "modbus-tls"; "tsn" once built
    profile: str  # register-map profile name: drivers/profiles/<profile>.yaml
    host: str = "127.0.0.1"
    port: int = 1502
    unit_id: int = 1
    scan_group: str = "normal"
    # Modbus/TCP Security (driver "modbus-tls"): paths to PEM files. The gateway's side: its client
    # certificate and key, and the CA that signs device certificates.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # The device's side, used only to simulate it: its server certificate and key, and the CA it
    # checks the gateway's certificate against (None: the same as tls_ca).
    tls_server_cert: str | None = None
    tls_server_key: str | None = None
    tls_client_ca: str | None = None
    # Driver "tsn" (docs/tsn.md): the device's MAC address, its VLAN id, its UADP PublisherId and the
    # file holding its frame-security group key (never the key itself in the site file).
    mac: str | None = None
    vlan: int | None = None
    publisher_id: int | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class SourceConfig:
    name: str  # "SourceA" | "SourceB"
    selection: SourceSelection
    rated_power_kw: float
    backup: str  # "ups" (UPS + battery string) | "generator" (standby gen + start battery) | "none"
    nominal_voltage_v: float
    frequency_hz: float
    device: DeviceEndpoint


@dataclass(frozen=True)
class PdbConfig:
    name: str  # "PDB-01-A"
    aisle: str
    feed: SourceSelection
    rated_current_a: float
    joints_per_phase: int
    device: DeviceEndpoint


@dataclass(frozen=True)
class StorageConfig:
    name: str  # "DES-01-01"
    capacity_kwh: float
    max_power_kw: float  # inverter / C-rate limit at full health
    soc_min_pct: float
    soc_max_pct: float
    device: DeviceEndpoint


@dataclass(frozen=True)
class MicroAtsConfig:
    name: str  # "MATS-01-01"
    aisle: str
    position_ft: float
    rated_current_a: float
    preferred_source: SourceSelection
    it_load_kw: float  # mean IT load of the segment it serves
    dual_corded_fraction: float  # share of the load on dual-corded racks (second cord on the next unit)
    transfer_time_ms: float  # nominal local transfer time (detection + switching + break-before-make gap)
    device: DeviceEndpoint
    storage: StorageConfig | None = None


@dataclass(frozen=True)
class AisleConfig:
    name: str  # "Aisle01"
    pdbs: tuple[PdbConfig, ...]
    units: tuple[MicroAtsConfig, ...]


@dataclass(frozen=True)
class OpcUaConfig:
    host: str = "0.0.0.0"
    port: int = 4840
    path: str = "/cmcs"
    allow_security_none: bool = False
    allow_anonymous: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """`gateway.metrics`: the Prometheus endpoint (docs/interface.md section 9). Absent: off.

    Bound to loopback unless `host` says otherwise; a remote scraper should get TLS (`tls_cert`,
    `tls_key`) and basic auth (`basic_auth_user` with an scrypt `basic_auth_password_hash`, as
    `cmcs metrics hash-password` prints it)."""

    host: str = "127.0.0.1"
    port: int = 9464
    tls_cert: str | None = None  # PEM, absolute (resolved against the site file's folder)
    tls_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_password_hash: str | None = None  # scrypt$N$r$p$salt$key (gateway.users.hash_password)


@dataclass(frozen=True)
class MqttConfig:
    """`gateway.mqtt`: the Sparkplug B 3.0 edge node (docs/interface.md sections 5 and 8, docs/sparkplug.md)."""

    host: str = "127.0.0.1"
    port: int = 8883
    tls_ca: str | None = None  # PEM paths, absolute once loaded (relative to the site file in it)
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False  # plain TCP allowed (warned at start-up)
    group_id: str = "cmcs"
    edge_node_id: str | None = None  # None: the site name
    primary_host_id: str | None = None
    store_forward_mb: float = 512.0
    commands: bool = False  # DCMD SwitchSource / StartBridging / StopBridging through the command service
    command_user: str = "mqtt"  # who DCMD calls are audited as, and the role they are checked under
    command_role: str = "Operator"


@dataclass(frozen=True)
class TsnWindowConfig:
    """One traffic class's gate in the 802.1Qbv-style cycle."""

    traffic_class: str  # "command" | "telemetry"
    pcp: int  # IEEE 802.1Q priority code point its frames carry
    offset_us: float
    length_us: float


@dataclass(frozen=True)
class TsnConfig:
    """`gateway.tsn`: the time-aware schedule and frame security of `driver: tsn` devices."""

    interface: str
    cycle_us: float = 1000.0
    windows: tuple[TsnWindowConfig, ...] = (TsnWindowConfig("command", 6, 0.0, 200.0),
                                            TsnWindowConfig("telemetry", 5, 200.0, 300.0))
    base_time_ns: int = 0  # CLOCK_TAI instant the first cycle starts from (taprio's base-time)
    link_rate_mbps: float = 100.0  # the rate the schedule's byte budget assumes
    best_effort_pcp: int = 0
    security: str = "sign_and_encrypt"  # or "sign" (payload in clear, still signed)
    max_frame_age_ms: float = 100.0  # older frames are dropped as late
    realtime_priority: int = 0  # SCHED_FIFO priority of the transmit thread (0: normal scheduling)


@dataclass(frozen=True)
class GatewayConfig:
    opcua: OpcUaConfig = field(default_factory=OpcUaConfig)
    scan_groups_s: dict[str, float] = field(default_factory=lambda: {"fast": 0.5, "normal": 1.0, "slow": 5.0})
    stale_time_s: float = 10.0  # Uncertain -> Bad after this long without a good read
    dwell_time_s: float = 30.0  # anti-flapping: minimum time between transfers of one unit
    derating: float = 0.8  # NEC 210.20(A) 80 % rule for continuous load
    metrics: MetricsConfig | None = None  # the Prometheus endpoint; None: off
    log_summary_s: float = 60.0  # period of the one-line summary in the log; 0: none
    driver_process: bool = True  # the Modbus drivers in a process of their own (drivers/worker.py)
    mqtt: MqttConfig | None = None  # absent: no MQTT publisher
    tsn: TsnConfig | None = None  # absent: no TSN devices


@dataclass(frozen=True)
class Site:
    name: str
    nominal_voltage_v: float  # line-to-line
    frequency_hz: float
    sources: tuple[SourceConfig, ...]
    aisles: tuple[AisleConfig, ...]
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    path: str | None = None  # the file it came from, None for a built-in site

    @property
    def units(self) -> list[MicroAtsConfig]:
        return [u for a in self.aisles for u in a.units]

    @property
    def pdbs(self) -> list[PdbConfig]:
        return [p for a in self.aisles for p in a.pdbs]

    @property
    def storages(self) -> list[StorageConfig]:
        return [u.storage for u in self.units if u.storage is not None]

    def source(self, selection: SourceSelection) -> SourceConfig:
        for s in self.sources:
            if s.selection == selection:
                return s
        raise KeyError(selection)

    def devices(self) -> list[tuple[str, str, DeviceEndpoint]]:
        """Every device as (name, kind, endpoint); kind is source|pdb|ats|des."""
        out: list[tuple[str, str, DeviceEndpoint]] = [(s.name, "source", s.device) for s in self.sources]
        for a in self.aisles:
            out += [(p.name, "pdb", p.device) for p in a.pdbs]
            for u in a.units:
                out.append((u.name, "ats", u.device))
                if u.storage is not None:
                    out.append((u.storage.name, "des", u.storage.device))
        return out
