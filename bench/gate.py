"""The show gate's threshold on real editing: what users would get at any threshold, read from one
`bench.lsp_replay` run, and the threshold chosen by the calibration's rule on a held-out history.

Every replay row keeps the gate's P(kept) (`confidence`) and what `gate: false` would have shown
(`pred_gate_off`); a gate only withholds, never changes a suggestion, so the figures at another
threshold follow from the same rows exactly. `--choose` applies `engine.gate.threshold_for` (the
strictest threshold keeping `--keep` of the characters users would keep with everything shown) to
these rows: run it on a history nobody evaluates on, then `--threshold` on the others. `--learn`
replays the rows in order as EVAL.md's user who accepts what the accept model keeps and rejects the
rest of what is shown, the gate's threshold moved after each decision as the server moves it
(`Gate.strength`, one record for all rows); `--aim` puts another expected acceptance in its place.

    python -m bench.gate --rows flask-rows.jsonl --choose [--keep 0.92] [--write engine/data/<model>/gate.json]
    python -m bench.gate --rows rows.jsonl --threshold T
    python -m bench.gate --rows rows.jsonl --learn engine/data/<model>/gate.json [--aim 0.5]
    python -m bench.gate --records gate-calibration-rows.jsonl.gz --gate engine/data/<model>/gate.json [--held-out]

`--records`: a gate (`--gate`) on `ghostline calibrate --gate-rows` decode records instead (every
record, or the third of the files the calibration holds out): its AUC and figures at its threshold.

Output: a table (gate off, the gate at the threshold), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.tasks import accept_figures
from ghostline.engine.calibration import held_out_files, json_lines, record_arrays
from ghostline.engine.gate import Gate, accepted, auc, outcome, threshold_for


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


def learning(rows: list[dict], p: np.ndarray, gate: Gate) -> dict:
    """The accept figures for a user who accepts what the accept model keeps and rejects the rest of
    what is shown, the threshold following their record (`Gate.strength` at strength 1)."""
    record, shown = (0, 0), []
    for r, q in zip(rows, p):
        text = r["pred_gate_off"] if q >= 0 and q >= gate.threshold_at(gate.strength(1.0, record)) else ""
        if text.strip():
            kept = bool(accepted(text, r["target"]).strip())
            record = (record[0] + kept, record[1] + (not kept))
        shown.append({**r, "pred": text})
    return {"tasks": len(rows), "threshold": round(gate.threshold_at(gate.strength(1.0, record)), 4),
            "record": list(record), **accept_figures(shown)}


def against_off(off: dict, on: dict) -> dict:
    """The gate's figures as the targets read them: wrong and kept share as multiples of the ungated
    ones, characters kept in percent of the ungated (`outcome` dicts)."""
    return {"wrong_x": on["wrong_per_100"] / max(off["wrong_per_100"], 1e-9),
            "chars_pct": 100 * on["chars_saved"] / max(off["chars_saved"], 1e-9),
            "accept_x": on["accept_pct"] / max(off["accept_pct"], 1e-9)}


def on_records(paths: list[str], gate: Gate, *, held_out: bool) -> dict:
    """A gate's ranking (AUC) and figures at its threshold on calibration decode records."""
    rows = json_lines([Path(p) for p in paths])
    if held_out:
        rows = [r for r, h in zip(rows, held_out_files(rows)) if h]
    X, y, chars = record_arrays(rows)
    p = gate.p_kept(X)
    off, on = outcome(p, y, chars, 0.0), outcome(p, y, chars, gate.threshold)
    ratio = against_off(off, on)
    return {k: round(float(v), 3) for k, v in {"records": len(rows), "auc": auc(p, y), "threshold": gate.threshold,
                                               **{f"off_{k}": v for k, v in off.items()},
                                               **{f"on_{k}": v for k, v in on.items()}, **ratio}.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", help="bench.lsp_replay rows files")
    ap.add_argument("--records", nargs="+", help="calibration decode records (ghostline calibrate --gate-rows)")
    ap.add_argument("--gate", help="with --records: the gate.json to score them with")
    ap.add_argument("--held-out", action="store_true", help="with --records: only the files the calibration holds out")
    ap.add_argument("--choose", action="store_true", help="choose the threshold on these rows")
    ap.add_argument("--keep", type=float, default=0.92, help="share of the ungated characters kept (--choose)")
    ap.add_argument("--threshold", type=float, help="report the figures at this threshold")
    ap.add_argument("--write", help="with --choose: set the threshold in this gate.json (its meta says where from)")
    ap.add_argument("--learn", metavar="GATE_JSON", help="replay a user's accepts and rejects through this gate")
    ap.add_argument("--aim", type=float, help="with --learn: the acceptance the strength rests at (default: the gate's)")
    args = ap.parse_args(argv)
    if args.records:
        if not args.gate or args.rows:
            ap.error("--records needs --gate and no --rows")
        print(json.dumps(on_records(args.records, Gate.load(Path(args.gate)), held_out=args.held_out)))
        return 0
    if not args.rows:
        ap.error("give --rows (or --records)")
    if args.choose + (args.threshold is not None) + bool(args.learn) != 1:
        ap.error("give exactly one of --choose, --threshold and --learn")
    if args.aim is not None and not (args.learn and 0 < args.aim < 1):
        ap.error("--aim needs --learn and a share in (0, 1)")
    if args.write and not args.choose:
        ap.error("--write needs --choose")
    rows = load(args.rows)
    if not rows:
        ap.error("no ghostline rows with pred_gate_off in those files")
    p, y, chars = arrays(rows)
    if args.learn:
        gate = Gate.load(Path(args.learn))
        if args.aim is not None:
            gate.meta = {**gate.meta, "gated": {**gate.meta.get("gated", {}), "accept_pct": 100 * args.aim}}
        off, on = at(rows, p, 0.0), learning(rows, p, gate)
    else:
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
