"""UADP frames both ways (scapy layers <-> the struct codec), frame security, the gate control list, and
the site file's TSN keys."""

from __future__ import annotations

import time

import pytest
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Padding

from siteconfig.loader import parse_site
from siteconfig.yamlpos import ConfigErrors
from tsnwire import uadp
from tsnwire.keys import generate_key_file
from tsnwire.schedule import BEST_EFFORT, COMMAND, TELEMETRY, GateControlList, Window
from tsnwire.security import SIGN, SIGN_AND_ENCRYPT, Dropped, Publisher, ReplayWindow, Subscriber

GW_MAC, DEV_MAC = bytes.fromhex("020000000101"), bytes.fromhex("020000000201")


@pytest.fixture
def key(tmp_path):
    return generate_key_file(tmp_path / "k.key", key_id=7)


def test_struct_codec_frame_dissects_in_scapy_to_the_same_fields(key):
    layout = uadp.telemetry_layout("ats")
    values = {n: (2 if t != "Double" else 4.25) for n, t in layout.fields}
    payload = uadp.encode_dataset_message(9, layout.pack(values))
    pub = Publisher(31, key, SIGN)
    frame = uadp.ethernet_header(DEV_MAC, GW_MAC, 10, 5) + pub.seal(uadp.TELEMETRY_WRITER_ID, payload)
    pkt = Ether(frame)
    assert pkt[Dot1Q].prio == 5 and pkt[Dot1Q].vlan == 10 and pkt[Dot1Q].type == uadp.ETH_P_UADP
    nm = pkt[uadp.UADPNetworkMessage]
    assert (nm.version, nm.publisher_id_type, nm.publisher_id, nm.writer_group_id, nm.group_version) == (
        1, 1, 31, uadp.WRITER_GROUP_ID, uadp.GROUP_VERSION)
    assert nm.sequence_number == 1 and nm.dataset_writer_ids == [uadp.TELEMETRY_WRITER_ID]
    assert (nm.signed, nm.encrypted, nm.security_token_id) == (1, 0, 7)
    assert nm.message_nonce[4:] == (1).to_bytes(4, "little")
    dsm = pkt[uadp.UADPDataSetMessage]
    assert dsm.dataset_sequence_number == 9 and dsm.field_encoding == 1
    fields = uadp.scapy_layer(layout)(dsm.data)
    assert fields.LoadPower == 4.25 and fields.TransferCount == 2 and fields.ActiveSource == 2
    assert len(pkt[Padding].load) == uadp.SIGNATURE_LEN


def test_scapy_built_frame_decodes_with_the_struct_codec(key):
    layout = uadp.COMMAND_LAYOUT
    fields = uadp.scapy_layer(layout)(RequestId=77, CommandCode=0x0101, Arg0=2.0, Arg1=0.0)
    ts = uadp.datetime_from_unix_ns(time.time_ns())
    nm = uadp.UADPNetworkMessage(publisher_id=1, sequence_number=5, dataset_writer_ids=[uadp.COMMAND_WRITER_ID],
                                 timestamp=ts, encrypted=0, security_token_id=7, message_nonce=b"abcd\x05\0\0\0")
    body = bytes(nm / uadp.UADPDataSetMessage(dataset_sequence_number=3, data=bytes(fields)))
    signed = body + Publisher(1, key, SIGN).seal(0, b"")[-32:]  # a wrong signature: the codec does not check it
    msg = uadp.decode_network_message(signed)
    assert (msg.publisher_id, msg.sequence_number, msg.dataset_writer_id, msg.timestamp) == (1, 5, 16, ts)
    assert msg.security_sequence == 5 and msg.security_token_id == 7
    seq, data = uadp.decode_dataset_message(msg.payload)
    assert seq == 3 and layout.unpack(data) == {"RequestId": 77, "CommandCode": 0x0101, "Arg0": 2.0, "Arg1": 0.0}
    assert uadp.command_args("ats", layout.unpack(data)) == ("SwitchSource", {"Target": 2.0})


def test_encrypted_frames_open_only_under_the_key_once_and_in_time(key, tmp_path):
    pub, sub = Publisher(31, key, SIGN_AND_ENCRYPT), Subscriber(key, SIGN_AND_ENCRYPT, max_age_ns=50_000_000)
    payload = uadp.encode_dataset_message(1, b"\x01\x02\x03\x04" * 8)
    sealed = pub.seal(uadp.TELEMETRY_WRITER_ID, payload)
    assert payload not in sealed  # encrypted on the wire
    assert sub.open(uadp.decode_network_message(sealed)) == payload
    with pytest.raises(Dropped) as exc:
        sub.open(uadp.decode_network_message(sealed))
    assert exc.value.reason == "replayed"
    flipped = bytearray(pub.seal(uadp.TELEMETRY_WRITER_ID, payload))
    flipped[-40] ^= 1
    other = generate_key_file(tmp_path / "other.key", key_id=7)
    cases = {"tampered": bytes(flipped),
             "late": pub.seal(uadp.TELEMETRY_WRITER_ID, payload, unix_ns=time.time_ns() - 10**9),
             "policy": Publisher(31, key, SIGN).seal(uadp.TELEMETRY_WRITER_ID, payload)}
    for reason, frame in cases.items():
        with pytest.raises(Dropped) as exc:
            sub.open(uadp.decode_network_message(frame))
        assert exc.value.reason == reason
    with pytest.raises(Dropped) as exc:
        sub.open(uadp.decode_network_message(Publisher(31, other).seal(1, payload)))
    assert exc.value.reason == "tampered"  # same key id, other key material: the signature fails


