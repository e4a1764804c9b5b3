"""The repository is self-contained: the code cites the project's own contract documents."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "drivers", "simulator", "cmcs", "bench", "information_model", "siteconfig", "tsnwire", "tests")
OUTSIDE = re.compile(r"\b(INTERFACE|DOMAIN|DESIGN)\.md\b|\.\./shared/")


def test_no_source_cites_a_document_outside_the_repository():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "cite docs/interface.md, docs/domain.md or docs/design.md instead:\n" + "\n".join(offenders)


def test_the_cited_contract_documents_exist():
    for name in ("interface.md", "domain.md", "design.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert len(text) > 2000, f"docs/{name} is missing or a stub"


def _interface_section(number: int) -> str:
    text = (ROOT / "docs" / "interface.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {number}\. .*?(?=^## \d+\. |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/interface.md has no section {number}"
    return match.group(0)


def test_interface_md_names_every_site_file_key_the_loader_accepts():
    from siteconfig import loader

    section = _interface_section(5) + _interface_section(9)
    groups = {name: keys for name, keys in vars(loader).items() if name.startswith("_") and name.endswith("_KEYS")}
    assert {"_GATEWAY_KEYS", "_MQTT_KEYS", "_TSN_KEYS", "_DEVICE_KEYS", "_METRICS_KEYS"} <= set(groups)
    groups["TLS_FIELDS"] = tuple(loader.TLS_FIELDS)
    missing = [f"{group}: {key}" for group, keys in groups.items() for key in keys
               if not re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", section)]
    assert not missing, "docs/interface.md sections 5 and 9 do not name these site-file keys:\n" + "\n".join(missing)


def test_interface_md_names_every_prometheus_series_the_exporter_serves():
    from gateway.metrics import MetricsExporter

    names = {sample.name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
             for family in MetricsExporter("0").registry.collect() for sample in family.samples}
    names |= {family.name + "_total" for family in MetricsExporter("0").registry.collect() if family.type == "counter"}
    section = _interface_section(9)
    missing = sorted(n for n in names if f"`{n}" not in section)
    assert names and not missing, f"docs/interface.md section 9 does not list {missing}"


def test_no_file_holds_a_merge_conflict_marker():
    """A merge left `<<<<<<< HEAD ... >>>>>>> limits` in docs/notes/asyncua.md for a session."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marked = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".mjs", ".json", ".service", ".proto", ""):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        marked += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1)
                   if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not marked, marked
