"""What the benchmarks share: interleaved timing with medians, allocator-level memory accounting, output."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

RESULTS = Path(__file__).resolve().parent / "results"


def median_times(candidates: dict, repeats: int, number: int) -> dict[str, float]:
    """Median seconds per call of each candidate. Candidates take turns within every repeat,
    so a slow spell of the machine hits them all alike instead of skewing one."""
    samples = {name: [] for name in candidates}
    for fn in candidates.values():  # warm up: first-call allocations, lazy init
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(s) for name, s in samples.items()}


class PeakAllocatedBytes:
    """Peak bytes the CPU allocator holds, above what it held at the start, while active.

    Each of torch.profiler's memory events carries the allocator's running total, so a
    temporary allocated and freed inside one op (as torch's own BN backward does) counts,
    and a view never does. The CPU stand-in for ``torch.cuda.max_memory_allocated``.
    """

    def __enter__(self) -> "PeakAllocatedBytes":
        self._profile = torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace.json"
            self._profile.export_chrome_trace(str(trace))
            events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
        events.sort(key=lambda e: e["ts"])
        totals = [e["args"]["Total Allocated"] for e in events]
        start = totals[0] - events[0]["args"]["Bytes"] if events else 0
        self.peak = max(totals, default=start) - start


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        # glibc's allocator settings, when set: they decide whether freed memory is page-faulted back in.
        "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), and how many cores this process may use."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or 'unknown'}, {len(os.sched_getaffinity(0))} cores"


def write_results(name: str, rows: list[dict], table: str, title: str | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (what ran: the command, the machine, every row) and ``<name>.md`` (the
    table), which docs/make_pages.py turns into docs/performance.md."""
    RESULTS.mkdir(exist_ok=True)
    script = sys.modules["__main__"]
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    title = title or (script.__doc__ or name).strip().splitlines()[0]
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"title": title, "command": command, "environment": environment(), "rows": rows},
                               indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, header: list[str], table: list[list], rows: list[dict]) -> None:
    """Print the title and the table, and write both results files (see write_results)."""
    text = markdown_table(header, table)
    print(title)
    print(text)
    print("written", write_results(name, rows, text, title))


def add_blog_arguments(parser, out: Path) -> None:
    """The options the blog's benchmarks (blog_memory.py, blog_accuracy.py) share."""
    parser.add_argument("--train-steps", type=int, default=None, help="training steps per epoch (default: all 3750)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None, help="torchvision root (default: bn_lightning.training.data.resolve_data_dir())")
    parser.add_argument("--out", type=Path, default=out)


def write_run_results(out: Path, name: str, rows: list[dict], args, summary: dict, markdown: str) -> None:
    """``<name>.csv`` (one row per measurement), ``<name>.json`` (environment, options, summary) and
    ``<name>.md`` into ``out``, a results/ folder of the repository."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps(
        {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    print("written", out / f"{name}.md")
