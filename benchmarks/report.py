"""docs/BENCHMARKS.md: one file, one marked section per script (run.py, levers.py, roofline.py, ...), plus the
machine description every section is measured on. Kept free of torch so run.py can import it anywhere."""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MARKDOWN = ROOT / "docs" / "BENCHMARKS.md"

TITLE = """# Benchmarks

Side-by-side speed of unclip, [DALLE2-pytorch](https://github.com/lucidrains/DALLE2-pytorch) and diffusers' unCLIP
classes on the same workloads, random weights, the same sizes, each at its defaults (see "What is compared").
Regenerate on a quiet machine (nothing else running):

```
bash benchmarks/setup_peers.sh                                  # once: the peers' virtual environments
python benchmarks/run.py --json benchmarks/results.json         # W1-W4, 3 rounds, this file's results section
python benchmarks/levers.py                                     # unclip's speed levers on W1/W3, bf16 accuracy
python benchmarks/roofline.py                                   # decoder FLOPs vs this CPU's matmul peaks
python benchmarks/time_generate.py --model emoji                # `unclip generate`: warm and cold start
python benchmarks/quality_vs_steps.py --model M --data D/test   # time to equal quality (DPM-Solver++ vs 50 steps)
```
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over the next `seconds` (from /proc/stat): other work running right now."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]          # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": cores, "cpu_flags": cpu_flags(), "os": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_busy_at_start": cpu_busy()}


def machine_markdown(m: dict) -> str:
    busy = m.get("cpu_busy_at_start")
    return (f"- date: {m['date']}\n- CPU: {m['cpu']} ({m['cores']} cores available; {', '.join(m['cpu_flags'])})\n"
            f"- OS: {m['os']}\n- CPU busy with other work when the run started: "
            + (f"{busy:.0%}" if busy is not None else "unknown") + f" (load average {m['load_average']})"
            + ("  **(machine busy: timings are not valid)**" if busy is not None and busy > 0.25 else ""))


def update_section(name: str, text: str, path: str | os.PathLike | None = None) -> Path:
    """Replace (or append) the section between <!-- BEGIN name --> and <!-- END name --> in BENCHMARKS.md."""
    path = Path(path) if path else DEFAULT_MARKDOWN
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = path.read_text() if path.exists() else TITLE
    block = f"<!-- BEGIN {name} -->\n{text.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc)
    os.replace(tmp, path)
    return path


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
