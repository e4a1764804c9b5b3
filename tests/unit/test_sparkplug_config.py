"""`gateway.mqtt` in the site file: defaults, paths relative to the site file, one line per error."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.modbus.tls import CertificateAuthority
from siteconfig.loader import load_site
from siteconfig.yamlpos import ConfigErrors

SMALL = Path(__file__).resolve().parents[1] / "fixtures" / "sites" / "small.yaml"


def _with_mqtt(tmp_path: Path, block: str) -> Path:
    text = SMALL.read_text()
    assert "\ngateway:" not in text  # the fixture has no gateway block: this one is the only one
    path = tmp_path / "site.yaml"
    path.write_text(text + "\n" + block)
    return path


def test_tls_paths_are_relative_to_the_site_file_and_defaults_apply(tmp_path):
    ca = CertificateAuthority("t")
    ca.write(tmp_path / "pki", "ca")
    ca.issue("gw", client=True).write(tmp_path / "pki", "gw")
    site = load_site(_with_mqtt(tmp_path, "gateway:\n  mqtt:\n    tls: {ca: pki/ca.pem, cert: pki/gw.pem, key: pki/gw.key}\n"))
    mqtt = site.gateway.mqtt
    assert mqtt.tls_ca == str(tmp_path / "pki" / "ca.pem") and mqtt.port == 8883 and mqtt.group_id == "cmcs"
    assert mqtt.edge_node_id is None and mqtt.store_forward_mb == 512 and mqtt.commands is False


def test_plain_tcp_needs_insecure_and_errors_name_file_line_key(tmp_path):
    path = _with_mqtt(tmp_path, "gateway:\n  mqtt:\n    host: 127.0.0.1\n    edge_node_id: a/b\n")
    with pytest.raises(ConfigErrors) as info:
        load_site(path)
    text = str(info.value)
    assert "gateway.mqtt: needs tls: {ca, cert, key} (or insecure: true for plain TCP)" in text
    assert f"{path}:" in text and "gateway.mqtt.edge_node_id: must match" in text
    site = load_site(_with_mqtt(tmp_path, "gateway:\n  mqtt:\n    insecure: true\n"))
    assert site.gateway.mqtt.insecure and site.gateway.mqtt.port == 1883