def test_replay_window_takes_late_but_new_numbers_and_refuses_old_ones():
    w = ReplayWindow(64)
    assert [w.accept(s) for s in (1, 2, 5, 3, 3, 70, 6, 7, 5)] == [True, True, True, True, False, True, False,
                                                                    True, False]


def test_gate_control_list_has_guard_band_before_each_window():
    gcl = GateControlList(1000, (Window(COMMAND, 6, 0, 200), Window(TELEMETRY, 5, 200, 300)), link_rate_mbps=100)
    guard = gcl.guard_band_ns
    assert guard == (1518 + 24) * 8 * 10  # 12.3 us per kB at 100 Mbit/s: 123.4 us
    assert gcl.entries() == [(0, 200_000, COMMAND), (200_000, 500_000, TELEMETRY),
                             (500_000, 1_000_000 - guard, BEST_EFFORT)]
    assert gcl.problems() == []
    bad = GateControlList(1000, (Window(COMMAND, 6, 0, 600), Window(TELEMETRY, 5, 500, 100)))
    assert "windows command and telemetry overlap" in bad.problems()


SITE = """
site: {{name: t, nominal_voltage_v: 415, frequency_hz: 60}}
gateway:
{gateway}
sources:
  - {{name: SourceA, rated_power_kw: 50, backup: ups, device: {device}}}
  - {{name: SourceB, rated_power_kw: 50, backup: generator, device: {{driver: modbus, profile: power_source_v1, port: 1502}}}}
aisles:
  - name: A1
    pdbs:
      - {{name: P-A, feed: SourceA, rated_current_a: 63, device: {{driver: modbus, profile: pdb_segment_v1, port: 1503}}}}
      - {{name: P-B, feed: SourceB, rated_current_a: 63, device: {{driver: modbus, profile: pdb_segment_v1, port: 1504}}}}
    units:
      - {{name: M1, position_ft: 6, rated_current_a: 40, preferred_source: SourceA, it_load_kw: 8,
          device: {{driver: modbus, profile: micro_ats_v1, port: 1505}}}}
"""
TSN_BLOCK = "  tsn: {interface: veth-gw, cycle_us: 1000, windows: [{class: command, pcp: 6, offset_us: 0, length_us: 200}]}"


def test_site_file_reads_tsn_devices_and_refuses_what_is_wrong(tmp_path):
    generate_key_file(tmp_path / "a.key")
    good = "{driver: tsn, profile: power_source_v1, mac: '02:00:00:00:02:01', vlan: 10, publisher_id: 11, key_file: a.key}"
    site = parse_site(SITE.format(gateway=TSN_BLOCK, device=good), base_dir=tmp_path)
    ep = site.sources[0].device
    assert (ep.mac, ep.vlan, ep.publisher_id, ep.key_file) == ("02:00:00:00:02:01", 10, 11, str(tmp_path / "a.key"))
    assert site.gateway.tsn.interface == "veth-gw" and site.gateway.tsn.windows[0].pcp == 6
    (tmp_path / "bad.key").write_text("{}")
    cases = [
        (TSN_BLOCK, good.replace("vlan: 10", "vlan: 4095"), "vlan"),
        (TSN_BLOCK, good.replace("a.key", "bad.key"), "no key_id"),
        (TSN_BLOCK, good.replace(", mac: '02:00:00:00:02:01'", ""), "mac: required key is missing"),
        ("  opcua: {port: 4840}", good, "driver tsn needs a gateway.tsn block"),
        (TSN_BLOCK.replace("length_us: 200", "length_us: 2000"), good, "past the 1000 us cycle"),
    ]
    for gateway, device, expected in cases:
        with pytest.raises(ConfigErrors) as exc:
            parse_site(SITE.format(gateway=gateway, device=device), base_dir=tmp_path)
        assert expected in str(exc.value), str(exc.value)
    with pytest.raises(ConfigErrors) as exc:
        parse_site(SITE.format(gateway=TSN_BLOCK, device="{driver: modbus, profile: power_source_v1, port: 1501, "
                               "mac: '02:00:00:00:02:01'}"), base_dir=tmp_path)
    assert "only used with driver tsn" in str(exc.value)
