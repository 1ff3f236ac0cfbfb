"""The benchmark harness still runs (tiny sizes, unclip only, no peers); no timings are checked."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_run_quick_unclip(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--impl", "unclip",
                           "--inprocess", "--threads", "1", "--json", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["workloads"]) == {"W1", "W2", "W3", "W4"}
    assert result["workloads"]["W1"]["images_per_s"] > 0
    assert result["workloads"]["W2"]["samples_per_s"] > 0
    assert result["workloads"]["W3"]["s_per_image"] > 0
    assert set(result["workloads"]["W4"]) == {"s_per_image", "peak_rss_mib"}
    assert result["peers"] == {}
    text = md.read_text()
    assert "<!-- BEGIN results -->" in text and "| W4 | s_per_image | unclip |" in text


def test_update_section_keeps_other_sections(tmp_path):
    import report

    path = tmp_path / "B.md"
    report.update_section("a", "first", path)
    report.update_section("b", "second", path)
    report.update_section("a", "again", path)
    text = path.read_text()
    assert "again" in text and "second" in text and "first" not in text
    assert text.count("<!-- BEGIN a -->") == 1
