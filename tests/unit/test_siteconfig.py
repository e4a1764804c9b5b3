"""Site files: the YAML toolkit, the loader's validation, the demo/generator, and `cmcs config`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers import base as drivers_base
from siteconfig.demo import demo_site, generate_site, site_to_yaml
from siteconfig.loader import load_site, parse_site
from siteconfig.model import (DeviceEndpoint, GatewayConfig, MetricsConfig, MqttConfig, OpcUaConfig, SourceSelection,
                              TsnConfig, TsnWindowConfig)
from siteconfig.yamlpos import ConfigError, ConfigErrors, ErrorCollector, read_document

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "sites"
BAD_FIXTURES = sorted(p for p in FIXTURES.glob("*.yaml") if "# expect:" in p.read_text())


def expected_errors(fixture: Path) -> list[tuple[int, str, str]]:
    """(line, key, message start) from the fixture's `# expect: LINE KEY: MESSAGE` comments."""
    found = re.findall(r"^# expect: (\d+) (\S+): (.+)$", fixture.read_text(), re.MULTILINE)
    return [(int(line), key, message) for line, key, message in found]


def cmcs(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def errors_of(text: str, **kwargs) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as caught:
        parse_site(text, "t.yaml", profiles_dir=None, **kwargs)
    return caught.value.errors


SMALL = (FIXTURES / "small.yaml").read_text()


# --- the YAML toolkit -------------------------------------------------------------------------

def test_config_error_is_one_line_naming_file_line_and_key():
    error = ConfigError("site.yaml", 12, "aisles[0].units[2].rated_current_a", "must be > 0, got -1")
    assert str(error) == "site.yaml:12: aisles[0].units[2].rated_current_a: must be > 0, got -1"
    both = ConfigErrors([error, ConfigError("site.yaml", None, None, "cannot read file")])
    assert str(both).splitlines() == [str(error), "site.yaml: cannot read file"]


def read(text: str):
    errors = ErrorCollector("f.yaml")
    return read_document(text, errors), errors


def test_typed_readers_report_type_and_range_with_lines():
    top, errors = read("a: 1.5\nb: true\nc: '7'\nd: 300\ne: .nan\nf: 4\n")
    assert top.integer("a") is None  # a float is not an integer
    assert top.number("b") is None  # a boolean is not a number
    assert top.number("c") is None  # nor is a quoted string
    assert top.integer("d", le=247) is None
    assert top.number("e") is None
    assert top.number("f", gt=0) == 4.0 and isinstance(top.number("f"), float)
    assert top.number("missing", 2.5) == 2.5
    assert top.string("absent") is None
    assert [(e.line, e.key) for e in errors.errors] == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e"), (1, "absent")]
    assert "expected an integer, got number 1.5" in errors.errors[0].message
    assert "must be <= 247, got 300" in errors.errors[3].message
    assert errors.errors[-1].message == "required key is missing"


def test_unknown_and_duplicate_keys_are_reported_with_a_suggestion():
    top, errors = read("port: 1\nunit_idd: 2\nport: 3\n")
    top.reject_unknown(["port", "unit_id"])
    assert [str(e) for e in errors.errors] == [
        "f.yaml:3: port: duplicate key (first at line 1)",
        "f.yaml:2: unit_idd: unknown key (did you mean 'unit_id'?)",
    ]


def test_merge_keys_are_resolved_and_own_keys_win():
    top, errors = read("base: &b {host: h1, port: 1}\ndev:\n  <<: *b\n  port: 2\n")
    dev = top.mapping("dev")
    assert (dev.string("host"), dev.integer("port")) == ("h1", 2)
    assert errors.errors == []


def test_choice_suggests_the_closest_value():
    top, errors = read("driver: modbsu\n")
    assert top.choice("driver", ["modbus", "tsn"]) is None
    assert errors.errors[0].message == "must be one of modbus, tsn, got 'modbsu' (did you mean 'modbus'?)"


# --- the demo and the generator ---------------------------------------------------------------

def test_demo_site_round_trips_through_its_yaml(tmp_path):
    site = demo_site()
    path = tmp_path / "demo.yaml"
    path.write_text(site_to_yaml(site))
    loaded = load_site(path, profiles_dir=None)
    assert loaded.path == str(path)
    assert dataclasses.replace(loaded, path=None) == site


def test_non_default_gateway_and_device_settings_round_trip():
    site = demo_site()
    source_a = dataclasses.replace(site.sources[0], device=DeviceEndpoint(
        driver="modbus-tls", profile="power_source_v1", host="10.0.0.5", port=802, unit_id=0, scan_group="fast",
        tls_cert="pki/client.pem", tls_key="pki/client.key", tls_ca="pki/ca.pem"))
    site = dataclasses.replace(
        site, sources=(source_a, site.sources[1]),
        gateway=GatewayConfig(opcua=OpcUaConfig(port=4841, allow_security_none=True), scan_groups_s={"fast": 0.2, "normal": 2.0},
                              stale_time_s=5.5, dwell_time_s=0, derating=1.0))
    assert parse_site(site_to_yaml(site), profiles_dir=None) == site


NAMES = st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True)
PATHS = st.from_regex(r"[a-z]{1,8}/[a-z]{1,8}\.pem", fullmatch=True)
HALF_MS = st.integers(1, 4000).map(lambda n: n / 2)  # whole and fractional numbers, both written back exactly


