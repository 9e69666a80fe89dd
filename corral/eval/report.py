"""summary.json (scores per category, per question language and overall), report.md and a
self-contained report.html with per-category bar charts embedded as PNG."""

from __future__ import annotations

import html
import json
from pathlib import Path

from corral.eval.charts import bar_chart, data_uri

# (key, label, y-axis max for a compare chart or None for no chart)
METRICS: list[tuple[str, str, float | None]] = [
    ("language_adherence", "Language adherence", 1.0),
    ("language_adherence_zh", "Adherence on zh questions", None),
    ("language_adherence_en", "Adherence on en questions", None),
    ("accuracy", "Accuracy", 1.0),
    ("accuracy_norm", "Accuracy (length-normalized)", None),
    ("judge_score", "Judge score (1-10)", 10.0),
    ("refusal_rate", "Refusal rate", 1.0),
    ("empty_rate", "Empty rate", None),
    ("stop_rate", "Stop rate", 1.0),
    ("truncated_rate", "Truncated rate", 1.0),
    ("turn_marker_answers", "Answers with another turn's marker", None),
    ("error_rate", "Error rate", None),
    ("mean_answer_chars", "Answer length (chars)", None),
    ("mean_answer_tokens", "Answer length (tokens)", None),
    ("mean_seconds", "Seconds per answer", None),
]
# A run's charts: (file name, title, metrics drawn side by side per category, y-axis max).
CHARTS: list[tuple[str, str, list[str], float]] = [
    ("language_adherence", "Language adherence (all / zh / en questions)",
     ["language_adherence", "language_adherence_zh", "language_adherence_en"], 1.0),
    ("accuracy", "Accuracy", ["accuracy", "accuracy_norm"], 1.0),
    ("judge_score", "Judge score (1-10)", ["judge_score"], 10.0),
    ("failure_rates", "Refusal / empty / truncated rates",
     ["refusal_rate", "empty_rate", "truncated_rate"], 1.0),
    ("stop_rate", "Stop rate (answers the model ended itself)", ["stop_rate"], 1.0),
]
LABELS = {k: label for k, label, _ in METRICS}


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def metrics(records: list[dict]) -> dict:
    """Aggregate scores over some records (rates are fractions; None where nothing counts)."""
    ok = [r for r in records if not r.get("error")]
    open_ok = [r for r in ok if "choices" not in r]
    m: dict = {"n": len(records), "answered": len(ok), "errors": len(records) - len(ok),
               "error_rate": _mean([bool(r.get("error")) for r in records])}
    m["language_adherence"] = _mean([r.get("language_adherent") for r in open_ok])
    for lang in sorted({r["language"] for r in open_ok}):
        m[f"language_adherence_{lang}"] = _mean(
            [r.get("language_adherent") for r in open_ok if r["language"] == lang])
    langs: dict[str, int] = {}
    for r in open_ok:
        langs[r.get("answer_language", "none")] = langs.get(r.get("answer_language", "none"), 0) + 1
    m["answer_languages"] = langs
    for flag in ("empty", "truncated", "refusal"):
        m[f"{flag}_rate"] = _mean([r.get(flag) for r in open_ok])
    m["stop_rate"] = _mean([r.get("stopped") for r in open_ok])
    m["turn_marker_answers"] = sum(bool(r.get("turn_marker")) for r in open_ok)
    m["mean_answer_chars"] = _mean([r.get("answer_chars") for r in open_ok])
    m["mean_answer_tokens"] = _mean([r.get("completion_tokens") for r in open_ok])
    m["accuracy"] = _mean([r.get("correct") for r in ok])
    m["accuracy_n"] = sum(r.get("correct") is not None for r in ok)
    m["accuracy_norm"] = _mean([r.get("correct_norm") for r in ok])
    m["judge_score"] = _mean([r.get("judge_score") for r in open_ok])
    m["judge_n"] = sum(r.get("judge_score") is not None for r in open_ok)
    m["mean_seconds"] = _mean([r.get("seconds") for r in ok])
    return m


def warnings(overall: dict) -> list[str]:
    """Lines that say the run's answers are not to be trusted as they are."""
    out = []
    answered = overall.get("answered") or 0
    truncated = overall.get("truncated_rate")
    if truncated is not None and truncated > 0.5:
        out.append(f"warning: {truncated:.0%} of the answers hit max_tokens: the model does not "
                   "stop (a tuned model that never learned its end token?) or max_tokens is "
                   "too small")
    if overall.get("turn_marker_answers"):
        out.append(f"warning: {overall['turn_marker_answers']} of {answered} answers contain "
                   "another chat turn's marker (the model wrote the next turn itself)")
    return out


def summarize(records: list[dict], info: dict) -> dict:
    """The content of summary.json."""
    cats = list(dict.fromkeys(r["category"] for r in records))
    langs = list(dict.fromkeys(r["language"] for r in records))
    overall = metrics(records)
    return {"info": info, "overall": overall, "warnings": warnings(overall),
            "categories": {c: metrics([r for r in records if r["category"] == c]) for c in cats},
            "languages": {lg: metrics([r for r in records if r["language"] == lg])
                          for lg in langs}}


