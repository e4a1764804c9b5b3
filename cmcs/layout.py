"""The layout a model bundle was trained for, and whether a site matches it (docs/models.md, Layouts).

The models learn from a site's own shape: peer statistics over an aisle and the hall, twin-feed
comparisons, ratings that normalise currents and temperatures, which units have a DES and how big,
which source each unit prefers. A bundle trained on one hall is not known to hold on another, so
a bundle records the layout it was trained for (`bundle.json: layout`) and the live CMCS compares
it with the site it runs on: where they differ, the CMCS stays Advisory (docs/interface.md
section 3, `Cmcs.SetMode(Automatic)` -> `BadInvalidState`).

The fingerprint hashes what the models depend on, never names or addresses: per aisle its PDB
segments (feed, rated current, joints per phase) and its micro-ATS (rated current, preferred
source, mean IT load, DES present and its capacity, power and SoC window), the aisles sorted so
that renaming or reordering aisles changes nothing; the sources (rating, backup kind); the
nominal voltage and frequency. Positions, transfer-time datasheet values, dual-corded shares,
scan groups and device endpoints are left out (the models do not read them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from siteconfig.demo import demo_site

LAYOUT_FORMAT = 1
FINGERPRINT_CHARS = 16  # hex characters kept: 64 bits, plenty to tell halls apart


def _num(x: float) -> float:
    """A rating as the site file gives it, rounded so that 8.5 and 8.5000000001 hash the same."""
    return round(float(x), 3)


def _unit(u) -> list:
    s = u.storage
    des = None if s is None else [_num(s.capacity_kwh), _num(s.max_power_kw), _num(s.soc_min_pct),
                                  _num(s.soc_max_pct)]
    return [_num(u.rated_current_a), int(u.preferred_source), _num(u.it_load_kw), des]


def layout_description(site) -> dict:
    """What the models depend on, as plain sorted data (the fingerprint's input)."""
    aisles = []
    for a in site.aisles:
        pdbs = sorted([int(p.feed), _num(p.rated_current_a), int(p.joints_per_phase)] for p in a.pdbs)
        # units keep their order along the aisle (neighbours share dual-corded racks, peer
        # statistics run over the aisle); the aisles themselves are sorted below
        aisles.append({"pdbs": pdbs, "units": [_unit(u) for u in a.units]})
    aisles.sort(key=lambda d: json.dumps(d, sort_keys=True))
    return {
        "format": LAYOUT_FORMAT,
        "nominal_voltage_v": _num(site.nominal_voltage_v), "frequency_hz": _num(site.frequency_hz),
        "sources": sorted([int(s.selection), _num(s.rated_power_kw), s.backup] for s in site.sources),
        "aisles": aisles,
    }


def layout_fingerprint(site) -> str:
    """A short hash of `layout_description(site)`: equal for halls the models see alike."""
    text = json.dumps(layout_description(site), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def layout_summary(site) -> str:
    """One line for people: 'demo-hall: 4x6, 24 DES' (aisles x units per aisle, or a unit count)."""
    per_aisle = {len(a.units) for a in site.aisles}
    shape = (f"{len(site.aisles)}x{per_aisle.pop()}" if len(per_aisle) == 1
             else f"{len(site.aisles)} aisles, {len(site.units)} units")
    return f"{site.name}: {shape}, {len(site.storages)} DES"


def layout_record(site, note: str | None = None) -> dict:
    """The `layout` entry of bundle.json for a bundle trained for `site`."""
    rec = {"fingerprint": layout_fingerprint(site), "summary": layout_summary(site), "site": site.name,
           "aisles": len(site.aisles), "units": len(site.units), "des": len(site.storages)}
    if note:
        rec["note"] = note
    return rec


def demo_layout_record() -> dict:
    """The demo hall's record: what a bundle without one (made before layouts were recorded) is taken for."""
    return layout_record(demo_site(), note="no layout recorded in the bundle: taken as the demo hall's")


@dataclass(frozen=True)
class LayoutCheck:
    """A bundle's layout against a site's."""

    matches: bool
    bundle: dict  # the bundle's layout record (or the demo hall's, when it has none)
    site_fingerprint: str
    site_summary: str

    @property
    def reason(self) -> str:
        """Why the CMCS holds back ('' when the layouts match)."""
        if self.matches:
            return ""
        return (f"trained for another layout ({self.bundle.get('summary', '?')}, fingerprint "
                f"{self.bundle.get('fingerprint', '?')}); this site is {self.site_summary} (fingerprint "
                f"{self.site_fingerprint})")


def bundle_layout(meta: dict) -> dict:
    """The layout record of a bundle's metadata; the demo hall's when the bundle has none."""
    rec = meta.get("layout")
    return rec if isinstance(rec, dict) and rec.get("fingerprint") else demo_layout_record()


def check_layout(meta: dict, site) -> LayoutCheck:
    """Does the bundle (its bundle.json metadata) match the site it is about to run on?"""
    rec = bundle_layout(meta)
    fp = layout_fingerprint(site)
    return LayoutCheck(rec["fingerprint"] == fp, rec, fp, layout_summary(site))


ADVISORY_ONLY = "trained for another layout: Advisory only"


def model_version_text(version: str, check: LayoutCheck) -> str:
    """`Cmcs.ModelVersion`: the bundle's version, and why the CMCS holds back if it does (<= 128 chars)."""
    if check.matches:
        return version
    text = (f"{version} ({ADVISORY_ONLY}; bundle {check.bundle.get('fingerprint', '?')[:8]}, site "
            f"{check.site_fingerprint[:8]})")
    return text[:128]


def stamp_bundle_layout(bundle_dir, site=None, note: str | None = None) -> dict:
    """Record in an existing bundle's bundle.json the layout it was trained for (default: the demo
    hall). Only bundle.json changes; the model files stay byte for byte. Used once for the shipped
    bundle, made before layouts were recorded:
    `python -c "from cmcs.layout import stamp_bundle_layout; stamp_bundle_layout('cmcs/bundles/default')"`."""
    path = Path(bundle_dir) / "bundle.json"
    meta = json.loads(path.read_text())
    site = site or demo_site()
    meta["layout"] = layout_record(site, note=note if note is not None else (
        "recorded after training: trained on the demo hall and generated shapes, judged on the demo hall"))
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta["layout"]
