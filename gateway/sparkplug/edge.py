"""The Sparkplug B 3.0 edge node: a lossless sink of the point table publishing over MQTT with TLS.

Threads: the point table calls the sink inline on the gateway's asyncio loop; each call only puts an
event on a queue and returns. One publisher thread owns all state: it turns events into messages,
writes them to the on-disk queue (gateway/sparkplug/store.py), and publishes from the head of that
queue with QoS 1 and a bounded window of unacknowledged messages, deleting each on its PUBACK.
Each MQTT connection has its own paho client and network thread (paho's `loop()`), so nothing here
ever blocks the asyncio loop and a new connection starts with no leftovers of the last one (its own
will and bdSeq). Commands (DCMD) go back to the asyncio loop with `run_coroutine_threadsafe`.

Sparkplug behaviour (Sparkplug 3.0, docs/domain.md, docs/sparkplug.md):
- CONNECT carries the will NDEATH (QoS 1, retain false) with bdSeq; NBIRTH (seq 0) the same bdSeq
  and `Node Control/Rebirth`; then one DBIRTH per device (DDEATH after it for a device that is Bad);
- with `primary_host_id`, births wait for `spBv1.0/STATE/<id>` {"online": true}; STATE offline:
  NDEATH, disconnect, connect again (Sparkplug 3.0 section 5.12, "Edge Node Session Establishment");
- DDATA/NDATA by exception with aliases; DDEATH when a device goes Bad, DBIRTH when it is back;
- seq 0-255 over every message of a session after NBIRTH;
- NCMD `Node Control/Rebirth` true: NBIRTH and DBIRTHs again;
- what was queued while not live is sent after the births, in order, with `is_historical` true.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from asyncua import ua

from drivers.pointtable import Birth, Change, Quality, Sink
from gateway.sparkplug.catalogue import (BDSEQ, BOOLEAN, COMMAND_METRICS, NAMESPACE, QUALITY_GOOD, QUALITY_STALE,
                                         REBIRTH, ALARM_TYPES, Catalogue, MetricDef, Payload, alarm_metric,
                                         birth_metric, set_quality, set_value, topic, value_of)
from gateway.sparkplug.store import MessageStore
from siteconfig.model import MqttConfig, Site
from siteconfig.points import POINTS

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_MAX_S = 10.0  # docs/interface.md section 8
RECONNECT_BACKOFF_MIN_S = 0.5
KEEPALIVE_S = 30
INFLIGHT_WINDOW = 64  # unacknowledged QoS 1 messages at a time: what paces the replay to the broker
QUEUE_FILE = "sparkplug-queue.sqlite3"
BDSEQ_FILE = "sparkplug-bdseq"
_DEAD = (Quality.BAD_COMM, Quality.BAD_WAITING)
# the queue's `historical` column: sent live / to be flagged is_historical when sent / flagged already
LIVE, HISTORY_UNFLAGGED, HISTORY_FLAGGED = 0, 1, 2


def _seq_field(seq: int) -> bytes:
    """Payload.seq (field 3, varint) on the wire: key byte 0x18, then the varint of 0..255."""
    return b"\x18" + (bytes([seq]) if seq < 0x80 else bytes([(seq & 0x7F) | 0x80, seq >> 7]))

# DCMD metric names -> (command service method, argument names) (docs/sparkplug.md "Commands")
DCMD_METRICS = {"SwitchSource": "switch_source", "SetPreferredSource": "set_preferred_source",
                "StartBridging/Power": "start_bridging", "StartBridging/Duration": "start_bridging",
                "StopBridging": "stop_bridging"}


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """TLS 1.2+ client context: the broker's certificate checked against the site's CA (and its
    host name), this gateway's certificate and key presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=config.tls_ca)
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


@dataclass
class _Session:
    client: mqtt.Client
    bdseq: int
    connected: bool = False
    live: bool = False  # births sent: messages go out as they come
    seq: int = 0
    inflight: dict[int, int] = field(default_factory=dict)  # mid -> queue row id
    cursor: int = 0  # last queue row id handed to paho


