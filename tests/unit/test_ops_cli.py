"""The operations commands' surface: `cmcs --version`, and bad input to `cmcs status` / `cmcs metrics` as one line."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.users import verify_password

REPO = Path(__file__).resolve().parents[2]


def cmcs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          input=stdin, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_version_prints_the_installed_package_version():
    proc = cmcs("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cmcs-gateway {version('cmcs-gateway')}"


@pytest.mark.parametrize("args, message", [
    (["--security", "Basic128Rsa15"], "--security: unknown policy 'Basic128Rsa15'"),
    (["--security", "Basic256Sha256:Encrypt"], "--security: unknown mode 'Encrypt'"),
    (["--user", "olga"], "--security Basic256Sha256 needs --certificate and --private-key"),
    (["--security", "None"], "give --certificate/--private-key"),
    (["--certificate", "nowhere.der", "--private-key", "nowhere.pem"], "--certificate nowhere.der: no such file"),
    (["--security", "None", "--user", "olga"], "cmcs status is a terminal view"),
])
def test_status_refuses_bad_options_with_one_line(args, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert main(["status", "--endpoint", "opc.tcp://127.0.0.1:9/cmcs", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cmcs: error: {message}") and err.count("\n") == 1, err


def test_metrics_hash_password_prints_a_verifiable_scrypt_hash(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("scraper-secret\n"))
    assert main(["metrics", "hash-password"]) == 0
    assert verify_password("scraper-secret", capsys.readouterr().out.strip())
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["metrics", "hash-password"]) == 2
    assert capsys.readouterr().err == "cmcs: error: empty password\n"


def test_bad_metrics_address_on_the_command_line_is_one_line(tmp_path):
    proc = cmcs("run", "--metrics", "localhost:http", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert proc.stderr == "cmcs: error: --metrics localhost:http: expected [HOST:]PORT, e.g. 9464 or 0.0.0.0:9464\n"


def test_train_refuses_a_bundle_without_eval_only_in_one_line(tmp_path):
    """`--bundle` names a bundle to evaluate; given to a training run it used to be ignored silently."""
    proc = cmcs("train", "--bundle", str(tmp_path / "b"), "--quick", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cmcs: error: --bundle names the bundle to evaluate and needs --eval-only (or, with --history, the bundle "
        "to refine); training writes a new bundle into --data-dir (or --out)"]
    assert not (tmp_path / "d" / "models").exists()  # nothing trained, nothing written
