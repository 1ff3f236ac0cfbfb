"""The benchmark harness still runs (tiny sizes, unclip only, no peers); no timings are checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_quality_vs_steps_per_stage_configs(tiny_model_dir, tmp_path):
    import quality_vs_steps

    from unclip.data.shapes import build_shapes

    configs = quality_vs_steps.parse_configs("ddim:3/upsampler=ddim:2,dpm++:2", ["decoder"])
    assert configs == [("ddim:3/upsampler=ddim:2", {"decoder_sampler": "ddim", "decoder_steps": 3,
                                                     "upsampler_sampler": "ddim", "upsampler_steps": 2}),
                       ("dpm++:2", {"decoder_sampler": "dpm++", "decoder_steps": 2})]
    assert quality_vs_steps.parse_configs("ddim:3/guide=0.3-1", ["decoder"])[0][1] == {
        "decoder_sampler": "ddim", "decoder_steps": 3, "decoder_guidance_interval": (0.3, 1.0)}
    with pytest.raises(SystemExit, match="guide=LOW-HIGH"):
        quality_vs_steps.parse_configs("ddim:3/guide=0.3", ["decoder"])
    build_shapes(tmp_path / "shapes", 40, seed=0, test_fraction=0.25, progress=False)
    for score, flag in (("shapes oracle", "--shapes"), ("R-precision top-5", "--no-shapes")):
        md = tmp_path / f"{flag}.md"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality_vs_steps.py"), "--model",
                               str(tiny_model_dir), "--data", str(tmp_path / "shapes" / "test"), "--n", "6",
                               "--stages", "decoder", "--configs", "ddim:3/upsampler=ddim:2,dpm++:2", flag,
                               "--batch-size", "3", "--markdown", str(md)], capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = md.read_text()
        assert "| ddim:3/upsampler=ddim:2 |" in table and "| dpm++:2 |" in table and "±" in table
        assert f"{score} vs reference (paired)" in table
