"""Report for a run folder: mean±std tables over seeds, plots (PNG) and ``report.md``.

Inputs are the files the steps wrote: ``results.json`` (index written by ``gptfl run``), each FL arm's
``metrics.jsonl``/``summary.json`` and each pretraining's ``metrics.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.errors import InputNotFoundError
from gptfl_ray.io import atomic_write_json, atomic_write_text, read_json, read_jsonl

ARM_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return float("nan"), float("nan"), 0
    return float(np.mean(xs)), float(np.std(xs)), len(xs)


def fmt_pct(m: float, s: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if n > 1 else f"{100 * m:.2f}"


def fmt_num(values: list[float | None], unit: str = "") -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "not reached"
    m = float(np.mean(xs))
    reached = f" ({len(xs)}/{len(values)} seeds)" if len(xs) < len(values) else ""
    return f"{m:.1f}{unit}{reached}" if unit else f"{m:.1f}{reached}"


def run_accuracy(summary: dict[str, Any]) -> float | None:
    """A run summary's headline accuracy: FL's final test accuracy; the isolated control's mean client accuracy."""
    return run_metric(summary, "accuracy")


def run_metric(summary: dict[str, Any], metric: str) -> float | None:
    """A run summary's final ``metric`` (accuracy, weighted_f1, macro_f1); the isolated control's client mean."""
    if summary.get("mode") == "isolated":
        return summary.get(f"isolated_mean_{metric}")
    return summary.get(f"final_{metric}")


F1_METRICS = ("weighted_f1", "macro_f1")  # shown in the table and plotted where the runs recorded them


