"""What the mixed-precision training benchmarks (train_step.py, seg_train.py) share: fp32 and mixed precision each
timed in a process of its own (so that each peak memory is its own), or both in this process for a smoke run, and
the report written where ``--out`` says."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

MODES = ("fp32", "mixed")


def compare_modes(script: str, args: argparse.Namespace, run_mode: Callable[[argparse.Namespace], dict],
                  flags: Sequence[str]) -> dict[str, dict]:
    """{mode: run_mode's result} for both modes: ``script --mode M *flags`` in a subprocess each, or with
    ``args.in_process`` here."""
    results = {}
    for mode in MODES:
        if args.in_process:
            results[mode] = run_mode(argparse.Namespace(**{**vars(args), "mode": mode}))
            continue
        out = subprocess.run([sys.executable, script, "--mode", mode, *flags], check=True, capture_output=True,
                             text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    return results


def write_report(report: dict, out: str | None, default: Path) -> None:
    """Write ``report`` as JSON to ``out`` (else ``default``) and print it."""
    path = Path(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
