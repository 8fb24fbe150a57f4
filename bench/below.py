"""What the line below the cursor says about a suggestion: a signal for the show gate, measured
before it is built.

The gate reads what the first decoding steps know; on held-out code that ranks suggestions at AUC
0.75-0.80, short of what the accept target needs. The text below the cursor is one thing those
steps never read: a right suggestion usually makes the next non-blank line more likely, a wrong one
less. For each suggestion this scores the next non-blank line's tokens twice with the model, after
the suggestion's first line and without it (the document as the user has it, EVAL.md), and reads
three numbers: the mean log-probability with it, and the mean gain over without it, over the whole
line and over its first three tokens.

A second-stage logistic over the shipped gate's logit and those three is fitted on calibration
records nobody evaluates on (`--records`: stdlib and site-packages cursor tasks, their lines below
read back from the files they came from), its threshold chosen by the calibration's rule (keep 92 %
of the characters there). Then, for each replay (`--replay ROWS TASKS`: a `bench.lsp_replay` rows
file and its tasks), the shipped gate at its threshold against the second stage at that threshold,
both ranked by AUC, and the best accept ratio any threshold gives at 90 % of the characters on that
replay (a ceiling read off the replay itself, not a method). The scoring here is a full forward per
text (a reference, seconds a task); a gate in the server would score from the document's cache.

    python -m bench.below --records bench/results/gate-calibration-rows-seed1.jsonl.gz \
        --replay bench/results/replay-gate600-xeon-rows.jsonl ../shared/data/edits-requests.jsonl \
        [--replay ROWS TASKS ...] [--out scores.jsonl] [--scores earlier-scores.jsonl] [--cost 12 TASKS]

`--scores` reuses an earlier `--out` file's record log-probabilities (the same records), `--cost N`
times, on the first N tasks of TASKS, a completion against the forward a check would add.

Output: one line per set, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.gate import against_off, load as replay_rows
from bench.tasks import user_document
from ghostline.engine.calibration import find, json_lines
from ghostline.engine.gate import GATE_FILE, Gate, accepted, auc, logistic, outcome, record_features, threshold_for

KEEP_RULE = 0.92  # the calibration's rule: the strictest threshold keeping this share of the characters
KEEP_TARGET = 0.90  # the accept target's share of the characters, for the ceiling
BELOW_LINES = 20  # how far below the cursor's line the next non-blank line is looked for
ABOVE_CHARS = 3000  # the text above the cursor the reference forward reads


class Scorer:
    """Log-probabilities of a continuation after a text, one full forward each (the reference)."""

    def __init__(self, model: str | None = None):
        import torch

        from ghostline.engine.loader import load

        self.torch = torch
        loaded = load(model)
        self.model, self.tok = loaded.model, loaded.tokenizer

    def __call__(self, text: str, cont: str) -> list[float]:
        from ghostline.engine.cache import KVCache

        torch, a = self.torch, self.model.args
        head, ids = self.tok.encode(text)[0], self.tok.encode(text + cont)[0]
        k = 0
        while k < min(len(head), len(ids)) and head[k] == ids[k]:
            k += 1
        cut = max(0, len(ids) - 1024)
        ids, k = ids[cut:], max(1, k - cut)
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
        cache.reserve(len(ids))
        cache.length = len(ids)
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), torch.arange(len(ids)), cache)[0].float()  # [T, V]
        lp = torch.log_softmax(logits, -1)
        return lp[k - 1 : len(ids) - 1].gather(1, torch.tensor(ids[k:])[:, None])[:, 0].tolist()


class Stored:
    """A scorer that replays an earlier run's log-probabilities (`--out` rows of the records, in order)."""

    def __init__(self, rows: list[dict]):
        self.values = iter([v for r in rows for v in (r["with"], r["without"])])

    def __call__(self, text: str, cont: str) -> list[float]:
        try:
            return next(self.values)
        except StopIteration:
            raise SystemExit("--scores holds fewer records than --records gives: not from the same records") from None