class EdgeNode(Sink):
    """Sparkplug B edge node for one site (a lossless point-table sink). `start()`, `stop()`."""

    name = "sparkplug"
    kind = "lossless"

    def __init__(self, site: Site, config: MqttConfig, data_dir: Path, *, commands=None,
                 loop: asyncio.AbstractEventLoop | None = None, inflight_window: int = INFLIGHT_WINDOW):
        self.site = site
        self.config = config
        self.data_dir = Path(data_dir)
        self.group_id = config.group_id
        self.edge_node_id = config.edge_node_id or site.name
        self.catalogue = Catalogue.of_site(site, commands=config.commands)
        self.commands = commands
        self.loop = loop
        self.window = inflight_window
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._session: _Session | None = None
        # state (publisher thread): latest value and timestamp of every metric; alive devices
        self.values: dict[str, dict[str, tuple[Any, float]]] = {d: {} for d in self.catalogue.devices}
        self.node_values: dict[str, tuple[Any, float]] = {}
        self.alive: dict[str, bool] = {d: False for d in self.catalogue.devices}
        self.stale: set[str] = set()  # alive devices whose points were last sent with QUALITY_STALE
        self.alarms_seen: dict[str, set[str]] = {d: set() for d in self.catalogue.devices}
        self.primary_online = config.primary_host_id is None
        self.store: MessageStore | None = None
        self._refused_reason = ""
        # counters (read from other threads: Diagnostics, metrics, tests)
        self.published = 0
        self.acked = 0
        self.births = 0
        self.connections = 0
        self.commands_received = 0
        self.held_metrics = 0  # metrics queued while not live (to be sent as history)

    # ---- the sink (asyncio loop: put and return) ------------------------------------------------
    def attach(self, birth: Birth) -> None:
        self._inbox.put(("birth", birth))

    def changes(self, batch: list[Change]) -> None:
        self._inbox.put(("changes", batch))

    def device_quality(self, device: str, quality: Quality, ts: float) -> None:
        self._inbox.put(("quality", device, quality, ts))

    def detach(self) -> None:
        pass

    def stats(self) -> dict[str, int | float]:
        store = self.store
        return {"queue_messages": store.count if store else 0, "queue_bytes": store.bytes if store else 0,
                "dropped_messages": store.dropped_messages if store else 0,
                "dropped_metrics": store.dropped_metrics if store else 0,
                "published": self.published, "acked": self.acked, "births": self.births,
                "connections": self.connections, "held_metrics": self.held_metrics, "inbox": self._inbox.qsize()}

    # ---- listeners of the CMCS results and the alarms (asyncio loop) ------------------------------
    def on_result(self, device: str, point: str, value, ts: float) -> None:
        """A CMCS result written over OPC UA (RiskScore, PredictedLoad, the Cmcs object's variables)."""
        self._inbox.put(("result", device, point, value, ts))

    def on_alarm(self, condition) -> None:
        """gateway.alarms.AlarmEngine listener: a condition's state changed (raise, clear, acknowledge)."""
        self._inbox.put(("alarm", condition.device, condition.type_name, bool(condition.active),
                         bool(condition.acked), int(condition.severity), str(condition.message), time.time()))

    async def attach_server(self, gateway_server) -> None:
        """Follow the CMCS results in the address space (asyncua datachange callbacks: the CMCS writes
        them as a client, unaudited, so they pass no other hook) and the alarm engine's conditions."""
        model = gateway_server.model
        aspace = gateway_server.server.iserver.aspace
        for (device, point), nodeid in model.points.items():
            if not (point in ("RiskScore", "PredictedLoad") or device == "Cmcs"):
                continue
            if device != "Cmcs" and point not in self.catalogue.devices.get(device, {}):
                continue
            dv = aspace.read_attribute_value(nodeid, ua.AttributeIds.Value)
            if dv is not None and dv.Value is not None and dv.Value.Value is not None:
                self.on_result(device, point, dv.Value.Value, time.time())

            async def changed(_handle, dv, device=device, point=point):
                if isinstance(dv, ua.DataValue) and dv.Value is not None:
                    ts = dv.SourceTimestamp.timestamp() if dv.SourceTimestamp else time.time()
                    self.on_result(device, point, dv.Value.Value, ts)

            aspace.add_datachange_callback(nodeid, ua.AttributeIds.Value, changed)
        engine = getattr(gateway_server, "alarms", None)
        if engine is not None and hasattr(engine, "listeners"):
            for cond in list(engine.conditions.values()):
                self.on_alarm(cond)
            engine.listeners.append(self.on_alarm)

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the queue and start the publisher thread (it connects, with backoff, on its own)."""
        if self.config.insecure and not self.config.tls_ca:
            log.warning("MQTT: plain TCP to %s:%d (insecure: true): payloads and the broker are not "
                        "authenticated or encrypted", self.config.host, self.config.port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="sparkplug publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish NDEATH, disconnect, close the queue (what is not acknowledged stays queued)."""
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    # ---- the publisher thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self.store = MessageStore(self.data_dir / QUEUE_FILE, int(self.config.store_forward_mb * 1e6))
        backoff = RECONNECT_BACKOFF_MIN_S
        next_attempt = 0.0
        try:
            while not self._stopping.is_set():
                s = self._session
                busy = s is not None and s.live and len(s.inflight) < self.window and self.store.count > len(s.inflight)
                self._drain(0.0 if busy else 0.2)
                s = self._session
                if s is None:
                    if time.monotonic() >= next_attempt and not self._stopping.is_set():
                        # the next try waits 0.5, 1, 2 .. 10 s after this one, until a session is live
                        next_attempt = time.monotonic() + backoff
                        backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX_S)
                        self._connect()
                elif s.live:
                    backoff = RECONNECT_BACKOFF_MIN_S
                    self._pump(s)
                    self.store.commit()
            self._drain(0.0)
            self._shutdown()
        except Exception:  # noqa: BLE001 - the thread must say why it died, once
            log.exception("MQTT publisher stopped on an error")
        finally:
            self.store.close()
            self._stopped.set()

    def _drain(self, timeout: float) -> None:
        """Handle every event waiting (blocking up to `timeout` for the first)."""
        try:
            event = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        acked: list[int] = []
        n = 0
        while True:
            kind = event[0]
            if kind == "puback":
                s = self._session
                if s is not None and event[1] is s.client:
                    row = s.inflight.pop(event[2], None)
                    if row is not None:
                        acked.append(row)
            else:
                self._handle(event)
            n += 1
            if n >= 5000:
                break
            try:
                event = self._inbox.get_nowait()
            except queue.Empty:
                break
        if acked:
            self.acked += len(acked)
            self.store.delete(acked)
        self.store.commit()

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "changes":
            self._on_changes(event[1])
        elif kind == "quality":
            self._on_quality(event[1], event[2])
        elif kind == "birth":
            self._on_birth(event[1])
        elif kind == "result":
            self._on_result(*event[1:])
        elif kind == "alarm":
            self._on_alarm(*event[1:])
        elif kind == "connack":
            self._on_connack(event[1], event[2])
        elif kind == "disconnect":
            s = self._session
            if s is not None and event[1] is s.client:
                self._end_session(f"connection lost ({event[2]})")
        elif kind == "message":
            self._on_message(event[1], event[2], event[3])

    # ---- turning point-table events into messages ---------------------------------------------
    def _live(self) -> bool:
        s = self._session
        return s is not None and s.live

    def _queue(self, kind: str, device: str, payload, metrics: int) -> None:
        s = self._session
        keep = s.inflight.values() if s is not None else ()
        live = self._live()
        if not live:  # history from the start: flagged now, so the replay only adds seq
            self.held_metrics += metrics
            for m in payload.metrics:
                m.is_historical = True
        self.store.append(kind, device, HISTORY_FLAGGED if not live else LIVE, metrics,
                          payload.SerializeToString(), keep)

    def _on_birth(self, birth: Birth) -> None:
        for device, points in birth.values.items():
            if device not in self.values:
                continue
            state = self.values[device]
            for point, pv in points.items():
                if point in self.catalogue.devices[device]:
                    state[point] = (pv.value, pv.source_ts)
            self.alive[device] = birth.device_quality.get(device, Quality.BAD_WAITING) not in _DEAD

    def _on_changes(self, batch: list[Change]) -> None:
        device = batch[0].device
        defs = self.catalogue.devices.get(device)
        if defs is None:
            return
        state = self.values[device]
        payload = Payload()
        for c in batch:
            d = defs.get(c.point)
            if d is None:
                continue
            if c.quality is not Quality.GOOD:
                continue  # the last value stands; a Bad device gets a DDEATH (device_quality)
            state[c.point] = (c.value, c.source_ts)
            m = payload.metrics.add()
            m.alias = d.alias
            m.timestamp = int(c.source_ts * 1000)
            set_value(m, d.datatype, c.value)
        if payload.metrics and self.alive.get(device, False):
            payload.timestamp = int(time.time() * 1000)
            self._queue("DDATA", device, payload, len(payload.metrics))

    def _on_quality(self, device: str, quality: Quality) -> None:
        if device not in self.alive:
            return
        dead = quality in _DEAD
        if dead and self.alive[device]:
            self.alive[device] = False
            self.stale.discard(device)
            self._queue("DDEATH", device, Payload(timestamp=int(time.time() * 1000)), 0)
        elif not dead and not self.alive[device]:
            self.alive[device] = True
            self._queue("DBIRTH", device, Payload(timestamp=int(time.time() * 1000)), 0)  # built when sent
            if quality is Quality.UNCERTAIN_LAST_USABLE:
                self.stale.add(device)
                self._queue_quality(device, QUALITY_STALE)
        elif not dead:
            # alive either way: Uncertain marks its points' last values stale, Good marks them good again
            stale = quality is Quality.UNCERTAIN_LAST_USABLE
            if stale != (device in self.stale):
                (self.stale.add if stale else self.stale.discard)(device)
                self._queue_quality(device, QUALITY_STALE if stale else QUALITY_GOOD)

    def _queue_quality(self, device: str, code: int) -> None:
        """DDATA of every point of the device with its last value and the property Quality = code."""
        now_ms = int(time.time() * 1000)
        payload = Payload(timestamp=now_ms)
        state = self.values[device]
        for p in POINTS[self.catalogue.kinds[device]]:
            d = self.catalogue.devices[device][p.name]
            value, _ts = state.get(p.name, (None, None))
            m = payload.metrics.add()
            m.alias, m.timestamp = d.alias, now_ms
            set_value(m, d.datatype, value)
            set_quality(m, code)
        self._queue("DDATA", device, payload, len(payload.metrics))

    def _on_result(self, device: str, point: str, value, ts: float) -> None:
        if device == "Cmcs":
            d = self.catalogue.node.get(f"Cmcs/{point}")
            if d is None:
                return
            self.node_values[d.name] = (value, ts)
            payload = Payload(timestamp=int(time.time() * 1000))
            m = payload.metrics.add()
            m.alias, m.timestamp = d.alias, int(ts * 1000)
            set_value(m, d.datatype, value)
            self._queue("NDATA", "", payload, 1)
            return
        d = self.catalogue.devices.get(device, {}).get(point)
        if d is None:
            return
        self.values[device][point] = (value, ts)
        if self.alive[device]:
            payload = Payload(timestamp=int(time.time() * 1000))
            m = payload.metrics.add()
            m.alias, m.timestamp = d.alias, int(ts * 1000)
            set_value(m, d.datatype, value)
            self._queue("DDATA", device, payload, 1)

    def _on_alarm(self, device: str, type_name: str, active: bool, acked: bool, severity: int, message: str,
                  ts: float) -> None:
        defs = self.catalogue.devices.get(device)
        if defs is None or type_name not in ALARM_TYPES:
            return
        fields = {"Active": active, "Acked": acked, "Severity": severity, "Message": message}
        state = self.values[device]
        for f, v in fields.items():
            state[alarm_metric(type_name, f)] = (v, ts)
        first = type_name not in self.alarms_seen[device]
        self.alarms_seen[device].add(type_name)
        if not self.alive[device]:
            return
        if first:  # a metric not in the device's last DBIRTH: birth it again (Sparkplug 3.0 6.4.2)
            self._queue("DBIRTH", device, Payload(timestamp=int(time.time() * 1000)), 0)
            return
        payload = Payload(timestamp=int(time.time() * 1000))
        for f, v in fields.items():
            d = defs[alarm_metric(type_name, f)]
            m = payload.metrics.add()
            m.alias, m.timestamp = d.alias, int(ts * 1000)
            set_value(m, d.datatype, v)
        self._queue("DDATA", device, payload, len(fields))

    # ---- births ---------------------------------------------------------------------------------------
    def _device_metrics(self, device: str) -> list[MetricDef]:
        seen = self.alarms_seen[device]
        return [d for d in self.catalogue.devices[device].values()
                if not d.name.startswith("Alarms/") or d.name.split("/")[1] + "AlarmType" in seen]

    def _dbirth(self, device: str) -> Payload:
        now_ms = int(time.time() * 1000)
        payload = Payload(timestamp=now_ms)
        state = self.values[device]
        commands = {name for name, _dt, _unit in COMMAND_METRICS[self.catalogue.kinds[device]]}
        for d in self._device_metrics(device):
            if d.name in commands:  # a command metric: 0 / false, no command pending
                value, ts = (False if d.datatype == BOOLEAN else 0), None
            else:
                value, ts = state.get(d.name, (None, None))
            birth_metric(payload, d, value, int(ts * 1000) if ts else now_ms)
        return payload

    def _nbirth(self, bdseq: int) -> Payload:
        now_ms = int(time.time() * 1000)
        payload = Payload(timestamp=now_ms, seq=0)
        for d in self.catalogue.node.values():
            if d.name == REBIRTH:
                value, ts = False, None
            elif d.name == BDSEQ:
                value, ts = bdseq, None
            else:
                value, ts = self.node_values.get(d.name, (None, None))
            birth_metric(payload, d, value, int(ts * 1000) if ts else now_ms, with_unit=bool(d.unit))
        return payload

    def _ndeath(self, bdseq: int) -> bytes:
        payload = Payload(timestamp=int(time.time() * 1000))
        d = self.catalogue.node[BDSEQ]
        m = payload.metrics.add()
        m.name, m.datatype = d.name, d.datatype
        set_value(m, d.datatype, bdseq)
        return payload.SerializeToString()

    def _send_births(self, s: _Session) -> None:
        """NBIRTH (seq 0), a DBIRTH per device and a DDEATH for each device that is Bad; then the queue
        from its oldest message."""
        g, e = self.group_id, self.edge_node_id
        s.seq = 0
        s.client.publish(topic(g, "NBIRTH", e), self._nbirth(s.bdseq).SerializeToString(), qos=0)
        for device in self.catalogue.devices:
            s.seq = (s.seq + 1) % 256
            p = self._dbirth(device)
            p.seq = s.seq
            s.client.publish(topic(g, "DBIRTH", e, device), p.SerializeToString(), qos=0)
            if not self.alive[device]:
                s.seq = (s.seq + 1) % 256
                s.client.publish(topic(g, "DDEATH", e, device),
                                 Payload(timestamp=int(time.time() * 1000), seq=s.seq).SerializeToString(), qos=0)
        self.births += 1
        s.live = True
        s.cursor = max(s.inflight.values(), default=0)
        log.info("Sparkplug: NBIRTH (bdSeq %d) and %d DBIRTH on spBv1.0/%s/+/%s; %d queued messages follow",
                 s.bdseq, len(self.catalogue.devices), g, e, self.store.count)

    def _pump(self, s: _Session) -> None:
        """Publish from the queue while the window has room."""
        room = self.window - len(s.inflight)
        if room <= 0 or self.store.count == 0:
            return
        g, e = self.group_id, self.edge_node_id
        for row_id, kind, device, historical, body in self.store.after(s.cursor, room):
            s.cursor = row_id
            if kind == "DBIRTH":
                if historical or not self.alive.get(device, False):
                    self.store.delete([row_id])  # the births of this session already carried it
                    continue
                payload = self._dbirth(device)
            elif kind == "DDEATH" and historical:
                self.store.delete([row_id])
                continue
            elif historical == HISTORY_UNFLAGGED:  # queued live, unacknowledged when the session ended
                payload = Payload.FromString(body)
                for m in payload.metrics:
                    m.is_historical = True
            else:
                payload = None
            s.seq = (s.seq + 1) % 256
            if payload is not None:
                payload.seq = s.seq
                body = payload.SerializeToString()
            else:
                body = body + _seq_field(s.seq)  # a field appended to a serialized message is merged into it
            info = s.client.publish(topic(g, kind, e, device or None), body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                s.cursor = row_id - 1
                self._end_session(f"publish failed ({mqtt.error_string(info.rc)})")
                return
            s.inflight[info.mid] = row_id
            self.published += 1

    # ---- the connection -----------------------------------------------------------------------------
    def _next_bdseq(self) -> int:
        """Sparkplug 3.0 section 6.4.12: bdSeq 0-255, one more on every CONNECT (kept across restarts)."""
        path = self.data_dir / BDSEQ_FILE
        try:
            last = int(path.read_text().strip())
        except (OSError, ValueError):
            last = -1
        value = (last + 1) % 256
        path.write_text(f"{value}\n")
        return value

    def _connect(self) -> bool:
        cfg = self.config
        bdseq = self._next_bdseq()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.group_id}-{self.edge_node_id}",
                             clean_session=True, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        client.will_set(topic(self.group_id, "NDEATH", self.edge_node_id), self._ndeath(bdseq), qos=1, retain=False)
        client.max_inflight_messages_set(self.window * 4)  # our own window is the real limit
        client.max_queued_messages_set(0)
        inbox = self._inbox
        client.on_connect = lambda c, _u, _f, rc, _p: inbox.put(("connack", c, rc))
        client.on_disconnect = lambda c, _u, _f, rc, _p: inbox.put(("disconnect", c, rc))
        client.on_publish = lambda c, _u, mid, _rc, _p: inbox.put(("puback", c, mid))
        client.on_message = lambda c, _u, msg: inbox.put(("message", c, msg.topic, msg.payload))
        where = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_ca:
                client.tls_set_context(tls_context(cfg))
            client.connect(cfg.host, cfg.port, keepalive=KEEPALIVE_S)
        except ssl.SSLCertVerificationError as exc:
            self._refused(f"MQTT broker {where}: its certificate is not trusted by the site's CA {cfg.tls_ca} "
                          f"({exc.verify_message}); nothing is published to it")
            return False
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._refused(f"MQTT broker {where}: cannot connect ({exc}); retrying with backoff up to "
                          f"{RECONNECT_BACKOFF_MAX_S:.0f} s, data is kept in the store-and-forward queue", logging.WARNING)
            return False
        s = _Session(client, bdseq)
        self._session = s
        self.connections += 1
        # paho's own network thread, which alone touches the TLS socket (an SSL object is not
        # thread-safe); with reconnect_on_failure off it ends with the connection, and we make a
        # new client (new will, new bdSeq) for the next one
        client.loop_start()
        return True

    def _refused(self, reason: str, level: int = logging.ERROR) -> None:
        if reason != self._refused_reason:  # one line per distinct reason, not one per retry
            log.log(level, "%s", reason)
            self._refused_reason = reason

    def _on_connack(self, client, rc) -> None:
        s = self._session
        if s is None or client is not s.client:
            return
        if rc.is_failure:
            self._refused(f"MQTT broker {self.config.host}:{self.config.port} refused the connection: {rc}")
            self._end_session(f"refused ({rc})")
            return
        self._refused_reason = ""
        s.connected = True
        g, e = self.group_id, self.edge_node_id
        client.subscribe(topic(g, "NCMD", e), qos=1)
        if self.config.commands:
            client.subscribe(topic(g, "DCMD", e) + "/+", qos=1)
        if self.config.primary_host_id:
            self.primary_online = False
            client.subscribe(f"{NAMESPACE}/STATE/{self.config.primary_host_id}", qos=1)
            log.info("MQTT connected to %s:%d; births wait for primary host '%s' online", self.config.host,
                     self.config.port, self.config.primary_host_id)
        else:
            log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
            self._send_births(s)

    def _end_session(self, why: str) -> None:
        s = self._session
        if s is None:
            return
        self._session = None
        try:
            s.client.disconnect()
            s.client.loop_stop()
        except Exception:  # noqa: BLE001 - the socket is gone anyway
            pass
        self.store.mark_historical()
        self.store.commit()
        if (s.live or s.connected) and not self._stopping.is_set():
            log.warning("MQTT session ended: %s; data goes to the store-and-forward queue (%d messages)", why,
                        self.store.count)

    def _on_message(self, client, topic_name: str, body: bytes) -> None:
        s = self._session
        if s is None or client is not s.client:
            return
        parts = topic_name.split("/")
        if len(parts) == 3 and parts[1] == "STATE":
            self._on_state(s, body)
            return
        if len(parts) < 4:
            return
        try:
            payload = Payload.FromString(body)
        except Exception:  # noqa: BLE001 - a malformed command: say so, do nothing
            log.warning("MQTT %s: not a Sparkplug B payload; ignored", topic_name)
            return
        self.commands_received += 1
        if parts[2] == "NCMD":
            for m in payload.metrics:
                if (m.name == REBIRTH or m.alias == self.catalogue.node[REBIRTH].alias) and m.boolean_value:
                    log.info("Sparkplug: NCMD Rebirth")
                    if s.live:
                        self._send_births(s)
        elif parts[2] == "DCMD" and len(parts) == 5 and self.config.commands:
            self._on_dcmd(parts[4], payload)

    def _on_state(self, s: _Session, body: bytes) -> None:
        try:
            state = json.loads(body)
            online = bool(state.get("online"))
        except (ValueError, AttributeError):
            log.warning("primary host STATE: not JSON {online, timestamp}; ignored")
            return
        if online and not s.live:
            self.primary_online = True
            self._send_births(s)
        elif not online and s.live:
            # Sparkplug 3.0: the edge node ends its session and waits for the host again
            self.primary_online = False
            s.client.publish(topic(self.group_id, "NDEATH", self.edge_node_id), self._ndeath(s.bdseq), qos=1)
            self._end_session(f"primary host '{self.config.primary_host_id}' offline")

    def _on_dcmd(self, device: str, payload) -> None:
        if self.commands is None or self.loop is None or device not in self.catalogue.devices:
            log.warning("DCMD for %s: no such device or no command service; ignored", device)
            return
        args = {}
        for m in payload.metrics:
            name = self.catalogue.name_of(device, m)
            if name is None or name not in DCMD_METRICS:
                log.warning("DCMD for %s: metric %s is no command; ignored", device, m.name or f"alias {m.alias}")
                continue
            args[name] = value_of(m)
        user, role = self.config.command_user, self.config.command_role
        svc = self.commands
        calls = []
        if "SwitchSource" in args:
            calls.append(("SwitchSource", svc.switch_source(device, args["SwitchSource"], user=user, role=role)))
        if "SetPreferredSource" in args:
            calls.append(("SetPreferredSource",
                          svc.set_preferred_source(device, args["SetPreferredSource"], user=user, role=role)))
        if "StartBridging/Power" in args or "StartBridging/Duration" in args:
            calls.append(("StartBridging", svc.start_bridging(device, args.get("StartBridging/Power"),
                                                             args.get("StartBridging/Duration"), user=user, role=role)))
        if args.get("StopBridging"):
            calls.append(("StopBridging", svc.stop_bridging(device, user=user, role=role)))
        for method, coro in calls:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            future.add_done_callback(lambda f, method=method: self._dcmd_done(device, method, f))

    @staticmethod
    def _dcmd_done(device: str, method: str, future) -> None:
        try:
            outcome = future.result()
            log.info("DCMD %s %s: %s", device, method, outcome.status_name)
        except Exception as exc:  # noqa: BLE001 - reported, the edge node goes on
            log.warning("DCMD %s %s failed: %s", device, method, exc)

    def _shutdown(self) -> None:
        """Graceful stop: NDEATH (Sparkplug 3.0: published before a clean disconnect), wait briefly for acks."""
        s = self._session
        if s is None:
            return
        if s.connected:
            info = s.client.publish(topic(self.group_id, "NDEATH", self.edge_node_id), self._ndeath(s.bdseq), qos=1)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and (s.inflight or not info.is_published()):
                self._drain(0.05)
                if self._session is None:
                    return
        self._end_session("gateway stopping")
