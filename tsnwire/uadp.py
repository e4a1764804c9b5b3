"""OPC UA PubSub UADP NetworkMessages over Ethernet (OPC 10000-14, 7.2.4 and 7.3.4).

Two views of the same bytes:

* scapy layers (`UADPNetworkMessage`, `UADPDataSetMessage`, and one generated layer per DataSet
  layout) define the format field by field as Part 14 gives it, with every optional part
  selected by its flag; they dissect any frame we see and build frames in tests.
* `NetworkMessageCodec` is the hot path: the flags our publishers use are fixed, so the header is
  one precompiled `struct.Struct` and a DataSet is another. scapy takes ~150-300 us to build or
  dissect one frame, more than a 1 ms cycle can spend per frame; struct takes ~2 us. The tests
  check that both views agree, in both directions.

What our publishers send (all little-endian, as UADP is):
    UADPVersion/Flags 0xF1   version 1, PublisherId, GroupHeader, PayloadHeader, ExtendedFlags1
    ExtendedFlags1    0x31   PublisherId type UInt16, Security, Timestamp
    PublisherId       UInt16 the device's `publisher_id` (the gateway publishes as GATEWAY_PUBLISHER_ID)
    GroupFlags        0x0F   WriterGroupId, GroupVersion, NetworkMessageNumber, SequenceNumber
    WriterGroupId UInt16, GroupVersion UInt32, NetworkMessageNumber UInt16, SequenceNumber UInt16
    PayloadHeader     Count=1, DataSetWriterId UInt16 (which DataSet: telemetry, command or ack)
    Timestamp         DateTime (100 ns since 1601-01-01 UTC): the late-frame check
    SecurityHeader    SecurityFlags (signed | encrypted), SecurityTokenId (the key id),
                      NonceLength=8, MessageNonce (4 random bytes, UInt32 security sequence number)
    Payload           one DataSetMessage: DataSetFlags1 0x0B (valid, RawData, sequence number),
                      DataSetMessageSequenceNumber UInt16, then the fields, RawData-encoded
    Signature         32 bytes HMAC-SHA256 over everything before it
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from scapy.fields import (BitField, ConditionalField, Field, FieldLenField, FieldListField, LEIntField,
                          LELongField, LEShortField, LESignedIntField, LESignedLongField, MultipleTypeField,
                          ByteField, StrField, StrLenField, XLEShortField)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw, bind_layers

from siteconfig.points import COMMANDS, POINTS

ETH_P_UADP = 0xB62C  # OPC 10000-14, 7.3.4.2: the IEEE-assigned EtherType of UADP over Ethernet
ETH_P_8021Q = 0x8100  # IEEE 802.1Q tag protocol identifier
UADP_VERSION = 1  # OPC 10000-14, 7.2.4.4.2: UADPVersion
SIGNATURE_LEN = 32  # HMAC-SHA256 (PubSub-Aes256-CTR security policy, OPC 10000-14, 8.3)
MESSAGE_NONCE_LEN = 8  # OPC 10000-14, 7.2.4.4.3: 4 random bytes + 4-byte sequence number for AES-CTR

# SecurityFlags bits (OPC 10000-14, Table 141)
SECURITY_SIGNED = 0x01
SECURITY_ENCRYPTED = 0x02

GATEWAY_PUBLISHER_ID = 1  # the gateway's own PublisherId; devices' ids are in the site file
WRITER_GROUP_ID = 100  # one WriterGroup per publisher in this site
GROUP_VERSION = 1  # VersionTime of the DataSet layouts below: bump when a layout changes

# DataSetWriterIds: which DataSet a NetworkMessage carries
TELEMETRY_WRITER_ID = 1  # cyclic: the device's points (siteconfig.points.POINTS[kind])
COMMAND_WRITER_ID = 16  # gateway -> device: one command
ACK_WRITER_ID = 17  # device -> gateway: the command's outcome

# Command codes: the same codes as the register-map profiles' commands (drivers/profiles/*.yaml),
# plus ReadNow (publish telemetry now, out of the device's cycle).
COMMAND_CODES = {"ReadNow": 0x0001, "SwitchSource": 0x0101, "SetPreferredSource": 0x0102,
                 "StartBridging": 0x0201, "StopBridging": 0x0202}
COMMAND_NAMES = {code: name for name, code in COMMAND_CODES.items()}
MAX_COMMAND_ARGS = 2

# DateTime epoch offset: 100 ns intervals from 1601-01-01 to 1970-01-01 (OPC 10000-6, 5.2.2.5)
DATETIME_UNIX_EPOCH = 116444736000000000


def datetime_from_unix_ns(unix_ns: int) -> int:
    """OPC UA DateTime (100 ns ticks since 1601) of a Unix time in ns."""
    return DATETIME_UNIX_EPOCH + unix_ns // 100


def unix_ns_from_datetime(dt: int) -> int:
    return (dt - DATETIME_UNIX_EPOCH) * 100


# ---- DataSet layouts (DataSetMetaData in all but name: the fields, their order and types) ---------------
_RAW_FORMAT = {"Double": "d", "UInt32": "I", "Int32": "i", "Boolean": "?", "UInt16": "H", "Byte": "B"}


@dataclass(frozen=True)
class DataSetLayout:
    """The fields of one DataSet in RawData encoding (no per-field header: both ends know the layout)."""

    writer_id: int
    name: str
    fields: tuple[tuple[str, str], ...]  # (field name, OPC UA built-in type)

    @property
    def struct(self) -> struct.Struct:
        return _struct_of(self.fields)

    def pack(self, values: dict) -> bytes:
        return self.struct.pack(*(_coerce(values.get(n, 0), t) for n, t in self.fields))

    def unpack(self, data: bytes) -> dict:
        st = self.struct
        if len(data) != st.size:
            raise ValueError(f"{self.name}: {len(data)} bytes of fields, layout has {st.size}")
        return dict(zip((n for n, _ in self.fields), st.unpack(data)))


@lru_cache(maxsize=None)
def _struct_of(fields: tuple[tuple[str, str], ...]) -> struct.Struct:
    return struct.Struct("<" + "".join(_RAW_FORMAT[t] for _, t in fields))


def _coerce(value, ua_type: str):
    if ua_type == "Double":
        return float(value)
    if ua_type == "Boolean":
        return bool(value)
    return int(value)


def _ua_type(point_kind: str) -> str:
    if point_kind == "float":
        return "Double"
    if point_kind == "int":
        return "UInt32"
    if point_kind == "bool":
        return "Boolean"
    return "Int32"  # enumerations are Int32 in OPC UA (OPC 10000-3, 8.14)


@lru_cache(maxsize=None)
def telemetry_layout(device_kind: str) -> DataSetLayout:
    """The cyclic DataSet of a device kind: the same points as its Modbus profile, in POINTS order."""
    return DataSetLayout(TELEMETRY_WRITER_ID, f"{device_kind} telemetry",
                         tuple((p.name, _ua_type(p.kind)) for p in POINTS[device_kind]))


COMMAND_LAYOUT = DataSetLayout(COMMAND_WRITER_ID, "command", (
    ("RequestId", "UInt32"), ("CommandCode", "UInt16"), ("Arg0", "Double"), ("Arg1", "Double")))
ACK_LAYOUT = DataSetLayout(ACK_WRITER_ID, "acknowledgement", (
    ("RequestId", "UInt32"), ("CommandCode", "UInt16"), ("Result", "Byte"), ("Return", "Double")))


def command_fields(device_kind: str, command: str, request_id: int, args: dict) -> dict:
    """The command DataSet's fields; args in the order siteconfig.points.COMMANDS lists them."""
    names = ("ReadNow",) if command == "ReadNow" else COMMANDS[device_kind][command]
    values = {"RequestId": request_id, "CommandCode": COMMAND_CODES[command]}
    arg_names = () if command == "ReadNow" else names
    for k, name in enumerate(arg_names):
        values[f"Arg{k}"] = float(args[name])
    return values