def scores(score, above: str, line_before: str, shown: str, below: list[str]) -> dict | None:
    """The next non-blank line's log-probabilities after `shown`'s first line and without it; None
    when no line below is within reach or nothing is shown."""
    j = next((i for i, line in enumerate(below) if line.strip()), None)
    line = shown.split("\n", 1)[0]
    if j is None or not line.strip():
        return None
    gap = "".join(g + "\n" for g in below[:j])
    above = above[-ABOVE_CHARS:] + "\n"
    return {"with": score(above + line_before + line + "\n" + gap, below[j]), "without": score(above + gap, below[j])}


def features(s: dict) -> list[float]:
    """mean with, mean gain, mean gain over the first three tokens."""
    w, o = np.array(s["with"]), np.array(s["without"])
    return [w.mean(), w.mean() - o.mean(), w[:3].mean() - o[:3].mean()]


def cost(tasks_path: str, limit: int) -> dict:
    """What the check would add to a request in the server: on the server's engine settings (int8,
    code head), per task the second completion's time at the cursor of the user's document, and a
    forward over the document's cache of the suggestion, a line break and the next line (21 tokens,
    no LM head) as a check would feed it; medians in ms."""
    import statistics
    import time

    import torch

    from ghostline.engine.cache import ScratchCache
    from ghostline.engine.completion import CompletionOptions
    from ghostline.engine.engine import Engine, EngineOptions

    engine = Engine.load(None, options=EngineOptions(precision="int8", head="code"))
    opts, done, fed = CompletionOptions(drafts=3), [], []
    for n, task in enumerate(json_lines([Path(tasks_path)])[:limit]):
        text, offset = user_document(task)
        uri = f"file:///cost/{n}.py"
        engine.open(uri, text)
        engine.complete(uri, offset, opts)  # the first one pays for the encode
        t0 = time.perf_counter()
        out = engine.complete(uri, offset, opts)
        done.append((time.perf_counter() - t0) * 1e3)
        doc = engine.docs[uri]
        P = doc.token_at(doc.local(offset))
        rows = [[doc.ids[P - 1]] + engine.tok.encode(out.text + "\n        return self.value\n")[0][:20]]  # [1, 21]
        scratch = ScratchCache(doc.cache, P - 1, len(rows[0]))
        t0 = time.perf_counter()
        with torch.no_grad():
            engine.model(torch.tensor(rows), torch.arange(P - 1, P - 1 + len(rows[0])), scratch, return_hidden=True)
        fed.append((time.perf_counter() - t0) * 1e3)
        engine.close(uri)
    return {"tasks": len(done), "completion_ms_p50": round(statistics.median(done), 1),
            "forward_21_tokens_ms_p50": round(statistics.median(fed), 1)}


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def record_below(r: dict) -> list[str] | None:
    """The lines below a calibration record's cursor, read back from its file (None: not found)."""
    try:
        lines = Path(r["path"]).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    above = r["above"].split("\n")
    for row in range(len(above), len(lines)):
        if lines[row].strip() == r["target"].strip() and lines[row - len(above) : row] == above:
            return lines[row + 1 : row + 1 + BELOW_LINES]
    return None


def task_rows(rows_path: str, tasks_path: str, score: Scorer, gate: Gate, out) -> tuple[np.ndarray, ...]:
    """Per request: the shipped gate's P(kept) (-1: nothing to show), the second stage's inputs (NaN
    without a line below), kept or not, characters kept."""
    tasks = {t["id"]: t for t in json_lines([Path(tasks_path)])}
    p, z, y, chars = [], [], [], []
    for r in replay_rows([rows_path]):
        shown = r["pred_gate_off"]
        doc, _ = user_document(tasks[r["id"]])
        c = tasks[r["id"]]["cursor"]
        lines = doc.split("\n")
        s = scores(score, "\n".join(lines[: c["line"]]), lines[c["line"]][: c["character"]], shown,
                   lines[c["line"] + 1 : c["line"] + 1 + BELOW_LINES]) if shown.strip() else None
        kept = accepted(shown, r["target"]) if shown.strip() else ""
        conf = -1.0 if not shown.strip() else float(r["confidence"])
        p.append(conf)
        z.append([float(logit(np.array(max(conf, 0.0))))] + (features(s) if s else [np.nan] * 3))
        y.append(float(bool(kept.strip())))
        chars.append(float(len(kept)))
        if out:
            out.write(json.dumps({"set": rows_path, "id": r["id"], **(s or {})}) + "\n")
    return np.array(p), np.array(z), np.array(y), np.array(chars)


