"""A small all-TSN site for the TSN tests: two sources, one aisle (two PDB segments, one micro-ATS)."""

from __future__ import annotations

from pathlib import Path

from tsnwire.keys import generate_key_file

DEVICES = (  # name, profile, MAC, PublisherId
    ("SourceA", "power_source_v1", "02:00:00:00:02:01", 11),
    ("SourceB", "power_source_v1", "02:00:00:00:02:02", 12),
    ("PDB-01-A", "pdb_segment_v1", "02:00:00:00:02:03", 21),
    ("PDB-01-B", "pdb_segment_v1", "02:00:00:00:02:04", 22),
    ("MATS-01-01", "micro_ats_v1", "02:00:00:00:02:05", 31),
)
VLAN = 10


def write_tsn_site(folder: Path, interface: str, *, security: str = "sign_and_encrypt") -> Path:
    """Write site.yaml and one key file per device into `folder`; returns the site file."""
    for k, (name, *_rest) in enumerate(DEVICES):
        generate_key_file(folder / f"{name}.key", key_id=100 + k)
    path = folder / "site.yaml"
    path.write_text(tsn_site_text(interface, security=security))
    return path


def tsn_site_text(interface: str, *, security: str = "sign_and_encrypt") -> str:
    """The site file's text; its key files are <device name>.key beside it."""
    dev = {}
    for name, profile, mac, pub in DEVICES:
        dev[name] = (f"{{driver: tsn, profile: {profile}, mac: '{mac}', vlan: {VLAN}, publisher_id: {pub}, "
                     f"key_file: {name}.key, scan_group: fast}}")
    return f"""
site: {{name: tsn-hall, nominal_voltage_v: 415, frequency_hz: 60}}
gateway:
  scan_groups_s: {{fast: 0.2, normal: 1.0}}
  tsn:
    interface: {interface}
    cycle_us: 1000
    security: {security}
    windows: [{{class: command, pcp: 6, offset_us: 0, length_us: 200}},
              {{class: telemetry, pcp: 5, offset_us: 200, length_us: 300}}]
sources:
  - {{name: SourceA, rated_power_kw: 50, backup: ups, device: {dev['SourceA']}}}
  - {{name: SourceB, rated_power_kw: 50, backup: generator, device: {dev['SourceB']}}}
aisles:
  - name: Aisle01
    pdbs:
      - {{name: PDB-01-A, feed: SourceA, rated_current_a: 63, device: {dev['PDB-01-A']}}}
      - {{name: PDB-01-B, feed: SourceB, rated_current_a: 63, device: {dev['PDB-01-B']}}}
    units:
      - {{name: MATS-01-01, position_ft: 6, rated_current_a: 40, preferred_source: SourceA, it_load_kw: 8.5,
          device: {dev['MATS-01-01']}}}
"""