@st.composite
def optional_gateway_blocks(draw):
    """gateway.metrics, gateway.mqtt and gateway.tsn, each absent or with any of its optional keys set."""
    metrics = draw(st.none() | st.builds(
        lambda tls, auth, port: MetricsConfig(
            host="0.0.0.0", port=port, tls_cert="m/cert.pem" if tls else None, tls_key="m/key.pem" if tls else None,
            basic_auth_user="prom" if auth else None,
            basic_auth_password_hash="scrypt$16384$8$1$c2FsdA==$a2V5" if auth else None),
        st.booleans(), st.booleans(), st.integers(1, 65535)))
    mqtt = None
    if draw(st.booleans()):
        tls = draw(st.booleans())
        mqtt = MqttConfig(
            host=draw(NAMES), port=draw(st.integers(1, 65535)),
            tls_ca=draw(PATHS) if tls else None, tls_cert=draw(PATHS) if tls else None,
            tls_key=draw(PATHS) if tls else None, insecure=not tls or draw(st.booleans()),
            group_id=draw(NAMES), edge_node_id=draw(st.none() | NAMES), primary_host_id=draw(st.none() | NAMES),
            store_forward_mb=draw(HALF_MS), commands=draw(st.booleans()), command_user=draw(NAMES),
            command_role=draw(st.sampled_from(["Viewer", "Operator", "Engineer", "Admin"])))
    tsn = None
    if draw(st.booleans()):
        command_us, telemetry_us = draw(HALF_MS), draw(HALF_MS)
        tsn = TsnConfig(
            interface=draw(st.from_regex(r"[a-z0-9-]{1,15}", fullmatch=True)),
            cycle_us=command_us + telemetry_us + draw(st.sampled_from([0.0, 0.5, 300.0])),
            windows=(TsnWindowConfig("command", draw(st.integers(0, 7)), 0.0, command_us),
                     TsnWindowConfig("telemetry", draw(st.integers(0, 7)), command_us, telemetry_us)),
            base_time_ns=draw(st.integers(0, 2**62)), link_rate_mbps=draw(HALF_MS),
            best_effort_pcp=draw(st.integers(0, 7)), security=draw(st.sampled_from(["sign_and_encrypt", "sign"])),
            max_frame_age_ms=draw(HALF_MS), realtime_priority=draw(st.integers(0, 99)))
    return metrics, mqtt, tsn


def _as_tsn(endpoint: DeviceEndpoint, k: int) -> DeviceEndpoint:
    return dataclasses.replace(endpoint, driver="tsn", port=0, mac=f"02:00:00:00:{k // 256:02x}:{k % 256:02x}",
                               vlan=100 + k % 3, publisher_id=10 + k, key_file=f"keys/dev{k % 2}.key")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=optional_gateway_blocks(), log_summary_s=st.sampled_from([60.0, 0.0, 12.5]),
       storage_on=st.lists(st.booleans(), min_size=3, max_size=3))