def fmt(value, key: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return ", ".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, float) and (key.endswith(("_rate", "adherence")) or "adherence_" in key
                                     or key.startswith("accuracy")):
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def shown_metrics(groups: list[dict]) -> list[str]:
    """Metric keys with a value in at least one group (no empty columns)."""
    return [k for k, _, _ in METRICS if any(g.get(k) is not None for g in groups)]


def charts(summary: dict) -> dict[str, bytes]:
    """The run's per-category bar charts (PNG) that have values, by file name."""
    cats = summary["categories"]
    out = {}
    for name, title, keys, ymax in CHARTS:
        series = {LABELS[k]: [cats[c].get(k) for c in cats] for k in keys}
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        if series:
            out[name] = bar_chart(f"{title} by category", list(cats), series, ymax)
    return out


def markdown(summary: dict, pngs: dict[str, bytes]) -> str:
    """report.md: the run, the overall scores and a per-category table."""
    info = summary["info"]
    groups = {"overall": summary["overall"]} | summary["categories"]
    keys = ["n"] + shown_metrics(list(groups.values()))
    lines = [f"# Eval report: {info.get('model')}", "",
             (f"Questions: `{info.get('questions')}` · judge: {info.get('judge') or 'none'} · "
              f"system prompt: {info.get('system')!r}"), "",
             *[f"**{w}**\n" for w in summary.get("warnings", [])],
             "| category | " + " | ".join(LABELS.get(k, k) for k in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, g in groups.items():
        lines.append(f"| {name} | " + " | ".join(fmt(g.get(k), k) for k in keys) + " |")
    lines += ["", "## By question language", "",
              "| language | n | answered in (counts) | adherence |", "|---|---|---|---|"]
    for lang, g in summary["languages"].items():
        lines.append(f"| {lang} | {g['n']} | {fmt(g['answer_languages'])} | "
                     f"{fmt(g['language_adherence'], 'language_adherence')} |")
    lines += ["", "Charts: " + ", ".join(f"[{k}](charts/{k}.png)" for k in pngs), ""]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.ans td{text-align:left;vertical-align:top}
.pos{color:#0a7a2f}.neg{color:#b3261e}img{display:block;margin:1em 0;max-width:100%}
pre{white-space:pre-wrap;margin:0;font-size:12px}"""


def html_page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(body) + "</body></html>")


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def answer_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        marks = [f"lang={r.get('answer_language', '–')}"]
        for key in ("correct", "judge_score", "refusal", "truncated", "turn_marker"):
            if r.get(key) is not None:
                marks.append(f"{key}={r[key]}")
        if r.get("error"):
            marks.append(f"error={r['error']}")
        rows.append([html.escape(r["id"]), html.escape(r["category"]),
                     f"<pre>{html.escape(r['question'])}</pre>",
                     f"<pre>{html.escape(r.get('answer') or '')}</pre>",
                     html.escape(" ".join(marks))])
    return rows


def html_report(summary: dict, records: list[dict], pngs: dict[str, bytes]) -> str:
    info = summary["info"]
    groups = {"overall": summary["overall"]} | summary["categories"]
    keys = ["n"] + shown_metrics(list(groups.values()))
    body = [(f"<p>Questions <code>{html.escape(str(info.get('questions')))}</code>, judge "
             f"{html.escape(str(info.get('judge') or 'none'))}, system prompt "
             f"{html.escape(repr(info.get('system')))}.</p>"),
            *[f"<p class='neg'><b>{html.escape(w)}</b></p>" for w in summary.get("warnings", [])],
            "<h2>Scores by category</h2>",
            html_table(["category"] + [LABELS.get(k, k) for k in keys],
                       [[html.escape(n)] + [fmt(g.get(k), k) for k in keys]
                        for n, g in groups.items()])]
    body.append("<h2>By question language</h2>" + html_table(
        ["language", "n", "answered in", "adherence"],
        [[lg, str(g["n"]), html.escape(fmt(g["answer_languages"])),
          fmt(g["language_adherence"], "language_adherence")]
         for lg, g in summary["languages"].items()]))
    body.append("<h2>Charts</h2>")
    body += [f"<img alt='{k}' src='{data_uri(png)}'>" for k, png in pngs.items()]
    body.append("<h2>Answers</h2>" + html_table(
        ["id", "category", "question", "answer", "scores"], answer_rows(records), "ans"))
    return html_page(f"Eval report: {info.get('model')}", body)


def write_reports(out_dir: Path, summary: dict, records: list[dict]) -> None:
    """Write summary.json, charts/*.png, report.md and report.html into `out_dir`."""
    (out_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2),
                                          encoding="utf-8")
    pngs = charts(summary)
    (out_dir / "charts").mkdir(exist_ok=True)
    for key, png in pngs.items():
        (out_dir / "charts" / f"{key}.png").write_bytes(png)
    (out_dir / "report.md").write_text(markdown(summary, pngs), encoding="utf-8")
    (out_dir / "report.html").write_text(html_report(summary, records, pngs), encoding="utf-8")