def ratios(p: np.ndarray, y: np.ndarray, chars: np.ndarray, threshold: float) -> dict:
    r = against_off(outcome(p, y, chars, 0.0), outcome(p, y, chars, threshold))
    return {"wrong_x": round(r["wrong_x"], 3), "chars_pct": round(r["chars_pct"], 1), "accept_x": round(r["accept_x"], 3),
            "threshold": round(threshold, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True, help="calibration decode records to fit the second stage on")
    ap.add_argument("--replay", nargs=2, action="append", default=[], metavar=("ROWS", "TASKS"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", help="write each scored text's log-probabilities here (JSON lines)")
    ap.add_argument("--cost", nargs=2, metavar=("N", "TASKS"),
                    help="also time what the check would add to a request, on the first N tasks of TASKS")
    ap.add_argument("--scores", help="an earlier --out file: its records' log-probabilities, instead of scoring them again")
    args = ap.parse_args(argv)
    from ghostline.engine.loader import model_stem

    path = find(model_stem(args.model), GATE_FILE)
    if path is None:
        sys.exit(f"no show gate calibrated for {model_stem(args.model)}")
    gate, score = Gate.load(path), Scorer(args.model)
    out = open(args.out, "w") if args.out else None

    recs = [r for r in json_lines([Path(args.records)]) if r["drafts"]]
    stored = [r for r in json_lines([Path(args.scores)]) if r["set"] == args.records] if args.scores else None
    score_records = Stored(stored) if stored is not None else score
    Z, y, chars = [], [], []
    for n, r in enumerate(recs, 1):
        below = record_below(r)
        s = scores(score_records, r["above"], r["line_before"], r["drafts"][0], below) if below is not None else None
        if s is None:
            continue
        Z.append([float(logit(gate.p_kept(record_features(r)[None]))[0])] + features(s))
        y.append(float(r["kept"]))
        chars.append(float(r["chars"]))
        if stored is not None and stored[len(y) - 1]["path"] != r["path"]:
            sys.exit("--scores is not from the same records")
        if out:
            out.write(json.dumps({"set": args.records, "path": r["path"], **s}) + "\n")
        if n % 50 == 0:
            print(f"[records {n}/{len(recs)}]", file=sys.stderr, flush=True)
    Z, y, chars = np.array(Z), np.array(y), np.array(chars)
    mu, sd = Z.mean(0), Z.std(0)
    sd[sd < 1e-9] = 1.0
    w, b = logistic((Z - mu) / sd, y)

    def stage2(z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(((z - mu) / sd) @ w + b)))

    t2 = threshold_for(stage2(Z), y, chars, keep_chars=KEEP_RULE)
    result = {"records": {"n": len(y), "auc_shipped": round(auc(Z[:, 0], y), 4), "auc_fit_in_sample": round(auc(stage2(Z), y), 4),
                          "threshold": round(t2, 4), "weights": [round(float(v), 4) for v in w]}}
    print(json.dumps(result["records"]))
    for rows_path, tasks_path in args.replay:
        p, z, yq, cq = task_rows(rows_path, tasks_path, score, gate, out)
        has = (p >= 0) & ~np.isnan(z[:, 1])
        p2 = p.copy()
        p2[has] = stage2(z[has])  # requests with no line below keep the shipped gate's P(kept)
        shown = p >= 0
        name = Path(rows_path).stem
        result[name] = {
            "tasks": len(p), "with_line_below": int(has.sum()),
            "auc_shipped": round(auc(p[shown], yq[shown]), 4), "auc_below": round(auc(p2[shown], yq[shown]), 4),
            "shipped": ratios(p, yq, cq, gate.threshold), "below": ratios(p2, yq, cq, t2),
            "ceiling_shipped": ratios(p, yq, cq, threshold_for(p, yq, cq, keep_chars=KEEP_TARGET)),
            "ceiling_below": ratios(p2, yq, cq, threshold_for(p2, yq, cq, keep_chars=KEEP_TARGET))}
        print(name, json.dumps(result[name]), flush=True)
    if out:
        out.close()
    if args.cost:
        result["cost"] = cost(args.cost[1], int(args.cost[0]))
        print("cost", json.dumps(result["cost"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