def command_args(device_kind: str, fields: dict) -> tuple[str, dict]:
    """(command name, {arg name: value}) of a decoded command DataSet; KeyError if unknown."""
    name = COMMAND_NAMES[fields["CommandCode"]]
    if name == "ReadNow":
        return name, {}
    return name, {a: fields[f"Arg{k}"] for k, a in enumerate(COMMANDS[device_kind][name])}


# ---- the hot-path codec -------------------------------------------------------------------------------
FLAGS_OURS = 0xF1  # version 1 | PublisherId | GroupHeader | PayloadHeader | ExtendedFlags1
EXT_FLAGS1_OURS = 0x31  # PublisherId UInt16 | Security | Timestamp
GROUP_FLAGS_OURS = 0x0F
DATASET_FLAGS1_OURS = 0x0B  # valid | RawData | DataSetMessageSequenceNumber
_HEADER = struct.Struct("<BBHBHIHHBHq")
_SECURITY = struct.Struct("<BIB8s")
_DSM_HEADER = struct.Struct("<BH")
HEADER_LEN = _HEADER.size + _SECURITY.size  # bytes before the (possibly encrypted) payload


@dataclass(frozen=True)
class NetworkMessage:
    """The decoded header fields of one of our NetworkMessages (payload still raw)."""

    publisher_id: int
    writer_group_id: int
    group_version: int
    network_message_number: int
    sequence_number: int
    dataset_writer_id: int
    timestamp: int  # OPC UA DateTime
    security_flags: int
    security_token_id: int
    message_nonce: bytes
    header: bytes  # the bytes before the payload (signed, never encrypted)
    payload: bytes  # DataSetMessage bytes (encrypted when the flags say so)
    signature: bytes

    @property
    def security_sequence(self) -> int:
        """The UInt32 sequence number in the MessageNonce's last 4 bytes (the replay check's)."""
        return int.from_bytes(self.message_nonce[4:8], "little")


