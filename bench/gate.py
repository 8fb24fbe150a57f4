"""The show gate's threshold on real editing: what users would get at any threshold, read from one
`bench.lsp_replay` run, and the threshold chosen by the calibration's rule on a held-out history.

Every replay row keeps the gate's P(kept) (`confidence`) and what `gate: false` would have shown
(`pred_gate_off`); a gate only withholds, never changes a suggestion, so the figures at another
threshold follow from the same rows exactly. `--choose` applies `engine.gate.threshold_for` (the
strictest threshold keeping `--keep` of the characters users would keep with everything shown) to
these rows: run it on a history nobody evaluates on, then `--threshold` on the others.

    python -m bench.gate --rows flask-rows.jsonl --choose [--keep 0.92] [--write engine/data/<model>/gate.json]
    python -m bench.gate --rows rows.jsonl --threshold T

Output: a table (gate off, the gate at the threshold), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.tasks import accept_figures
from ghostline.engine.gate import accepted, threshold_for


def load(paths: list[str]) -> list[dict]:
    """The ghostline rows of replay files (one per request, the last one of a repeated id)."""
    rows = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r.get("system") == "ghostline" and "pred_gate_off" in r:
                rows[(r["set"], r["id"])] = r
    return list(rows.values())


def arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(kept) per request (-1: nothing to show; 1: the gate did not run), kept or not, characters kept."""
    p, y, chars = [], [], []
    for r in rows:
        shown = r["pred_gate_off"]
        kept = accepted(shown, r["target"]) if shown.strip() else ""
        conf = r.get("confidence")
        p.append(-1.0 if not shown.strip() else 1.0 if conf is None else float(conf))
        y.append(float(bool(kept.strip())))
        chars.append(float(len(kept)))
    return np.array(p), np.array(y), np.array(chars)


def at(rows: list[dict], p: np.ndarray, threshold: float) -> dict:
    """The accept figures when the suggestions with P(kept) >= threshold are shown."""
    shown = [{**r, "pred": r["pred_gate_off"] if q >= threshold else ""} for r, q in zip(rows, p)]
    return {"tasks": len(rows), "threshold": round(threshold, 4), **accept_figures(shown)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", required=True, help="bench.lsp_replay rows files")
    ap.add_argument("--choose", action="store_true", help="choose the threshold on these rows")
    ap.add_argument("--keep", type=float, default=0.92, help="share of the ungated characters kept (--choose)")
    ap.add_argument("--threshold", type=float, help="report the figures at this threshold")
    ap.add_argument("--write", help="with --choose: set the threshold in this gate.json (its meta says where from)")
    args = ap.parse_args(argv)
    if args.choose == (args.threshold is not None):
        ap.error("give exactly one of --choose and --threshold")
    if args.write and not args.choose:
        ap.error("--write needs --choose")
    rows = load(args.rows)
    if not rows:
        ap.error("no ghostline rows with pred_gate_off in those files")
    p, y, chars = arrays(rows)
    t = threshold_for(p, y, chars, keep_chars=args.keep) if args.choose else args.threshold
    off, on = at(rows, p, 0.0), at(rows, p, t)
    print("| gate | tasks | threshold | shown % | accept % | chars saved | wrong /100 |\n|---|---|---|---|---|---|---|")
    for name, f in (("off", off), ("on", on)):
        print(f"| {name} | {f['tasks']} | {f['threshold']} | {f['shown_pct']} | {f['accept_pct']} | {f['chars_saved']} | "
              f"{f['wrong_per_100']} |")
    if args.write:
        path = Path(args.write)
        gate = json.loads(path.read_text())
        gate["threshold"] = t
        gate["meta"]["threshold_from"] = {"rows": [Path(r).name for r in args.rows], "tasks": len(rows),
                                          "keep_chars": args.keep, "off": off, "on": on}
        path.write_text(json.dumps(gate, indent=1) + "\n")
    print(json.dumps({"off": off, "on": on}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