def test_every_optional_key_round_trips_through_site_to_yaml(blocks, log_summary_s, storage_on):
    """site_to_yaml writes everything the loader reads: metrics, mqtt and tsn blocks, log_summary_s and the
    TSN device keys; parse_site(site_to_yaml(site)) gives back the same site."""
    metrics, mqtt, tsn = blocks
    site = generate_site(1, 3, name="prop-hall")
    units = []
    for k, (unit, with_storage) in enumerate(zip(site.aisles[0].units, storage_on)):
        device = _as_tsn(unit.device, k) if tsn is not None else unit.device  # tsn devices need gateway.tsn
        units.append(dataclasses.replace(unit, device=device, storage=unit.storage if with_storage else None))
    aisle = dataclasses.replace(site.aisles[0], units=tuple(units))
    site = dataclasses.replace(site, aisles=(aisle,), gateway=GatewayConfig(
        opcua=OpcUaConfig(host="10.0.0.1", port=4841, path="/x", allow_security_none=True, allow_anonymous=False),
        metrics=metrics, log_summary_s=log_summary_s, mqtt=mqtt, tsn=tsn))
    assert parse_site(site_to_yaml(site), profiles_dir=None) == site


def test_a_site_with_mqtt_metrics_and_tsn_devices_round_trips_through_a_file(tmp_path):
    """load_site of the written file: the key file is checked and resolved (absolute), every block comes back."""
    from tsnwire.keys import generate_key_file

    key_file = tmp_path / "keys" / "hall.key"
    key_file.parent.mkdir()
    generate_key_file(key_file)
    site = demo_site()
    units = tuple(dataclasses.replace(u, device=dataclasses.replace(_as_tsn(u.device, k), key_file=str(key_file)))
                  for k, u in enumerate(site.aisles[0].units))
    site = dataclasses.replace(site, aisles=(dataclasses.replace(site.aisles[0], units=units), *site.aisles[1:]),
                               gateway=GatewayConfig(
                                   metrics=MetricsConfig(port=9465, basic_auth_user="prom",
                                                         basic_auth_password_hash="scrypt$16384$8$1$c2FsdA==$a2V5"),
                                   log_summary_s=0.0,
                                   mqtt=MqttConfig(port=1884, insecure=True, edge_node_id="hall1", primary_host_id="scada",
                                                   store_forward_mb=64, commands=True, command_user="bms",
                                                   command_role="Engineer"),
                                   tsn=TsnConfig(interface="veth-gw", security="sign", realtime_priority=80)))
    path = tmp_path / "site.yaml"
    path.write_text(site_to_yaml(site))
    assert dataclasses.replace(load_site(path, profiles_dir=None), path=None) == site


def test_demo_site_follows_the_documented_layout():
    site = demo_site()
    assert (site.name, site.nominal_voltage_v, site.frequency_hz) == ("demo-hall", 415.0, 60.0)
    assert [(s.name, s.backup, s.rated_power_kw, s.device.port, s.device.unit_id) for s in site.sources] == [
        ("SourceA", "ups", 300.0, 15020, 1), ("SourceB", "generator", 300.0, 15020, 2)]
    assert [len(a.units) for a in site.aisles] == [6, 6, 6, 6] and len(site.storages) == 24
    aisle3 = site.aisles[2]
    assert [(p.name, p.feed, p.rated_current_a, p.joints_per_phase, p.device.port, p.device.unit_id)
            for p in aisle3.pdbs] == [("PDB-03-A", SourceSelection.SOURCE_A, 125.0, 4, 15023, 1),
                                      ("PDB-03-B", SourceSelection.SOURCE_B, 125.0, 4, 15023, 2)]
    assert [u.position_ft for u in aisle3.units] == [6, 18, 30, 42, 54, 66]
    assert [u.preferred_source.name for u in aisle3.units[:3]] == ["SOURCE_A", "SOURCE_B", "SOURCE_A"]
    assert [u.dual_corded_fraction for u in aisle3.units[:4]] == [0.0, 0.5, 0.25, 0.0]
    assert [(u.name, u.device.unit_id, u.storage.name, u.storage.device.unit_id) for u in aisle3.units[-1:]] == [
        ("MATS-03-06", 16, "DES-03-06", 106)]
    assert [(s.capacity_kwh, s.max_power_kw) for s in site.storages[:3]] == [(5, 10), (7.5, 15), (10, 15)]
    loads = [u.it_load_kw for u in site.units]
    assert 6 <= min(loads) and max(loads) <= 11 and len(set(loads)) > 3
    assert sum(loads) == pytest.approx(204, abs=5)
    assert {u.transfer_time_ms for u in site.units} <= {3.0, 3.3, 3.6, 3.9, 4.2}
    assert len({(d.host, d.port, d.unit_id) for _, _, d in site.devices()}) == len(site.devices()) == 58


