"""Reports: summary numbers, self-contained HTML with per-category charts, rendered as an image."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
from PIL import Image

from corral.eval.report import summarize, write_reports

BAR_BLUE = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first bar colour


def record(qid, cat, lang, answer_lang, **kw):
    rec = {"id": qid, "category": cat, "language": lang, "question": f"question {qid}",
           "answer": f"answer {qid}", "error": None, "answer_language": answer_lang,
           "language_adherent": answer_lang == lang, "empty": False, "truncated": False,
           "refusal": False, "answer_chars": 10, "completion_tokens": 4, "seconds": 1.0}
    return rec | kw


RECORDS = [
    record("a", "coding", "zh", "en", truncated=True),
    record("b", "coding", "en", "en", correct=True),
    record("c", "personality", "zh", "zh", refusal=True, correct=False),
    record("d", "personality", "en", "mixed", answer="<script>alert(1)</script>"),
    {"id": "e", "category": "coding", "language": "en", "question": "q", "answer": "",
     "error": "RuntimeError: boom", "seconds": 0.0},
]


def test_summary_numbers():
    s = summarize(RECORDS, {"model": "m"})
    o = s["overall"]
    assert (o["n"], o["answered"], o["errors"]) == (5, 4, 1)
    assert o["language_adherence"] == 0.5 and o["language_adherence_zh"] == 0.5
    assert o["truncated_rate"] == 0.25 and o["refusal_rate"] == 0.25
    assert o["accuracy"] == 0.5 and o["accuracy_n"] == 2
    assert o["answer_languages"] == {"en": 2, "zh": 1, "mixed": 1}
    assert s["categories"]["coding"]["language_adherence"] == 0.5
    assert s["categories"]["coding"]["error_rate"] == round(1 / 3, 4)
    assert s["categories"]["personality"]["language_adherence_en"] == 0.0
    assert o["judge_score"] is None


def blue_pixels(img: Image.Image) -> int:
    px = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(px - BAR_BLUE).sum(axis=-1) < 30).sum())


def test_html_is_self_contained_with_charts(tmp_path):
    write_reports(tmp_path, summarize(RECORDS, {"model": "m", "questions": "t"}), RECORDS)
    page = (tmp_path / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # nothing fetched
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 3  # adherence, accuracy, failure rates (no judge scores here)
    for b64 in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.size[0] >= 400 and img.size[1] >= 200
        assert blue_pixels(img) > 500  # bars were drawn
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == [
        "accuracy.png", "failure_rates.png", "language_adherence.png"]
    md = (tmp_path / "report.md").read_text()
    assert "| coding | 3 |" in md and "(charts/language_adherence.png)" in md


def test_html_renders_in_a_browser(tmp_path):
    """Screenshot report.html with headless Chromium and look for the chart bars in it. Where
    Chromium is missing (`make browser` installs it), decode the embedded PNGs instead."""
    write_reports(tmp_path, summarize(RECORDS, {"model": "m", "questions": "t"}), RECORDS)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        page = (tmp_path / "report.html").read_text()
        b64 = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)[0]
        assert blue_pixels(Image.open(io.BytesIO(base64.b64decode(b64)))) > 500
        return
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1200,1600",
                    f"--screenshot={shot}", (tmp_path / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot)
    assert img.size == (1200, 1600)
    assert blue_pixels(img) > 2000  # the embedded bar charts are on the page