def encode_header(publisher_id: int, dataset_writer_id: int, sequence_number: int, timestamp: int,
                  security_flags: int, token_id: int, nonce: bytes, network_message_number: int = 1) -> bytes:
    """The NetworkMessage header and security header (everything the payload follows)."""
    return (_HEADER.pack(FLAGS_OURS, EXT_FLAGS1_OURS, publisher_id, GROUP_FLAGS_OURS, WRITER_GROUP_ID,
                         GROUP_VERSION, network_message_number, sequence_number & 0xFFFF, 1, dataset_writer_id,
                         timestamp)
            + _SECURITY.pack(security_flags, token_id, MESSAGE_NONCE_LEN, nonce))


def encode_dataset_message(dataset_sequence: int, fields: bytes) -> bytes:
    return _DSM_HEADER.pack(DATASET_FLAGS1_OURS, dataset_sequence & 0xFFFF) + fields


def decode_dataset_message(payload: bytes) -> tuple[int, bytes]:
    """(DataSetMessageSequenceNumber, field bytes) of a plain DataSetMessage we publish."""
    if len(payload) < _DSM_HEADER.size:
        raise ValueError("DataSetMessage shorter than its header")
    flags1, seq = _DSM_HEADER.unpack_from(payload)
    if flags1 != DATASET_FLAGS1_OURS:
        raise ValueError(f"DataSetFlags1 0x{flags1:02x} not supported (expected 0x{DATASET_FLAGS1_OURS:02x})")
    return seq, payload[_DSM_HEADER.size:]


def decode_network_message(data: bytes) -> NetworkMessage:
    """Split one UADP NetworkMessage (the Ethernet payload) into header fields, payload and signature.

    Raises ValueError for anything not laid out as our publishers lay it out.
    """
    if len(data) < HEADER_LEN + _DSM_HEADER.size:
        raise ValueError(f"NetworkMessage of {len(data)} bytes is shorter than its headers")
    (flags, ext1, publisher_id, group_flags, wg_id, group_version, nm_number, seq, count, ds_writer_id,
     timestamp) = _HEADER.unpack_from(data)
    if flags & 0x0F != UADP_VERSION:
        raise ValueError(f"UADP version {flags & 0x0F} (expected {UADP_VERSION})")
    if (flags, ext1, group_flags, count) != (FLAGS_OURS, EXT_FLAGS1_OURS, GROUP_FLAGS_OURS, 1):
        raise ValueError(f"header flags 0x{flags:02x}/0x{ext1:02x}/0x{group_flags:02x} count {count} not ours")
    sec_flags, token_id, nonce_len, nonce = _SECURITY.unpack_from(data, _HEADER.size)
    if nonce_len != MESSAGE_NONCE_LEN:
        raise ValueError(f"NonceLength {nonce_len} (expected {MESSAGE_NONCE_LEN})")
    if sec_flags & SECURITY_SIGNED:
        if len(data) < HEADER_LEN + SIGNATURE_LEN:
            raise ValueError("signed NetworkMessage shorter than its signature")
        payload, signature = data[HEADER_LEN:-SIGNATURE_LEN], data[-SIGNATURE_LEN:]
    else:
        payload, signature = data[HEADER_LEN:], b""
    return NetworkMessage(publisher_id, wg_id, group_version, nm_number, seq, ds_writer_id, timestamp,
                          sec_flags, token_id, nonce, data[:HEADER_LEN], payload, signature)


def ethernet_header(dst_mac: bytes, src_mac: bytes, vlan_id: int, pcp: int) -> bytes:
    """Destination, source, 802.1Q tag (PCP, DEI 0, VLAN id) and the UADP EtherType."""
    tci = (pcp & 0x7) << 13 | (vlan_id & 0xFFF)
    return dst_mac + src_mac + struct.pack("!HHH", ETH_P_8021Q, tci, ETH_P_UADP)