def test_generated_20x50_site_validates_from_a_file(tmp_path):
    site = generate_site(20, 50)
    path = tmp_path / "big.yaml"
    path.write_text(site_to_yaml(site))
    loaded = load_site(path, profiles_dir=None)
    assert loaded.name == "site-20x50"
    assert len(loaded.units) == 1000 and len(loaded.pdbs) == 40 and len(loaded.storages) == 1000
    hall_load_kw = sum(u.it_load_kw for u in loaded.units)
    assert 0.6 <= hall_load_kw / loaded.sources[0].rated_power_kw <= 0.7  # like the demo's 204/300
    assert loaded.pdbs[0].rated_current_a >= 125 * 50 / 6
    assert dataclasses.replace(loaded, path=None) == site


@pytest.mark.parametrize("aisles, units", [(0, 6), (4, 0), (4, 91)])
def test_generator_refuses_sizes_it_cannot_address(aisles, units):
    with pytest.raises(ValueError):
        generate_site(aisles, units)


# --- the loader -------------------------------------------------------------------------------

def test_small_fixture_loads_with_defaults_filled_in():
    site = load_site(FIXTURES / "small.yaml", profiles_dir=None)
    first, second = site.units
    assert (first.dual_corded_fraction, first.transfer_time_ms) == (0.0, 4.0)
    assert (second.dual_corded_fraction, second.transfer_time_ms) == (0.5, 3.2)
    assert (first.storage.soc_min_pct, first.storage.soc_max_pct) == (10.0, 90.0)
    assert first.device == DeviceEndpoint(driver="modbus", profile="micro_ats_v1", host="127.0.0.1", port=15021,
                                          unit_id=11, scan_group="normal")
    assert site.pdbs[0].joints_per_phase == 4 and site.gateway == GatewayConfig()


@pytest.mark.parametrize("fixture", BAD_FIXTURES, ids=lambda p: p.stem)
def test_bad_fixture_reports_exactly_its_errors(fixture):
    expected = expected_errors(fixture)
    assert expected, "a bad fixture must say what it expects"
    with pytest.raises(ConfigErrors) as caught:
        load_site(fixture, profiles_dir=None)
    found = caught.value.errors
    assert [(e.file, e.line, e.key) for e in found] == [(str(fixture), line, key) for line, key, _ in expected]
    for error, (_, _, message) in zip(found, expected):
        assert error.message.startswith(message)


@pytest.mark.parametrize("fixture", BAD_FIXTURES, ids=lambda p: p.stem)
def test_config_check_cli_prints_error_lines_and_exits_1(fixture):
    relative = fixture.relative_to(REPO)
    result = cmcs("config", "check", relative)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    for line, key, message in expected_errors(fixture):
        assert f"{relative}:{line}: {key}: {message}" in result.stderr


def test_config_check_cli_accepts_a_generated_demo_file(tmp_path):
    path = tmp_path / "demo.yaml"
    generated = cmcs("config", "generate", "--output", path)
    assert generated.returncode == 0, generated.stderr
    result = cmcs("config", "check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{path}: OK: site 'demo-hall': 2 sources, 4 aisles, 24 micro-ATS, 24 DES, "
                                     "8 PDB segments, 58 devices")


