"""What every benchmark script shares: timing (medians after a warm-up), the machine line of a PERF.md section,
and the marked-section update of docs/PERF.md (other sections stay byte for byte). Scripts import it as
``from _common import ...`` (a script's own directory is on sys.path). The timing and the machine line live in
dsv4.runtimes.bench (``dsv4 bench`` measures with them too) and are re-exported here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from dsv4.runtimes.bench import decode_ms, machine, ratio, step_times, timed  # noqa: F401 (re-exported)


def add_common_args(p, prefill: list[int], decode_steps: int, repeat: int) -> None:
    """The options every benchmark takes: preset, prompt lengths, decode steps, repeats, threads, workdir, output."""
    p.add_argument("--preset", default="small")
    p.add_argument("--prefill", type=int, nargs="+", default=prefill, help="prompt lengths of the prefill timings")
    p.add_argument("--decode-steps", type=int, default=decode_steps)
    p.add_argument("--repeat", type=int, default=repeat)
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each side (default 1: on a shared 2-core box a 2-thread pool collapses whenever "
                        "the other core is busy; eager small decode measured 0.3 s/step at 1 thread, 6.3 s at 2)")
    p.add_argument("--workdir", help="keep (and reuse) the checkpoint, artifacts and libraries here, not a temp dir")
    p.add_argument("--out", default="docs/PERF.md", help="markdown file to update ('-' prints only)")


def update_section(path: Path, md: str, tag: str) -> None:
    """Replace the block between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` of `path` (or append it)."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else "# dsv4 performance notes\n"
    block = f"{begin}\n{md.rstrip()}\n{end}"
    pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# Runs a command in a child and prints its peak RSS (kB, Linux ru_maxrss of the waited-for child), CPU and wall time
# as JSON, so that each measured step's RSS is its own (checkpoint_flash.py, export_flash.py).
RUNNER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print("@@" + json.dumps({"rc": rc, "wall_s": time.perf_counter() - t, "rss_kb": r.ru_maxrss, "user_s": r.ru_utime,
                         "sys_s": r.ru_stime}))
"""


def measure(cmd: list[str]) -> dict:
    """RUNNER's numbers for `cmd`, plus the 1- and 5-minute load averages after it (the machine may be shared)."""
    p = subprocess.run([sys.executable, "-c", RUNNER, *cmd], capture_output=True, text=True)
    load = os.getloadavg()
    res: dict = {"loadavg_1min_after": load[0], "loadavg_5min_after": load[1]}
    for line in (p.stdout + p.stderr).splitlines():
        if line.startswith("@@"):
            res.update(json.loads(line[2:]))
    if p.returncode or res.get("rc"):
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return res
