"""`corral eval compare RUN_A RUN_B`: two runs side by side with per-category deltas (B - A),
the before/after-tuning view. Writes compare.json, compare.md and compare.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

from corral.errors import CorralError
from corral.eval.charts import bar_chart, data_uri
from corral.eval.report import LABELS, METRICS, fmt, html_page, html_table
from corral.eval.run import read_answers


def load_run(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.is_file():
        raise CorralError(f"{folder} is not an eval run (no summary.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _delta(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return round(b - a, 4)
    return None


def compare_summaries(a: dict, b: dict, names: tuple[str, str]) -> dict:
    """Per group (overall, then each category of either run): {metric: {a, b, delta}}."""
    cats = list(dict.fromkeys(list(a["categories"]) + list(b["categories"])))
    groups = {"overall": (a["overall"], b["overall"])} | {
        c: (a["categories"].get(c, {}), b["categories"].get(c, {})) for c in cats}
    out = {}
    for name, (ga, gb) in groups.items():
        out[name] = {k: {"a": ga.get(k), "b": gb.get(k), "delta": _delta(ga.get(k), gb.get(k))}
                     for k, _, _ in METRICS if ga.get(k) is not None or gb.get(k) is not None}
        out[name]["n"] = {"a": ga.get("n"), "b": gb.get("n"), "delta": None}
    return {"a": {"name": names[0], "info": a["info"]},
            "b": {"name": names[1], "info": b["info"]}, "groups": out}


def _delta_cell(d, key: str, html_mode: bool) -> str:
    if d is None:
        return "–"
    text = ("+" if d > 0 else "") + (f"{d * 100:.0f} pts" if fmt(0.5, key).endswith("%")
                                     else f"{d:.4g}")
    if not html_mode or d == 0:
        return text
    # Up is good except for the failure rates.
    good = (d > 0) != key.endswith(("refusal_rate", "empty_rate", "truncated_rate", "error_rate",
                                          "turn_marker_answers"))
    return f"<span class='{'pos' if good else 'neg'}'>{html.escape(text)}</span>"


def _metric_rows(cmp: dict, key: str, html_mode: bool) -> list[list[str]]:
    return [[name, fmt(g[key]["a"], key), fmt(g[key]["b"], key),
             _delta_cell(g[key]["delta"], key, html_mode)]
            for name, g in cmp["groups"].items() if key in g]


def _keys(cmp: dict) -> list[str]:
    present = {k for g in cmp["groups"].values() for k in g}
    return [k for k, _, _ in METRICS if k in present]


def compare_markdown(cmp: dict) -> str:
    a, b = cmp["a"]["name"], cmp["b"]["name"]
    lines = [f"# Eval comparison: {a} → {b}", "",
             (f"A = `{a}` ({cmp['a']['info'].get('model')}), "
              f"B = `{b}` ({cmp['b']['info'].get('model')}); Δ = B − A."), ""]
    for key in _keys(cmp):
        lines += [f"## {LABELS[key]}", "", "| category | A | B | Δ |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in _metric_rows(cmp, key, False)]
        lines.append("")
    return "\n".join(lines)


def compare_html(cmp: dict, answers_a: dict, answers_b: dict) -> str:
    a, b = cmp["a"]["name"], cmp["b"]["name"]
    cats = [c for c in cmp["groups"] if c != "overall"]
    model_a = html.escape(str(cmp["a"]["info"].get("model")))
    model_b = html.escape(str(cmp["b"]["info"].get("model")))
    body = [(f"<p>A = <code>{html.escape(a)}</code> ({model_a}), B = <code>{html.escape(b)}"
            f"</code> ({model_b}); Δ = B − A.</p>")]
    for key, label, ymax in METRICS:
        if key not in _keys(cmp):
            continue
        body.append(f"<h2>{html.escape(label)}</h2>")
        if ymax is not None:
            series = {f"A: {a}": [cmp["groups"][c].get(key, {}).get("a") for c in cats],
                      f"B: {b}": [cmp["groups"][c].get(key, {}).get("b") for c in cats]}
            png = bar_chart(f"{label} by category", cats, series, ymax)
            body.append(f"<img alt='{key}' src='{data_uri(png)}'>")
        body.append(html_table(["category", "A", "B", "Δ"], _metric_rows(cmp, key, True)))
    common = [k for k in answers_a if k in answers_b]
    rows = [[html.escape(k), f"<pre>{html.escape(answers_a[k]['question'])}</pre>",
             f"<pre>{html.escape(answers_a[k].get('answer') or '')}</pre>",
             f"<pre>{html.escape(answers_b[k].get('answer') or '')}</pre>"] for k in common]
    body.append("<h2>Answers side by side</h2>"
                + html_table(["id", "question", f"A: {a}", f"B: {b}"], rows, "ans"))
    return html_page(f"Eval comparison: {a} → {b}", body)


def compare_runs(run_a: Path, run_b: Path, out_dir: Path) -> dict:
    """Write compare.json/.md/.html for two run folders into `out_dir`; returns the data."""
    sa, sb = load_run(run_a), load_run(run_b)
    na, nb = run_a.resolve().name, run_b.resolve().name
    if na == nb:
        na, nb = str(run_a), str(run_b)
    cmp = compare_summaries(sa, sb, (na, nb))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(cmp, ensure_ascii=False, indent=2),
                                          encoding="utf-8")
    (out_dir / "compare.md").write_text(compare_markdown(cmp), encoding="utf-8")
    (out_dir / "compare.html").write_text(
        compare_html(cmp, read_answers(run_a), read_answers(run_b)), encoding="utf-8")
    return cmp