def collect(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Per-arm table rows and per-seed curves from the arm folders."""
    rows, curves = [], {}
    for arm, by_seed in results["arms"].items():
        summaries, arm_curves = [], []
        for _seed, entry in sorted(by_seed.items()):
            folder = run_dir / entry["dir"]
            summaries.append(read_json(folder / "summary.json"))
            arm_curves.append(read_jsonl(folder / "metrics.jsonl"))
        curves[arm] = arm_curves
        rows.append(
            {
                "arm": arm,
                # client-isolated runs (fl.mode: isolated) report the mean over their fine-tuned clients
                "final_accuracy": mean_std([run_accuracy(s) for s in summaries]),
                **{f"final_{m}": mean_std([run_metric(s, m) for s in summaries]) for m in F1_METRICS},
                "best_accuracy": mean_std([s.get("best_accuracy") for s in summaries]),
                "rounds_to_target": [s.get("rounds_to_target") for s in summaries],
                "mb_to_target": [s.get("mb_to_target") for s in summaries],
                "total_mb": mean_std([s.get("total_mb") for s in summaries])[0],
                # per-round wall time and the server's share of it (aggregation + strategy work), mean over
                # rounds and seeds
                "round_s": mean_std([r.get("wall_time_s") for recs in arm_curves for r in recs])[0],
                "server_s": mean_std([r.get("server_time_s") for recs in arm_curves for r in recs])[0],
                "rounds": summaries[0].get("rounds") if summaries else None,
                "strategy": summaries[0].get("strategy") if summaries else None,
            }
        )
    entries = results.get("synthetic_only", {})
    syn = synthetic_only_groups(entries)
    return {
        "rows": rows,
        "curves": curves,
        "synthetic_only": {g: mean_std(v) for g, v in syn.items()},
        # {metric: {group: (mean, std, n)}}: the synthetic-only F1s, where pretraining recorded them
        "synthetic_only_f1": {
            m: {g: mean_std(v) for g, v in synthetic_only_groups(entries, f"real_test_{m}").items()}
            for m in F1_METRICS
        },
    }


def synthetic_only_groups(
    entries: dict[str, Any], key: str = "real_test_accuracy"
) -> dict[str, list[float | None]]:
    """``results["synthetic_only"]`` as {group: per-seed real-test accuracies} (or another ``key``'s values).

    A run pretrains one model per seed: ``{seed: entry}``, one unnamed group ``""``. A sweep pretrains one per
    grid point and seed: ``{arm: {seed: entry}}``, one group per arm.
    """
    if all("real_test_accuracy" in v for v in entries.values()):  # a run's index (or empty)
        return {"": [v.get(key) for _, v in sorted(entries.items())]}
    return {arm: [v.get(key) for _, v in sorted(by_seed.items())] for arm, by_seed in entries.items()}


def has_f1(data: dict[str, Any]) -> bool:
    """Whether the runs recorded F1 (every evaluation does since F1 was added; older run folders did not)."""
    return any(r[f"final_{m}"][2] for r in data["rows"] for m in F1_METRICS) or any(
        stats[2] for groups in data.get("synthetic_only_f1", {}).values() for stats in groups.values()
    )


def _plot(
    curves: dict[str, list[list[dict]]],
    x_key: str,
    y_key: str,
    xlabel: str,
    ylabel: str,
    path: Path,
    synthetic_only: dict[str, float] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (arm, seeds) in enumerate(curves.items()):
        color = ARM_COLORS[i % len(ARM_COLORS)]
        series = [
            [(r[x_key], r[y_key]) for r in recs if r.get(y_key) is not None and r.get(x_key) is not None]
            for recs in seeds
        ]
        series = [s for s in series if s]
        if not series:
            continue
        n = min(len(s) for s in series)
        xs = np.array([[p[0] for p in s[:n]] for s in series]).mean(0)
        ys = np.array([[p[1] for p in s[:n]] for s in series])
        ax.plot(xs, ys.mean(0), label=arm, color=color)
        if len(series) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
    colors = {arm: ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(curves)}
    for group, acc in (synthetic_only or {}).items():  # dashed, in its FL arm's colour where it has one
        if not math.isnan(acc):
            label = f"synthetic only: {group}" if group else "synthetic only"
            ax.axhline(acc, ls="--", color=colors.get(group, "k"), lw=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # e.g. a synthetic-only sweep has no curves
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def table_lines(data: dict[str, Any], target: float | None) -> list[str]:
    """The results table; with weighted and macro F1 columns next to accuracy where the runs recorded them."""
    f1 = has_f1(data)
    f1_head = " weighted F1 % | macro F1 % |" if f1 else ""
    head = (
        f"| arm | final acc % (mean ± std) |{f1_head} best acc % | rounds to target | MB to target | total MB "
        "| s/round (server) |"
    )
    lines = [head, "|---" * (7 + 2 * f1) + "|"]
    for r in data["rows"]:
        f1_cells = "".join(f" {fmt_pct(*r[f'final_{m}'])} |" for m in F1_METRICS) if f1 else ""
        lines.append(
            f"| {r['arm']} | {fmt_pct(*r['final_accuracy'])} |{f1_cells} {fmt_pct(*r['best_accuracy'])} | "
            f"{fmt_num(r['rounds_to_target']) if target else '–'} | "
            f"{fmt_num(r['mb_to_target'], ' MB') if target else '–'} | {_mb(r['total_mb'])} | "
            f"{_seconds(r.get('round_s'))} ({_seconds(r.get('server_s'))}) |"
        )
    for group, stats in data["synthetic_only"].items():
        name = f"synthetic only (no FL): {group}" if group else "synthetic only (no FL)"
        syn_f1 = data.get("synthetic_only_f1", {})
        f1_cells = (
            "".join(f" {fmt_pct(*syn_f1.get(m, {}).get(group, (0.0, 0.0, 0)))} |" for m in F1_METRICS)
            if f1
            else ""
        )
        lines.append(f"| {name} | {fmt_pct(*stats)} |{f1_cells} – | – | – | 0.0 | – |")
    return lines


def _mb(value: float | None) -> str:
    """Total MB; "–" where no run counted traffic (client-isolated runs exchange no models)."""
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write results.json, plots and report.md into ``run_dir``; return the report path."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "results.json", results)
    data = collect(run_dir, results)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    syn = {group: stats[0] for group, stats in data["synthetic_only"].items()}
    _plot(data["curves"], "round", "accuracy", "round", "test accuracy", plots / "accuracy_vs_round.png", syn)
    _plot(
        data["curves"],
        "cum_mb",
        "accuracy",
        "cumulative communication (MB)",
        "test accuracy",
        plots / "accuracy_vs_mb.png",
        syn,
    )
    _plot(
        data["curves"], "round", "grad_diversity", "round", "gradient diversity", plots / "grad_diversity.png"
    )
    f1_plots = []
    if has_f1(data):
        for m in F1_METRICS:
            label = m.replace("_f1", " F1")
            syn_f1 = {g: stats[0] for g, stats in data["synthetic_only_f1"][m].items()}
            _plot(data["curves"], "round", m, "round", f"test {label}", plots / f"{m}_vs_round.png", syn_f1)
            f1_plots.append(f"![{label} vs round](plots/{m}_vs_round.png)")
    target = results.get("target_accuracy")
    metric = results.get("target_metric", "accuracy")
    lines = [
        f"# GPT-FL run: {results.get('name', run_dir.name)}",
        "",
        f"Seeds: {results.get('seeds')}. Target {metric.replace('_', ' ')}: "
        f"{f'{100 * target:.0f}%' if target else 'none'}." + _wall_time(results),
        "",
        *table_lines(data, target),
        "",
        "`gptfl` = FL starting from the weights pretrained on synthetic data; the other arms are the baselines;",
        "`synthetic only` = the pretrained model evaluated on the real test set without any FL.",
        *(
            ["`pretrained-init` = FL starting from `model.weights` directly (no synthetic pretraining)."]
            if "pretrained-init" in results.get("arms", {})
            else []
        ),
        "s/round = mean wall time of a round (clients' training and evaluation included); in brackets the",
        "server's part of it (aggregation and the algorithm's own server work, e.g. distillation).",
        "Gradient diversity = Σ‖Δᵢ‖² / ‖ΣΔᵢ‖² over a round's K client updates Δᵢ (Yin et al. 2018):",
        "1/K when they are identical, 1 when orthogonal, above 1 when they partly cancel out.",
        "",
        "![accuracy vs round](plots/accuracy_vs_round.png)",
        "![accuracy vs communication](plots/accuracy_vs_mb.png)",
        "![gradient diversity](plots/grad_diversity.png)",
        *f1_plots,
        "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    single = next(iter(data["synthetic_only"].values())) if len(data["synthetic_only"]) == 1 else None
    atomic_write_json(
        run_dir / "summary.json",
        {
            "rows": [
                {
                    **r,
                    "final_accuracy_mean": r["final_accuracy"][0],
                    "final_accuracy_std": r["final_accuracy"][1],
                    **{f"final_{m}_mean": r[f"final_{m}"][0] for m in F1_METRICS},
                    **{f"final_{m}_std": r[f"final_{m}"][1] for m in F1_METRICS},
                }
                for r in data["rows"]
            ],
            "synthetic_only": [
                {
                    "arm": group,
                    "mean": m,
                    "std": sd,
                    "seeds": n,
                    **{f"{f}_mean": data["synthetic_only_f1"][f][group][0] for f in F1_METRICS},
                    **{f"{f}_std": data["synthetic_only_f1"][f][group][1] for f in F1_METRICS},
                }
                for group, (m, sd, n) in data["synthetic_only"].items()
            ],
            # the one synthetic-only result of a run (None when a sweep has several, one per grid point)
            "synthetic_only_mean": single[0] if single else None,
            "synthetic_only_std": single[1] if single else None,
        },
    )
    return path


def print_summary_table(results: dict[str, Any], run_dir: Path) -> None:
    data = collect(Path(run_dir), results)
    print()
    print("\n".join(table_lines(data, results.get("target_accuracy"))))
    print()


def report_command(args) -> int:
    run_dir = Path(args.run_dir)
    index = run_dir / "results.json"
    if not index.is_file():
        raise InputNotFoundError(f"{index}: not a finished run folder (no results.json)")
    results = read_json(index)
    path = write_report(run_dir, results)
    print_summary_table(results, run_dir)
    print(f"report: {path}")
    return 0


def _wall_time(results: dict[str, Any]) -> str:
    if "wall_time_s" not in results:
        return ""
    note = " (this invocation only: it resumed earlier work)" if results.get("resumed") else ""
    return f" Wall time: {results['wall_time_s']:.0f} s{note}."
