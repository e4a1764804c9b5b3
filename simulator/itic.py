"""ITIC (CBEMA) ride-through envelope and the ledger of supply disturbances per IT load.

ITIC curve (Information Technology Industry Council, 2000), as in docs/domain.md: an IT load rides
through 0 % voltage for 20 ms, 70 % for 0.5 s, 80 % for 10 s and >= 90 % indefinitely; on the
high side 140 % for 3 ms, 120 % for 0.5 s, 110 % indefinitely.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def within_itic(residual_pu: float, duration_s: float) -> bool:
    """True when a disturbance of this residual voltage and duration is inside the envelope."""
    if 0.9 <= residual_pu <= 1.1 or duration_s <= 0.0:
        return True
    if residual_pu < 0.9:
        if duration_s <= 0.020:
            return True
        if duration_s <= 0.5:
            return residual_pu >= 0.7
        if duration_s <= 10.0:
            return residual_pu >= 0.8
        return False
    # swell
    if duration_s <= 0.001:
        return residual_pu <= 5.0
    if duration_s <= 0.003:
        return residual_pu <= 1.4
    if duration_s <= 0.5:
        return residual_pu <= 1.2
    return False


@dataclass
class Disturbance:
    t_s: float
    load: str  # "<unit>/single" or "<unit>/dual"
    residual_pu: float
    duration_ms: float
    dropped: bool
    cause: str


@dataclass
class IticLedger:
    """Every interruption or sag each load saw, whether it dropped, and the unserved energy."""

    events: list[Disturbance] = field(default_factory=list)
    unserved_kwh: float = 0.0

    def record(self, t_s: float, load: str, residual_pu: float, duration_ms: float, cause: str,
               protected: bool = False) -> bool:
        """Record a disturbance; returns True when the load dropped."""
        dropped = (not protected) and not within_itic(residual_pu, duration_ms / 1000.0)
        self.events.append(Disturbance(t_s, load, residual_pu, duration_ms, dropped, cause))
        return dropped

    @property
    def dropped_loads(self) -> int:
        return sum(1 for e in self.events if e.dropped)

    def summary(self) -> dict:
        return {
            "disturbances": len(self.events),
            "dropped_loads": self.dropped_loads,
            "unserved_kwh": round(self.unserved_kwh, 6),
        }
