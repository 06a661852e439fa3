"""``python -m benchmarks plot``: BENCHMARKS.md's one-screen summary table and its charts, from the JSON results.

    python -m benchmarks plot            # draw docs/img/benchmarks-summary.png, rewrite BENCHMARKS.md's summary block
    python -m benchmarks plot --check    # exit 1 when the summary block differs from the JSON results

Input: every ``benchmarks/results/*.json`` (not sub-folders: raw runs such as ``levers/``) in the results format below (one benchmark run each; a benchmark's
own ``--json`` output can be put in this form by hand or by its writer). Output: one PNG with a bar chart per result
(matplotlib, the ``plot`` extra, imported only to draw) and the block between ``<!-- generated:summary -->`` and
``<!-- /generated:summary -->`` at the top of BENCHMARKS.md (the table and the chart links).

Results format (JSON object)::

    {"benchmark": "peers", "title": "CPU peers: SD1.5 architecture 256x256, 10 steps",
     "command": "python -m benchmarks peers ...", "date": "2026-11-30", "machine": "2-core AMD EPYC Zen 4, load 3-6",
     "source": "where the full record is (a BENCHMARKS.md section or benchmarks/results/*.md)",
     "unit": "s", "better": "lower",                      # or "higher"
     "series": {"warm (median)": {"sdengine-openvino": 11.4, "diffusers": 30.8}, ...},
     "headline": {"series": "warm (median)", "ours": "sdengine-openvino", "baseline": "diffusers",
                  "what": "end-to-end image, warm"},      # or "target": 20 instead of "baseline"
     "transpose": false, "note": "optional free text"}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CHARTS = ROOT / "docs" / "img"
DOC = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- generated:summary -->", "<!-- /generated:summary -->"
ORDER = ("peers", "pipeline_e2e", "torch_compile", "sampler_overhead", "submit_latency")  # then by name


def load_results(folder: Path = RESULTS) -> list[dict[str, Any]]:
    """The results of ``folder`` (``*.json``), checked, in the summary's order; a malformed file is a ValueError
    naming it and the key."""
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("benchmark", "title", "command", "date", "machine", "unit", "better", "series", "headline"):
            if key not in data:
                raise ValueError(f"{path.name}: no {key!r} (see benchmarks/plot.py for the results format)")
        if data["better"] not in ("lower", "higher"):
            raise ValueError(f"{path.name}: 'better' is {data['better']!r} (allowed: lower, higher)")
        head = data["headline"]
        series = data["series"].get(head.get("series"))
        if series is None or head.get("ours") not in series or (head.get("baseline") not in series
                                                                and not isinstance(head.get("target"), (int, float))):
            raise ValueError(f"{path.name}: the headline names a series or row that is not in 'series' (or has "
                             "neither a baseline row nor a numeric target)")
        data["_file"] = path.name
        out.append(data)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(out, key=lambda d: (rank.get(d["benchmark"], len(ORDER)), d["_file"]))


def ratio(result: dict[str, Any]) -> float:
    """How many times better ours is than the baseline (> 1: better), in the headline series."""
    head = result["headline"]
    series = result["series"][head["series"]]
    ours = float(series[head["ours"]])
    base = float(series[head["baseline"]]) if "baseline" in head else float(head["target"])
    return base / ours if result["better"] == "lower" else ours / base


def _fmt(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:g}%"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


CHART = "benchmarks-summary.png"


def _versus(result: dict[str, Any]) -> tuple[str, str]:
    """The baseline cell and the comparison cell of a result's row."""
    head, unit = result["headline"], result["unit"]
    if "baseline" in head:
        base = result["series"][head["series"]][head["baseline"]]
        return f"{head['baseline']}: {_fmt(base, unit)}", f"**{ratio(result):.2f}x** {result['better']} is better"
    sign = "<=" if result["better"] == "lower" else ">="
    return f"target {sign} {_fmt(head['target'], unit)}", "**met**" if ratio(result) >= 1 else "**missed**"