@pytest.mark.parametrize("content, message", [
    (None, "cannot read file"),
    ("dir", "is a directory"),
    ("", "the file is empty"),
    ("- just\n- a list\n", "expected a mapping"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_config_check_cli_unusable_files_give_one_line(tmp_path, content, message):
    path = tmp_path / "site.yaml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = cmcs("config", "check", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(str(path)) and message in result.stderr


@pytest.mark.parametrize("args", [["--units-per-aisle", "91"], ["--aisles", "0"], ["--name", "two words"]])
def test_config_generate_cli_bad_numbers_give_one_line_and_exit_2(args):
    result = cmcs("config", "generate", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_and_misspelt_sections_are_all_reported():
    text = SMALL.replace("sources:", "source:")
    found = [(e.line, e.key, e.message) for e in errors_of(text)]
    assert (8, "source", "unknown key (did you mean 'sources'?)") in found
    assert (2, "sources", "required key is missing") in found


def test_a_second_pdb_on_one_feed_is_reported_at_its_feed():
    text = SMALL.replace("{name: PDB-01-B, feed: SourceB", "{name: PDB-01-B, feed: SourceA")
    # Both are true: A is fed twice and B not at all (sorted by line: the list first).
    assert [(e.line, e.key) for e in errors_of(text)] == [(19, "aisles[0].pdbs"), (21, "aisles[0].pdbs[1].feed")]


def test_sources_must_be_a_then_b_and_exactly_two():
    swapped = SMALL.replace("name: SourceA", "name: SourceX")
    assert [(e.line, e.key) for e in errors_of(swapped)] == [(9, "sources[0].name")]
    one_source = SMALL.replace("  - name: SourceB\n    rated_power_kw: 50\n    backup: generator\n"
                               "    device: {port: 15020, unit_id: 2, profile: power_source_v1}\n", "")
    assert [(e.line, e.key, e.message) for e in errors_of(one_source)] == [
        (8, "sources", "expected exactly 2 sources (SourceA, SourceB), got 1")]


def test_defaults_device_is_merged_and_a_bad_default_is_reported_once():
    site = parse_site(SMALL.replace("{host: 127.0.0.1, driver: modbus}", "{host: 10.1.1.1, driver: modbus}"),
                      profiles_dir=None)
    assert {(d.host, d.driver) for _, _, d in site.devices()} == {("10.1.1.1", "modbus")}
    found = errors_of(SMALL.replace("driver: modbus}", "driver: modbsu}"))
    assert [(e.line, e.key) for e in found] == [(7, "defaults.device.driver")]


def test_a_driver_this_version_does_not_build_is_refused_once_never_skipped(monkeypatch):
    # A value of docs/interface.md with no driver registered for it (every one is built now: tsn is
    # unregistered here to stand for one): every device inherits it from the defaults, and the file
    # gets one error, at the default.
    monkeypatch.delitem(drivers_base._REGISTRY, "tsn")
    found = errors_of(SMALL.replace("driver: modbus}", "driver: tsn}"))
    assert [(e.line, e.key, e.message.split(" (")[0]) for e in found] == [
        (7, "defaults.device.driver", "driver tsn is not built in this version")]
    found = errors_of(SMALL.replace("driver: modbus}", "driver: sim}"))  # the old placeholder is gone
    assert [(e.line, e.key) for e in found] == [(7, "defaults.device.driver")]
    assert found[0].message.startswith("must be one of modbus, modbus-tls")


def test_profiles_are_checked_only_when_the_profile_folder_has_any(tmp_path):
    text = SMALL.replace("profile: des_v1", "profile: des_v2")
    assert parse_site(text, profiles_dir=tmp_path).storages[0].device.profile == "des_v2"  # empty folder: no check
    for name in ("power_source_v1", "pdb_segment_v1", "micro_ats_v1", "des_v1"):
        (tmp_path / f"{name}.yaml").write_text("registers: []\n")
    parse_site(SMALL, profiles_dir=tmp_path)
    with pytest.raises(ConfigErrors) as caught:
        parse_site(text, "t.yaml", profiles_dir=tmp_path)
    assert [str(e) for e in caught.value.errors] == [
        "t.yaml:33: aisles[0].units[0].storage.device.profile: no register-map profile 'des_v2' in "
        "drivers/profiles/ (did you mean 'des_v1'?)"]


def test_a_key_missing_from_a_block_mapping_is_reported_at_the_mapping_key():
    # A block mapping's own node starts on the line after `device:`; people look for the key.
    text = SMALL.replace("        device: {port: 15021, unit_id: 12, profile: micro_ats_v1}",
                         "        device:\n          port: 15021\n          unit_id: 12")
    assert [str(e) for e in errors_of(text)] == ["t.yaml:41: aisles[0].units[1].device.profile: required key is missing"]


def test_relocated_ports_are_below_the_ephemeral_range_and_distinct():
    """Ports given to test and benchmark servers come from below the kernel's ephemeral range, so that no
    outgoing connection opened before the server binds can hold one (a CI run failed with "address already in
    use" on a kernel-picked port); each distinct device address gets its own port."""
    from siteconfig.demo import bind_free_port, demo_site, relocate_site

    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        ephemeral_low = int(f.read().split()[0])
    site = demo_site()
    endpoints = {(u.device.host, u.device.port) for u in site.units} | {(p.device.host, p.device.port) for p in site.pdbs}
    moved = relocate_site(site)
    ports = [u.device.port for u in moved.units] + [p.device.port for p in moved.pdbs]
    assert all(10000 <= port < ephemeral_low for port in ports)
    assert len(set(ports)) == len(endpoints)
    probe = bind_free_port()
    try:
        assert 10000 <= probe.getsockname()[1] < ephemeral_low
    finally:
        probe.close()
