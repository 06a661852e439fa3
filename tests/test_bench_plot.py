"""``python -m benchmarks plot``: BENCHMARKS.md's summary table is the JSON results' (cannot drift), and the
chart is drawn from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import plot

ROOT = Path(__file__).resolve().parent.parent


def test_summary_block_is_current():
    assert plot.main(["--check"]) == 0, "BENCHMARKS.md's summary is out of date: run python -m benchmarks plot"
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert text.index(plot.BEGIN) < 400, "the summary opens BENCHMARKS.md"
    assert (ROOT / "docs" / "img" / plot.CHART).stat().st_size < 200_000


def test_rows_and_ratios_come_from_the_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    base = {"title": "t", "command": "c", "date": "d", "machine": "m", "unit": "s"}
    (results / "a.json").write_text(json.dumps({**base, "benchmark": "a", "better": "lower",
                                                "series": {"warm": {"ours": 2.0, "theirs": 5.0}},
                                                "headline": {"series": "warm", "ours": "ours", "baseline": "theirs"}}))
    (results / "b.json").write_text(json.dumps({**base, "benchmark": "b", "better": "higher", "unit": "%",
                                                "series": {"acc": {"ours": 90, "theirs": 60}},
                                                "headline": {"series": "acc", "ours": "ours", "baseline": "theirs"}}))
    (results / "c.json").write_text(json.dumps({**base, "benchmark": "c", "better": "lower", "unit": "ms",
                                                "series": {"p99": {"submit": 25.0}},
                                                "headline": {"series": "p99", "ours": "submit", "target": 20}}))
    loaded = plot.load_results(results)
    assert [plot.ratio(r) for r in loaded] == [2.5, 1.5, 0.8]
    block = plot.summary(loaded)
    assert "| ours: 2 s | theirs: 5 s | **2.50x** lower is better |" in block
    assert "| target <= 20 ms | **missed** |" in block
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\nold text\n")
    assert plot.main(["--results", str(results), "--doc", str(doc), "--check"]) == 1
    if not _has_matplotlib():
        pytest.skip("matplotlib (the plot extra) is not installed")
    assert plot.main(["--results", str(results), "--doc", str(doc), "--charts", str(tmp_path / "img")]) == 0
    text = doc.read_text()
    assert text.startswith("# B\n\n## Summary\n\n" + plot.BEGIN) and text.endswith("old text\n")
    assert plot.main(["--results", str(results), "--doc", str(doc), "--charts", str(tmp_path / "img"), "--check"]) == 0
    assert "![the results above as charts](img/benchmarks-summary.png)" in text
    import numpy as np
    from PIL import Image

    with Image.open(tmp_path / "img" / plot.CHART) as img:
        pixels = np.asarray(img.convert("L"), dtype=float)
    assert img.size[0] >= 600 and pixels.std() > 10, "a drawn chart, not a blank image"


def test_a_malformed_result_is_refused_by_name(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"benchmark": "x", "title": "t", "command": "c", "date": "d",
                                                   "machine": "m", "unit": "s", "better": "faster", "series": {},
                                                   "headline": {}}))
    with pytest.raises(ValueError, match=r"bad.json: 'better' is 'faster' \(allowed: lower, higher\)"):
        plot.load_results(tmp_path)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_readme_opens_with_the_demo_picture():
    """The README's first element is the picture `python -m benchmarks readme_picture` draws (its layout: one
    tile per prompt, four per row), small enough for a README."""
    from PIL import Image

    from benchmarks import readme_picture as rp

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.split("\n")[2].startswith("![") and "(docs/img/readme-demo.png)" in readme.split("\n")[2]
    assert rp.OUT.stat().st_size < 250_000
    items = [(p, s, (np.full((64, 64, 3), 30 * i, np.uint8))) for i, (p, s) in enumerate(rp.PROMPTS)]
    sheet = rp.compose(items)
    with Image.open(rp.OUT) as committed:
        assert committed.size == sheet.size
        pixels = np.asarray(committed.convert("RGB"), dtype=float)
    assert pixels[8:8 + rp.TILE, 8:8 + rp.TILE].std() > 20, "the first tile is a picture, not a flat colour"
