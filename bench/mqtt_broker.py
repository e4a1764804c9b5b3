"""A real mosquitto with TLS (`require_certificate true`) and certificates made on the spot, and a
Sparkplug subscriber; shared by tests/integration/test_sparkplug.py and bench/mqtt.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from drivers.modbus.tls import CertificateAuthority
from gateway.sparkplug.catalogue import Payload

LOCALHOST = "127.0.0.1"


@dataclass
class Pki:
    folder: Path
    ca: Path
    broker_cert: Path
    broker_key: Path
    gateway_cert: Path
    gateway_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_broker_cert: Path
    rogue_broker_key: Path


def make_pki(folder: Path) -> Pki:
    """Site CA (broker, gateway and subscriber certificates) and a rogue CA (an impostor broker)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = CertificateAuthority("cmcs MQTT test CA"), CertificateAuthority("rogue CA")
    ca_path, rogue_path = ca.write(folder, "ca"), rogue.write(folder, "rogue-ca")
    bc, bk = ca.issue("mosquitto", ip_addresses=(LOCALHOST,), server=True).write(folder, "broker")
    gc, gk = ca.issue("gateway-demo-hall", client=True).write(folder, "gateway")
    cc, ck = ca.issue("historian", client=True).write(folder, "client")
    rc, rk = rogue.issue("impostor", ip_addresses=(LOCALHOST,), server=True).write(folder, "rogue-broker")
    return Pki(folder, ca_path, bc, bk, gc, gk, cc, ck, rogue_path, rc, rk)


def free_port() -> int:
    from siteconfig.demo import free_port as port_below_ephemeral_range

    return port_below_ephemeral_range(LOCALHOST)


@dataclass
class Mosquitto:
    """`mosquitto -c` with one TLS listener; start(), stop(), restart on the same port (persistence on)."""

    folder: Path
    pki: Pki
    port: int = 0
    rogue: bool = False  # present a certificate of the rogue CA
    proc: subprocess.Popen | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "mosquitto.log"
        cert, key = ((self.pki.rogue_broker_cert, self.pki.rogue_broker_key) if self.rogue
                     else (self.pki.broker_cert, self.pki.broker_key))
        conf = self.folder / "mosquitto.conf"
        conf.write_text("\n".join([
            "user root" if _is_root() else "",
            "persistence true", f"persistence_location {self.folder}/", "autosave_interval 1",
            f"log_dest file {self.log}", "log_type error", "log_type warning", "log_type notice",
            "max_inflight_messages 0", "max_queued_messages 0", "max_queued_bytes 0", "queue_qos0_messages true",
            f"listener {self.port} {LOCALHOST}",
            f"cafile {self.pki.ca}", f"certfile {cert}", f"keyfile {key}",
            "require_certificate true", "tls_version tlsv1.2", "allow_anonymous true", ""]))
        self.conf = conf

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((LOCALHOST, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text() if self.log.exists() else ''}")
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: it saves its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class Received:
    topic: str
    payload: object  # Payload
    raw: bytes
    at: float  # time.time() on arrival


class Subscriber:
    """A Sparkplug consumer (a historian's view): a persistent session (QoS 1), every message kept."""

    def __init__(self, pki: Pki, port: int, topic_filter: str = "spBv1.0/#", client_id: str = "historian",
                 cert: bool = True):
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if cert:
            self.client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
        else:
            self.client.tls_set(ca_certs=str(pki.ca))
        self.topic_filter = topic_filter
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.port = port

    def _on_connect(self, client, _u, _f, rc, _p):
        if not rc.is_failure:
            client.subscribe(self.topic_filter, qos=1)
            self.connected.set()

    def _on_message(self, _c, _u, msg):
        try:
            payload = Payload.FromString(msg.payload) if "/STATE/" not in msg.topic else msg.payload
        except Exception:  # noqa: BLE001 - kept raw: the test says what it expected
            payload = None
        with self.lock:
            self.messages.append(Received(msg.topic, payload, bytes(msg.payload), time.time()))

    def start(self, timeout_s: float = 10.0) -> None:
        self.client.connect(LOCALHOST, self.port)
        self.client.loop_start()
        if not self.connected.wait(timeout_s):
            raise TimeoutError("subscriber did not connect")
        time.sleep(0.2)  # SUBACK

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def of(self, kind: str, device: str | None = None) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.split("/")[2] == kind
                    and (device is None or m.topic.split("/")[-1] == device)]

    def wait_for(self, predicate, timeout_s: float = 20.0, what: str = "messages"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                result = predicate(list(self.messages))
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)} messages: "
                             f"{sorted({m.topic for m in self.messages})[:20]}")
