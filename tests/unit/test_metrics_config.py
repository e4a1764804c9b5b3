"""`gateway.metrics` in the site file and `cmcs run --metrics [HOST:]PORT` (docs/interface.md sections 2 and 5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.metrics import parse_metrics_address
from gateway.users import hash_password
from siteconfig.demo import demo_site, site_to_yaml
from siteconfig.loader import load_site, parse_site
from siteconfig.model import MetricsConfig
from siteconfig.yamlpos import ConfigErrors
from tests.ops_certs import tls_pair

SMALL = (Path(__file__).resolve().parents[1] / "fixtures" / "sites" / "small.yaml").read_text()


def _with_gateway_block(block: str) -> str:
    assert "\ngateway:" not in SMALL
    return SMALL.replace("\nsources:", "\ngateway:\n" + block + "\nsources:", 1)


def test_absent_block_is_off_and_a_bare_port_binds_loopback():
    assert parse_site(SMALL, "s.yaml", profiles_dir=None).gateway.metrics is None
    site = parse_site(_with_gateway_block("  metrics: {port: 9555}"), "s.yaml", profiles_dir=None)
    assert site.gateway.metrics == MetricsConfig(host="127.0.0.1", port=9555)


def test_tls_and_basic_auth_paths_resolve_against_the_site_file(tmp_path):
    cert, key = tls_pair(tmp_path, "m")
    hashed = hash_password("pw")
    path = tmp_path / "site.yaml"
    path.write_text(_with_gateway_block(f"  metrics:\n    host: 0.0.0.0\n    port: 9464\n    tls: {{cert: m.pem, key: m.key}}\n"
                                        f"    basic_auth: {{user: prom, password_hash: '{hashed}'}}"))
    metrics = load_site(path, profiles_dir=None).gateway.metrics
    assert metrics == MetricsConfig("0.0.0.0", 9464, str(cert), str(key), "prom", hashed)


@pytest.mark.parametrize("block, expected", [
    ("  metrics: {port: 0x}", "metrics.port"),
    ("  metrics: {port: 70000}", "metrics.port"),
    ("  metrics: {prot: 9464}", "metrics.prot"),
    ("  metrics: {port: 9464, basic_auth: {user: p, password_hash: plain-text}}", "metrics.basic_auth.password_hash"),
    ("  metrics: {port: 9464, tls: {cert: nowhere.pem}}", "metrics.tls"),
])
def test_bad_metrics_block_names_the_key(block, expected):
    with pytest.raises(ConfigErrors) as caught:
        parse_site(_with_gateway_block(block), "s.yaml", profiles_dir=None)
    assert any(expected in str(e) for e in caught.value.errors), [str(e) for e in caught.value.errors]


def test_metrics_block_round_trips_through_the_site_yaml():
    site = demo_site()
    site = dataclasses.replace(site, gateway=dataclasses.replace(site.gateway, log_summary_s=15.0, metrics=MetricsConfig(
        port=9999, basic_auth_user="prom", basic_auth_password_hash=hash_password("x"))))
    assert parse_site(site_to_yaml(site), profiles_dir=None) == site


@pytest.mark.parametrize("text, address", [("9464", ("127.0.0.1", 9464)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
                                           ("[::1]:9464", ("::1", 9464)), (":9464", ("127.0.0.1", 9464))])
def test_metrics_address(text, address):
    assert parse_metrics_address(text) == address


def test_bad_metrics_address_is_one_line():
    with pytest.raises(ValueError, match=r"expected \[HOST:\]PORT"):
        parse_metrics_address("localhost:http")


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path):
    cert, _ = tls_pair(tmp_path, "one")
    _, other_key = tls_pair(tmp_path, "two")
    path = tmp_path / "site.yaml"
    path.write_text(_with_gateway_block(f"  metrics: {{port: 9464, tls: {{cert: {cert.name}, key: {other_key.name}}}}}"))
    with pytest.raises(ConfigErrors) as caught:
        load_site(path, profiles_dir=None)
    assert any("not a matching PEM certificate and private key" in str(e) for e in caught.value.errors)