def mac_bytes(mac: str) -> bytes:
    """b'\\x02...' of '02:00:00:00:00:01'; ValueError if it is not six hex octets."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# ---- scapy layers ----------------------------------------------------------------------------------------
class LEDoubleField(Field):
    """IEEE 754 binary64, little-endian (OPC UA Double)."""

    def __init__(self, name: str, default: float):
        Field.__init__(self, name, default, "<d")


def _ext1(p) -> bool:
    return bool(p.ext_flags1_enabled)


class UADPNetworkMessage(Packet):
    """UADP NetworkMessage header (OPC 10000-14, 7.2.4.4.2), group and payload headers, timestamp and
    security header; the payload (DataSetMessages, or ciphertext) follows, the signature is padding."""

    name = "UADP NetworkMessage"
    fields_desc = [
        # UADPVersion/Flags, bit 7 first
        BitField("ext_flags1_enabled", 1, 1),
        BitField("payload_header_enabled", 1, 1),
        BitField("group_header_enabled", 1, 1),
        BitField("publisher_id_enabled", 1, 1),
        BitField("version", UADP_VERSION, 4),
        # ExtendedFlags1
        ConditionalField(BitField("ext_flags2_enabled", 0, 1), _ext1),
        ConditionalField(BitField("picoseconds_enabled", 0, 1), _ext1),
        ConditionalField(BitField("timestamp_enabled", 1, 1), _ext1),
        ConditionalField(BitField("security_enabled", 1, 1), _ext1),
        ConditionalField(BitField("dataset_class_id_enabled", 0, 1), _ext1),
        ConditionalField(BitField("publisher_id_type", 1, 3), _ext1),  # 0 Byte, 1 UInt16, 2 UInt32, 3 UInt64
        # ExtendedFlags2
        ConditionalField(BitField("ext2_reserved", 0, 3), lambda p: _ext1(p) and p.ext_flags2_enabled),
        ConditionalField(BitField("network_message_type", 0, 3), lambda p: _ext1(p) and p.ext_flags2_enabled),
        ConditionalField(BitField("promoted_fields_enabled", 0, 1), lambda p: _ext1(p) and p.ext_flags2_enabled),
        ConditionalField(BitField("chunk", 0, 1), lambda p: _ext1(p) and p.ext_flags2_enabled),
        ConditionalField(MultipleTypeField([
            (ByteField("publisher_id", 0), lambda p: _ext1(p) and p.publisher_id_type == 0),
            (LEIntField("publisher_id", 0), lambda p: _ext1(p) and p.publisher_id_type == 2),
            (LELongField("publisher_id", 0), lambda p: _ext1(p) and p.publisher_id_type == 3),
        ], LEShortField("publisher_id", 0)), lambda p: p.publisher_id_enabled),
        ConditionalField(StrLenField("dataset_class_id", b"\0" * 16, length_from=lambda p: 16),
                         lambda p: _ext1(p) and p.dataset_class_id_enabled),
        # GroupHeader (7.2.4.4.2 Table 135)
        ConditionalField(BitField("group_reserved", 0, 4), lambda p: p.group_header_enabled),
        ConditionalField(BitField("sequence_number_enabled", 1, 1), lambda p: p.group_header_enabled),
        ConditionalField(BitField("network_message_number_enabled", 1, 1), lambda p: p.group_header_enabled),
        ConditionalField(BitField("group_version_enabled", 1, 1), lambda p: p.group_header_enabled),
        ConditionalField(BitField("writer_group_id_enabled", 1, 1), lambda p: p.group_header_enabled),
        ConditionalField(LEShortField("writer_group_id", WRITER_GROUP_ID),
                         lambda p: p.group_header_enabled and p.writer_group_id_enabled),
        ConditionalField(LEIntField("group_version", GROUP_VERSION),
                         lambda p: p.group_header_enabled and p.group_version_enabled),
        ConditionalField(LEShortField("network_message_number", 1),
                         lambda p: p.group_header_enabled and p.network_message_number_enabled),
        ConditionalField(LEShortField("sequence_number", 0),
                         lambda p: p.group_header_enabled and p.sequence_number_enabled),
        # PayloadHeader
        ConditionalField(FieldLenField("count", None, count_of="dataset_writer_ids", fmt="B"),
                         lambda p: p.payload_header_enabled),
        ConditionalField(FieldListField("dataset_writer_ids", [], XLEShortField("", 0), count_from=lambda p: p.count),
                         lambda p: p.payload_header_enabled),
        # Extended NetworkMessage header
        ConditionalField(LESignedLongField("timestamp", 0), lambda p: _ext1(p) and p.timestamp_enabled),
        ConditionalField(LEShortField("picoseconds", 0), lambda p: _ext1(p) and p.picoseconds_enabled),
        # Security header (7.2.4.4.3)
        ConditionalField(BitField("security_reserved", 0, 4), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(BitField("force_key_reset", 0, 1), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(BitField("security_footer_enabled", 0, 1), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(BitField("encrypted", 1, 1), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(BitField("signed", 1, 1), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(LEIntField("security_token_id", 1), lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(FieldLenField("nonce_length", None, length_of="message_nonce", fmt="B"),
                         lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(StrLenField("message_nonce", b"", length_from=lambda p: p.nonce_length),
                         lambda p: _ext1(p) and p.security_enabled),
        ConditionalField(LEShortField("security_footer_size", 0),
                         lambda p: _ext1(p) and p.security_enabled and p.security_footer_enabled),
        # Payload: Sizes when there is more than one DataSetMessage (and it is not encrypted)
        ConditionalField(FieldListField("sizes", [], LEShortField("", 0), count_from=lambda p: p.count),
                         lambda p: p.payload_header_enabled and (p.count or 0) > 1 and not _is_encrypted(p)),
    ]

    def extract_padding(self, s: bytes):
        """The signature trails the payload: keep it out of the DataSetMessages (it becomes Padding)."""
        if _ext1(self) and self.security_enabled and self.signed and len(s) >= SIGNATURE_LEN:
            return s[:-SIGNATURE_LEN], s[-SIGNATURE_LEN:]
        return s, b""

    def guess_payload_class(self, payload: bytes):
        return Raw if _is_encrypted(self) else UADPDataSetMessage


def _is_encrypted(p) -> bool:
    return bool(_ext1(p) and p.security_enabled and p.encrypted)


def _dsm_flags2(p) -> bool:
    return bool(p.flags2_enabled)


class UADPDataSetMessage(Packet):
    """DataSetMessage header (OPC 10000-14, 7.2.4.5.4); the RawData fields follow as `data`."""

    name = "UADP DataSetMessage"
    fields_desc = [
        BitField("flags2_enabled", 0, 1),
        BitField("config_minor_enabled", 0, 1),
        BitField("config_major_enabled", 0, 1),
        BitField("status_enabled", 0, 1),
        BitField("sequence_number_enabled", 1, 1),
        BitField("field_encoding", 1, 2),  # 0 Variant, 1 RawData, 2 DataValue
        BitField("valid", 1, 1),
        ConditionalField(BitField("flags2_reserved", 0, 2), _dsm_flags2),
        ConditionalField(BitField("picoseconds_enabled", 0, 1), _dsm_flags2),
        ConditionalField(BitField("timestamp_enabled", 0, 1), _dsm_flags2),
        ConditionalField(BitField("message_type", 0, 4), _dsm_flags2),  # 0 key frame, 1 delta, 2 event, 3 keep-alive
        ConditionalField(LEShortField("dataset_sequence_number", 0), lambda p: p.sequence_number_enabled),
        ConditionalField(LESignedLongField("timestamp", 0), lambda p: _dsm_flags2(p) and p.timestamp_enabled),
        ConditionalField(LEShortField("picoseconds", 0), lambda p: _dsm_flags2(p) and p.picoseconds_enabled),
        ConditionalField(LEShortField("status", 0), lambda p: p.status_enabled),
        ConditionalField(LEIntField("config_major_version", 0), lambda p: p.config_major_enabled),
        ConditionalField(LEIntField("config_minor_version", 0), lambda p: p.config_minor_enabled),
        StrField("data", b""),
    ]


_SCAPY_FIELD = {"Double": LEDoubleField, "UInt32": LEIntField, "Int32": LESignedIntField,
                "UInt16": LEShortField, "Byte": ByteField}


@lru_cache(maxsize=None)
def scapy_layer(layout: DataSetLayout) -> type[Packet]:
    """A scapy layer whose fields are the layout's (RawData: the DataSetMessage's `data` bytes)."""
    fields = []
    for name, ua_type in layout.fields:
        if ua_type == "Boolean":
            fields.append(ByteField(name, 0))
        else:
            fields.append(_SCAPY_FIELD[ua_type](name, 0))
    cls_name = "UADPFields_" + "".join(c if c.isalnum() else "_" for c in layout.name)
    return type(cls_name, (Packet,), {"name": f"UADP {layout.name} fields", "fields_desc": fields})


bind_layers(Dot1Q, UADPNetworkMessage, type=ETH_P_UADP)
bind_layers(Ether, UADPNetworkMessage, type=ETH_P_UADP)
