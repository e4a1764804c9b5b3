"""PNG plots of an evaluation: PR curves, lead times, a forecast against the truth, a risk timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmcs.dataset import COMPONENT_KINDS, HORIZON_S, ScenarioRun, load_targets
from cmcs.metrics import average_precision, events_all, pooled_rows, pr_curve

KIND_TITLES = {"source": "sources", "pdb": "PDB segments", "ats": "micro-ATS", "des": "DES"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out_dir, runs: list[ScenarioRun], predictor, metrics: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    margins = metrics.get("risk", {}).get("baseline_margins") or predictor.baseline_margins
    paths = [pr_curves(out_dir / "pr_curves.png", runs),
             lead_times(out_dir / "lead_times.png", runs, predictor, margins),
             forecast_vs_truth(out_dir / "load_forecast.png", runs), risk_timeline(out_dir / "risk_timeline.png", runs,
                                                                                  predictor)]
    return [p for p in paths if p is not None]


def _model(r, k):
    return r.scores[k]


def _base(r, k):
    return r.baseline[k]


def pr_curves(path: Path, runs: list[ScenarioRun]) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 5, figsize=(20, 4), sharey=True)
    for ax, kinds, title in zip(axes, [[k] for k in COMPONENT_KINDS] + [list(COMPONENT_KINDS)],
                                [KIND_TITLES[k] for k in COMPONENT_KINDS] + ["all components"]):
        drawn = False
        for score, label, style in ((_model, "model", "-"), (_base, "threshold baseline", "--")):
            y, s = pooled_rows(runs, kinds, score)
            if y.sum() == 0:
                continue
            p, r = pr_curve(y, s)
            ax.plot(r, p, style, label=f"{label} (AP {average_precision(y, s):.2f})")
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="lower left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no failures", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("precision")
    fig.suptitle(f"Failure within {HORIZON_S / 60:.0f} min: precision-recall over scored samples")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def lead_times(path: Path, runs: list[ScenarioRun], predictor, margins: dict | None = None) -> Path:
    plt = _plt()
    model_leads, base_leads = [], []
    margins = margins or {k: 1.0 for k in COMPONENT_KINDS}
    for k in COMPONENT_KINDS:
        model_leads += events_all(runs, k, _model, predictor.thresholds[k]).lead_times_s
        base_leads += events_all(runs, k, _base, margins[k]).lead_times_s
    fig, ax = plt.subplots(figsize=(8, 4))
    top = max([*model_leads, *base_leads, HORIZON_S]) / 60.0
    bins = np.linspace(0, top, 30)
    ax.hist(np.array(model_leads) / 60.0, bins=bins, alpha=0.6, label=f"model ({len(model_leads)} detected)")
    ax.hist(np.array(base_leads) / 60.0, bins=bins, alpha=0.6, label=f"threshold baseline, best margin ({len(base_leads)} detected)")
    ax.axvline(5.0, color="k", ls=":", lw=1, label="5 min")
    ax.set_xlabel("lead time of the first alarm before the failure (min)")
    ax.set_ylabel("failures")
    ax.set_title("Lead time at the false-alarm budget (1 per 100 unit-days)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def forecast_vs_truth(path: Path, runs: list[ScenarioRun], horizon_s: int = 300) -> Path | None:
    plt = _plt()
    cands = [r for r in runs if horizon_s in r.forecast]
    if not cands:
        return None
    run = cands[0]
    y = load_targets(run, horizon_s)
    # the unit whose load moves most (batch jobs), so the plot shows something happening
    u = int(np.nanargmax(np.nanstd(np.where(run.times[:, None] >= 3600, run.load_m1, np.nan), axis=0)))
    t_target = (run.times + horizon_s) / 3600.0
    sel = run.times >= 3600
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(t_target[sel], y[sel, u], "k-", lw=1.2, label="truth: minute-mean load")
    ax.plot(t_target[sel], run.forecast[horizon_s][sel, u], "-", lw=1, label=f"model, {horizon_s // 60} min ahead")
    ax.plot(t_target[sel], run.load_m1[sel, u], ":", lw=1, label="persistence (last-minute mean)")
    ax.set_xlabel("scenario time of the target (h)")
    ax.set_ylabel("kW")
    ax.set_title(f"Load forecast, {run.names['ats'][u]} in {run.name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def risk_timeline(path: Path, runs: list[ScenarioRun], predictor) -> Path | None:
    """The risk of the first failing component of a run against its healthy peers."""
    plt = _plt()
    for run in runs:
        fails = [f for f in run.failures if f.predictable and f.realized and f.component in ("pdb", "ats", "des")]
        if fails:
            break
    else:
        return None
    f = fails[0]
    s = run.scores[f.component]
    fig, ax = plt.subplots(figsize=(11, 4))
    hours = run.times / 3600.0
    before = run.times < f.onset_s
    for i in range(s.shape[1]):
        if i != f.device and np.isfinite(s[:, i]).any():
            ax.plot(hours[before], s[before, i], color="0.7", lw=0.6)
    ax.plot(hours[before], s[before, f.device], "r-", lw=1.5, label=f"{f.device_name} ({f.fault})")
    ax.axvline(f.onset_s / 3600.0, color="r", ls=":", lw=1, label="failure")
    ax.axvline((f.onset_s - f.precursor_s) / 3600.0, color="orange", ls=":", lw=1, label="precursor starts")
    ax.axhline(predictor.thresholds[f.component], color="k", ls="--", lw=1, label="operating threshold")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlabel("scenario time (h)")
    ax.set_ylabel(f"risk of failure within {HORIZON_S / 60:.0f} min")
    ax.set_title(f"{run.name}: the failing component against its peers (grey)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