def summary(results: list[dict[str, Any]], charts: str = "docs/img") -> str:
    """The markdown of the summary block: one row per result, then the chart of them all."""
    lines = ["| result | ours | baseline | ours vs baseline | measured |", "|---|---|---|---|---|"]
    for r in results:
        head = r["headline"]
        base, versus = _versus(r)
        lines.append(f"| {head.get('what', r['benchmark'])} | {head['ours']}: "
                     f"{_fmt(r['series'][head['series']][head['ours']], r['unit'])} | {base} | {versus} | "
                     f"{r['date']}, {r['machine']} |")
    lines.append("")
    lines.append("From `benchmarks/results/*.json` (each names its command, workload and full record below); the "
                 "table and the charts are drawn by `python -m benchmarks plot`. Absolute times come from a shared "
                 "2-core CPU machine: read the ratios within one run.")
    lines.append("")
    lines.append(f"![the results above as charts]({charts}/{CHART})")
    return "\n".join(lines)


def render_doc(text: str, block: str) -> str:
    """``text`` (BENCHMARKS.md) with its summary block replaced by ``block`` (inserted after the title line when
    the markers are missing)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"
    first, _, rest = text.partition("\n")
    return f"{first}\n\n## Summary\n\n{BEGIN}\n{block}\n{END}\n{rest}"


def draw_all(results: list[dict[str, Any]], path: Path) -> None:
    """One PNG, one horizontal bar chart per result (two columns), written atomically."""
    from core.lazy import require

    require("matplotlib", "plot", "python -m benchmarks plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), dpi=72, squeeze=False)
    for ax, result in zip(axes.flat, results):
        draw(result, ax)
    for ax in list(axes.flat)[len(results):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def draw(result: dict[str, Any], ax) -> None:
    """A horizontal grouped bar chart of the result's series on the matplotlib axes ``ax`` (``"transpose": true``
    in the result: one bar group per series, one bar per row name)."""
    series = result["series"]
    if result.get("transpose"):
        flipped: dict[str, dict[str, float]] = {}
        for name, rows in series.items():
            for label, value in rows.items():
                flipped.setdefault(label, {})[name] = value
        series = flipped
    labels: list[str] = []
    for rows in series.values():
        labels += [k for k in rows if k not in labels]
    n = len(series)
    height = 0.8 / n
    head = result["headline"]
    for i, (name, rows) in enumerate(series.items()):
        ys = [j + (i - (n - 1) / 2) * height for j, label in enumerate(labels) if label in rows]
        values = [float(rows[label]) for label in labels if label in rows]
        colours = ["#2f5fd0" if label == head["ours"] else "#8a8a94" if label == head.get("baseline") else "#b9c6e8"
                   for label in labels if label in rows] if n == 1 else None
        bars = ax.barh(ys, values, height=height * 0.9, label=name, color=colours)
        if "target" in head and i == 0:
            ax.axvline(float(head["target"]), color="#b3261e", linestyle="--", linewidth=1)
            ax.text(float(head["target"]), len(series[next(iter(series))]) - 0.5, f" target {_fmt(head['target'], result['unit'])}", fontsize=7,
                    color="#b3261e")
        ax.bar_label(bars, labels=[_fmt(v, result["unit"]) for v in values], padding=2, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{result['unit']} ({result['better']} is better)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(result["title"], fontsize=8.5, wrap=True)
    ax.margins(x=0.18)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if n > 1:
        ax.legend(fontsize=7, frameon=True, loc="best")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    parser.add_argument("--charts", type=Path, default=CHARTS, help="where the PNG charts go")
    parser.add_argument("--doc", type=Path, default=DOC, help="the markdown file whose summary block is rewritten")
    parser.add_argument("--check", action="store_true", help="only check that the summary block is current")
    args = parser.parse_args(argv)
    results = load_results(args.results)
    text = args.doc.read_text(encoding="utf-8")
    try:
        charts = args.charts.resolve().relative_to(args.doc.resolve().parent).as_posix()
    except ValueError:
        charts = args.charts.as_posix()
    new = render_doc(text, summary(results, charts))
    if args.check:
        if new != text:
            sys.stderr.write(f"{args.doc.name}'s summary is out of date: run python -m benchmarks plot\n")
            return 1
        return 0
    draw_all(results, args.charts / CHART)
    if new != text:
        tmp = args.doc.with_suffix(".md.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(args.doc)
    print(f"{len(results)} results: charts in {args.charts}, summary in {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
