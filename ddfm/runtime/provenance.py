"""What produced a result: the code's commit, the library versions, the CPU, threads and date.

    from ddfm.runtime.provenance import provenance, versions
    write_json(out / "eval.json", {..., "provenance": provenance()})

Every result file (REPORT.md, ABLATE.md, eval.json, the benchmarks' ``--json``) carries
:func:`provenance`, so a figure can be traced to the commit, the lock and the machine that
printed it. Versions are read from the installed distributions' metadata (no heavy import).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# the distributions whose versions can move a figure
LIBRARIES = ("ddfm", "torch", "transformers", "tokenizers", "numpy", "numba", "scipy", "scikit-learn",
             "faiss-cpu", "safetensors")
# x86 and Arm vector extensions worth naming (from /proc/cpuinfo's flags or Features)
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "neon", "asimd", "sve", "sve2")


def versions() -> dict[str, str]:
    """Versions of Python and of :data:`LIBRARIES` that are installed (missing ones left out)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def cpu() -> dict[str, Any]:
    """The CPU's model name, its vector extensions and the logical core count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
            "logical_cores": os.cpu_count()}


def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ddfm's code (``None`` outside one)."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def threads() -> dict[str, Any]:
    """torch's intra-op thread count (when torch is already imported) and the OMP setting."""
    import sys

    out: dict[str, Any] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.get_num_threads()
    return out


def provenance() -> dict[str, Any]:
    """Everything above plus the date (UTC, ISO 8601) and the platform."""
    return {**git_commit(), "versions": versions(), "cpu": cpu(), "threads": threads(),
            "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def provenance_lines(p: dict[str, Any] | None = None) -> list[str]:
    """:func:`provenance` as Markdown bullet lines for a report's footer."""
    p = provenance() if p is None else p
    commit = "unknown" if p["commit"] is None else p["commit"][:12] + (" (dirty tree)" if p["dirty"] else "")
    libs = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    c = p["cpu"]
    return [f"- commit: {commit}", f"- versions: {libs}",
            f"- CPU: {c['model']} ({c['logical_cores']} logical cores; {' '.join(c['vector_extensions']) or 'no'} "
            "vector extensions listed)",
            f"- threads: {', '.join(f'{k} {v}' for k, v in p['threads'].items())}", f"- date: {p['date']}"]
