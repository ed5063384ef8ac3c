"""A table of runs: ``wordlm-runs [FOLDER ...]`` (or ``python -m wordlm.runs``).

Every run under the folders (a folder holding a ``metrics.json``, at any depth: ``outputs/``, ``multirun/``, a
sweep's folder) is one row: its name, status, why it stopped, epochs, minutes, best validation perplexity,
test perplexity (and the adapted ones where ``trainer.final_eval`` scored them), parameters. It reads the
``metrics.json`` files only (no torch, no checkpoints), so it is instant on any number of runs. A file that cannot
be read is listed as ``unreadable`` with the reason; the other runs still print.

    wordlm-runs outputs multirun --sort test --status completed --where model.name=lstm --format markdown
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# (column, how it reads from metrics.json); the adapted test columns appear only when some run has them.
COLUMNS = {
    "run": lambda m: m.get("run_name") or "",
    "status": lambda m: m.get("status"),
    "stop": lambda m: m.get("stop_reason"),
    "epochs": lambda m: m.get("epochs"),
    "minutes": lambda m: None if m.get("seconds") is None else m["seconds"] / 60,
    "valid": lambda m: m.get("best_valid_ppl"),
    "test": lambda m: m.get("test_ppl"),
    "test_cache": lambda m: m.get("test_ppl_cache"),
    "test_dynamic": lambda m: m.get("test_ppl_dynamic"),
    "test_both": lambda m: m.get("test_ppl_both"),
    "params": lambda m: m.get("params"),
}
OPTIONAL = ("test_cache", "test_dynamic", "test_both")
FORMATS = ("text", "csv", "json", "markdown")


class RunsError(Exception):
    """A mistake on the command line: one line, exit 2."""


def find(folders: Sequence[Path]) -> List[Path]:
    """Every metrics.json under ``folders`` (a folder that is itself a run counts), sorted by path."""
    found = set()
    for folder in folders:
        if not folder.exists():
            raise RunsError(f"{folder} does not exist: give run folders or the folders above them "
                            f"(e.g. outputs multirun)")
        if folder.is_file():
            if folder.name != "metrics.json":
                raise RunsError(f"{folder} is a file: give a run folder (holding metrics.json) or a folder above runs")
            found.add(folder)
            continue
        found.update(_walk(folder))
    # One row per run: a run reached twice (a symlink to a folder also given or walked) is listed once.
    unique: Dict[Path, Path] = {}
    for path in sorted(found):
        unique.setdefault(path.resolve(), path)
    return sorted(unique.values())


def _walk(folder: Path) -> List[Path]:
    """metrics.json files under ``folder``, following symlinked folders (runs gathered by links from
    elsewhere are runs too; ``Path.rglob`` skips them before Python 3.13) but never into a folder twice, so a
    link back up the tree ends instead of looping."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        if "metrics.json" in files:
            found.append(Path(top) / "metrics.json")
    return found


def read(path: Path) -> Dict[str, Any]:
    """One row: the columns, the run's folder, and its flat config (for --where); unreadable files say why."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
        row = {k: f(m) for k, f in COLUMNS.items()}
        for k, v in row.items():
            if v is not None and not isinstance(v, (str, int, float)):
                raise ValueError(f"{k} is {type(v).__name__}")
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {"run": path.parent.name, "status": "unreadable", "stop": why[:80], "folder": str(path.parent),
                "config": {}}
    row["run"] = row["run"] or path.parent.name
    row["folder"] = str(path.parent)
    row["config"] = m.get("config") if isinstance(m.get("config"), dict) else {}
    return row


def _matches(row: Dict[str, Any], where: Sequence[str]) -> bool:
    for cond in where:
        key, value = cond.split("=", 1)
        have = row["config"].get(key)
        if have is None or str(have).lower() != value.lower() and not _same_number(have, value):
            return False
    return True


def _same_number(have: Any, value: str) -> bool:
    try:
        return float(have) == float(value)
    except (TypeError, ValueError):
        return False


def _sorted(rows: List[Dict[str, Any]], column: str, reverse: bool) -> List[Dict[str, Any]]:
    """By ``column``; rows without a value (or NaN) last either way."""
    def missing(r):
        v = r.get(column)
        return v is None or (isinstance(v, float) and math.isnan(v))

    have = [r for r in rows if not missing(r)]
    numeric = all(isinstance(r[column], (int, float)) for r in have)
    have.sort(key=lambda r: r[column] if numeric else str(r[column]), reverse=reverse)
    return have + [r for r in rows if missing(r)]


def _cell(v: Any, column: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if column == "minutes":
            return f"{v:.1f}"
        if column == "epochs":
            return f"{v:.2f}".rstrip("0").rstrip(".")
        return f"{v:.2f}"
    if column == "params" and isinstance(v, int):
        return f"{v / 1e6:.2f}M"
    return str(v)


def render(rows: List[Dict[str, Any]], columns: List[str], fmt: str) -> str:
    if fmt == "json":  # (NaN, which JSON lacks, as null)
        def plain(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return json.dumps([{**{c: plain(r.get(c)) for c in columns}, "folder": r["folder"]} for r in rows],
                          indent=1, default=str) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow([*columns, "folder"])
        for r in rows:
            w.writerow([*("" if r.get(c) is None else r.get(c) for c in columns), r["folder"]])
        return out.getvalue()
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wordlm-runs", description="A table of the runs under the given folders, "
                                "read from their metrics.json files.")
    p.add_argument("folders", nargs="*", type=Path,
                   help="run folders or folders above them (default: outputs and multirun, those that exist)")
    p.add_argument("--sort", default="valid", help=f"column to sort by, ascending: {', '.join(COLUMNS)} "
                   "(default valid; missing values last)")
    p.add_argument("--reverse", action="store_true", help="sort descending")
    p.add_argument("--status", action="append", default=[],
                   help="only runs with this status (completed, interrupted, failed, unreadable); repeatable")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs whose config has KEY=VALUE (e.g. model.name=lstm); repeatable")
    p.add_argument("--format", default="text", choices=FORMATS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.sort not in COLUMNS:
            raise RunsError(f"--sort {args.sort}: use one of {', '.join(COLUMNS)}")
        bad = [w for w in args.where if "=" not in w or not w.split("=", 1)[0]]
        if bad:
            raise RunsError(f"--where {bad[0]}: use KEY=VALUE, a config key as metrics.json's config holds it "
                            f"(e.g. --where model.name=lstm)")
        folders = args.folders or [f for f in (Path("outputs"), Path("multirun")) if f.exists()] or [Path("outputs")]
        paths = find(folders)
        if not paths:
            raise RunsError(f"no runs under {' '.join(map(str, folders))}: a run folder holds metrics.json, which "
                            f"train.py writes when a run ends")
        rows = [read(p) for p in paths]
        rows = [r for r in rows if (not args.status or r["status"] in args.status) and _matches(r, args.where)]
        rows = _sorted(rows, args.sort, args.reverse)
        columns = [c for c in COLUMNS if c not in OPTIONAL or any(r.get(c) is not None for r in rows)]
        sys.stdout.write(render(rows, columns, args.format))
        if not rows:
            sys.stderr.write(f"wordlm-runs: {len(paths)} run(s) found, none matches the filters\n")
        return 0
    except RunsError as e:
        sys.stderr.write(f"wordlm-runs: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
