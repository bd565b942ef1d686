"""An evaluation report's outputs: the Markdown tables, the plots (matplotlib) and the files of a local directory.

    write_report(report, rows, "runs/eval")   # eval.json, eval.md, eval.png, eval.positions.json

Writing is local only; copying the directory to object storage is the caller's (pipelines.storage).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_SHOWN_POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def markdown_table(report: dict) -> str:
    """The headline table and a per-position table, in Markdown."""
    conds, n_a = report["conditions"], report["n_ahead"]
    head = f"N_L={report.get('n_latents')}, " if report.get("n_latents") else ""
    lines = [
        f"{head}{report['points']} points in {report['windows']} windows of {report['documents']} documents; "
        f"{int(report['bootstrap']['confidence'] * 100)}% bootstrap intervals over points.",
        "",
        f"| condition | ppl, ahead 1..{n_a} | change vs none | ppl, ahead 1..{report['max_ahead']} |",
        "| --- | --- | --- | --- |",
    ]
    for c in conds:
        lo, hi = report["ppl_ci"][c]
        if c == "none" or "relative_reduction" not in report:
            vs = "-"
        else:
            r, (rlo, rhi) = report["relative_reduction"][c], report["relative_reduction_ci"][c]
            vs = f"{-100 * r:+.1f}% [{-100 * rhi:+.1f}, {-100 * rlo:+.1f}]"
        lines.append(f"| {c} | {report['ppl'][c]:.2f} [{lo:.2f}, {hi:.2f}] | {vs} | "
                     f"{report['ppl_all_positions'][c]:.2f} |")
    shown = [k for k in _SHOWN_POSITIONS if k <= report["max_ahead"]]
    lines += ["", "| ahead k | " + " | ".join(conds) + " |", "| --- |" + " --- |" * len(conds)]
    for k in shown:
        cells = [f"{report['per_position'][c]['ppl'][k - 1]:.2f}" for c in conds]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ahead(report: dict, path: str | Path) -> Path:
    """Perplexity by ahead position, one line (with its interval band) per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, report["max_ahead"] + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for c in report["conditions"]:
        pp = report["per_position"][c]
        ci = np.asarray(pp["ppl_ci"])
        ax.plot(ks, pp["ppl"], marker=".", label=f"{c} ({report['ppl'][c]:.2f})")
        ax.fill_between(ks, ci[:, 0], ci[:, 1], alpha=0.2)
    ax.axvline(report["n_ahead"] + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("ahead position k (token x_{t+k})")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    title = f"N_L={report['n_latents']}: " if report.get("n_latents") else ""
    ax.set_title(f"{title}held-out perplexity by ahead position (dashed: trained range N_A={report['n_ahead']})",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_gain_vs_latents(reports: Sequence[dict], path: str | Path) -> Path:
    """Relative perplexity reduction vs none (with intervals) against N_L, per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted(reports, key=lambda r: r["n_latents"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in [c for c in reports[0]["conditions"] if c != "none"]:
        xs = [r["n_latents"] for r in reports]
        ys = np.array([100 * r["relative_reduction"][c] for r in reports])
        ci = 100 * np.array([r["relative_reduction_ci"][c] for r in reports])
        ax.errorbar(xs, ys, yerr=[ys - ci[:, 0], ci[:, 1] - ys], marker="o", capsize=4, label=c)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["n_latents"] for r in reports], [str(r["n_latents"]) for r in reports])
    ax.set_xlabel("N_L (latents)")
    ax.set_ylabel(f"perplexity reduction vs none, % (ahead 1..{reports[0]['n_ahead']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(report: dict, rows: Sequence[dict], directory: str | Path, name: str = "eval") -> dict[str, Path]:
    """<name>.json, <name>.md, <name>.png and <name>.positions.json (the points, for re-checking) in a local dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / f"{name}.json",
        "md": directory / f"{name}.md",
        "png": directory / f"{name}.png",
        "positions": directory / f"{name}.positions.json",
    }
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown_table(report))
    plot_ahead(report, paths["png"])
    positions = [{"doc_id": r["doc_id"], "window": r["window"], "points": r["points"]} for r in rows]
    paths["positions"].write_text(json.dumps(positions) + "\n")
    return paths
