"""Options of `cmcs train` that the CMCS package defines, for gateway/cli.py's parser to add.

Kept free of numpy and xgboost so that building the `cmcs` parser stays cheap for every command."""

from __future__ import annotations

from pathlib import Path


def add_history_arguments(p) -> None:
    """`cmcs train --history DATA_DIR [--holdout-days D]` (cmcs.history, docs/models.md)."""
    p.add_argument("--history", type=Path, default=None, metavar="DATA_DIR",
                   help="refine the load models on the history recorded in this data dir (its history.sqlite3) "
                        "of the --config site (default: the demo hall); with --bundle B, B is refined instead "
                        "of a bundle trained now")
    p.add_argument("--holdout-days", type=float, default=None, metavar="DAYS",
                   help="with --history: the last DAYS of the history judge the refinement and are never trained "
                        "on (default: 20 %% of its span, at least 0.25)")
