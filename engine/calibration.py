"""Per-model calibration artifacts, one file each in the model's calibration folder: the user's cache
(`ghostline calibrate` writes there) wins over the copies committed for the embedded models in
`engine/data/<model>/` (made by the command recorded beside them in `engine/data/README.md`)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ghostline.engine import vocab
from ghostline.engine.loader import cache_dir

PACKAGED = Path(__file__).parent / "data"
STEPS = ("vocab", "adadec", "exits", "gate")


def user_folder(model: str) -> Path:
    return cache_dir() / "calibration" / model


def find(model: str, name: str) -> Path | None:
    """The artifact `name` for `model` (a model file's stem), or None when it was never calibrated."""
    for folder in (user_folder(model), PACKAGED / model):
        if (folder / name).is_file():
            return folder / name
    return None


def load_json(model: str, name: str) -> dict | None:
    path = find(model, name)
    return None if path is None else json.loads(path.read_text())


def load_vocab(model: str) -> np.ndarray | None:
    path = find(model, "vocab.npy")
    return None if path is None else np.load(path)


def calibrate_vocab(tokenizer, model: str, roots: Iterable[Path], *, exclude: Iterable[str] = (),
                    out: Path | None = None, progress: Callable[[str], None] = print) -> Path:
    """Count ids over the code under `roots`, write `vocab.npy` (and how it was made) for `model`."""
    t0 = time.perf_counter()
    roots, exclude = [Path(r) for r in roots], list(exclude)
    files = vocab.corpus_files(roots, exclude=exclude)
    progress(f"vocabulary: {len(files)} files under {', '.join(map(str, roots))}")
    counts = vocab.count_ids(tokenizer, files, progress=progress)
    ids = vocab.code_vocab(tokenizer, counts)
    folder = out or user_folder(model)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "vocab.npy", ids)
    meta = {"files": len(files), "tokens": sum(counts.values()), "seen": len(counts), "rows": len(ids),
            "vocab_size": tokenizer.vocab_size, "roots": [str(r) for r in roots], "exclude": exclude,
            "seconds": round(time.perf_counter() - t0, 1)}
    (folder / "vocab.json").write_text(json.dumps(meta, indent=1) + "\n")
    progress(f"vocabulary: {len(ids)} of {tokenizer.vocab_size} tokens kept -> {folder / 'vocab.npy'}")
    return folder / "vocab.npy"


def code_files(roots: Iterable[Path], *, exclude: Iterable[str] = ()) -> list[Path]:
    """Source files under `roots` for the teacher-forced fits, languages interleaved (a stable order)."""
    files = vocab.corpus_files([Path(r) for r in roots], exclude=list(exclude), per_suffix=200)
    files = [f for f in files if f.suffix in {".py", ".js", ".ts", ".c", ".h", ".lua", ".go", ".rs", ".java"}]
    files.sort(key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())
    return files


def teacher_forced(model, tokenizer, files: list[Path], *, tokens_per_file: int):
    """(path, ids, cache) for each readable file of at least 32 tokens: its first `tokens_per_file`
    ids and an empty cache sized for them, for a teacher-forced pass."""
    from ghostline.engine.cache import KVCache

    a = model.args
    for path in files:
        try:
            ids = tokenizer.encode(path.read_text(encoding="utf-8"))[0][:tokens_per_file]
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) < 32:
            continue
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
        cache.reserve(len(ids))
        cache.length = len(ids)
        yield path, ids, cache


@torch.no_grad()
def collect_entropies(model, tokenizer, files: list[Path], *, tokens_per_file: int = 1024, budget: int = 60_000,
                      progress: Callable[[str], None] = print, ranks: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced pass over real code: per position, the next-token entropy (nats) and whether the
    greedy token is the true next token. At most `tokens_per_file` from each file, `budget` in all.
    With `ranks`, each position's rank of the true token (0: the greedy token) is appended to it."""
    from ghostline.engine.decoding.adadec import entropy

    hs, right, seen = [], [], 0
    for path, ids, cache in teacher_forced(model, tokenizer, files, tokens_per_file=tokens_per_file):
        hidden = torch.cat([model(torch.tensor([ids[s : s + 256]]), torch.arange(s, min(len(ids), s + 256)), cache,
                                  return_hidden=True)[0] for s in range(0, len(ids), 256)])  # [T, D]
        for s in range(0, len(ids) - 1, 128):
            logp = torch.log_softmax(model.head(hidden[s : min(s + 128, len(ids) - 1)]).float(), -1)
            target = torch.tensor(ids[s + 1 : s + 1 + len(logp)])
            hs += [entropy(row) for row in logp]
            right += (logp.argmax(-1) == target).tolist()
            if ranks is not None:
                ranks += (logp > logp.gather(-1, target[:, None])).sum(-1).tolist()
        seen += len(ids)
        progress(f"entropies: {seen} tokens from {path.name}")
        if seen >= budget:
            break
    return np.array(hs), np.array(right)


def calibrate_adadec(model, tokenizer, name: str, roots: Iterable[Path], *, exclude: Iterable[str] = (),
                     out: Path | None = None, budget: int = 60_000, progress: Callable[[str], None] = print) -> Path:
    """Fit AdaDec's entropy threshold on teacher-forced code under `roots`; write `adadec.json`."""
    t0 = time.perf_counter()
    h, right = collect_entropies(model, tokenizer, code_files(roots, exclude=exclude), budget=budget,
                                 progress=progress)
    from ghostline.engine.decoding.adadec import fit_threshold

    fit = fit_threshold(h, right)
    fit["seconds"] = round(time.perf_counter() - t0, 1)
    folder = out or user_folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adadec.json").write_text(json.dumps(fit, indent=1) + "\n")
    progress(f"adadec: threshold {fit['threshold']:.3f} nats (pauses {fit['paused_share']:.1%} of held-out steps) "
             f"-> {folder / 'adadec.json'}")
    return folder / "adadec.json"


def calibrate_exits(model, tokenizer, name: str, roots: Iterable[Path], *, exclude: Iterable[str] = (),
                    out: Path | None = None, budget: int = 24_000, progress: Callable[[str], None] = print) -> Path:
    """Fit the exit heads, the early-exit controller and its thresholds (engine.exits) on teacher-forced
    code under `roots`; write `exits.npz` + `exits.json`. Needs the code vocabulary (for speed)."""
    from ghostline.engine.exits import RowHead, collect, default_layers, fit

    t0 = time.perf_counter()
    rows = np.load(out / "vocab.npy") if out is not None and (out / "vocab.npy").is_file() else load_vocab(name)
    if rows is None:
        raise FileNotFoundError(f"no code vocabulary for {name}: run the `vocab` step first")
    forced = teacher_forced(model, tokenizer, code_files(roots, exclude=exclude), tokens_per_file=768)
    states = collect(model, forced, budget=budget, progress=progress)
    layers = default_layers(model.args.n_layers)
    exits = fit(states, RowHead(model, torch.as_tensor(rows, dtype=torch.long)), layers=layers,
                report_layers=layers, progress=progress)
    exits.meta |= {"seconds": round(time.perf_counter() - t0, 1), "roots": [str(r) for r in roots],
                   "exclude": list(exclude)}
    path = exits.save(out or user_folder(name))
    progress(f"exits: exit head at layer(s) {exits.layers} (of {layers}) -> {path}")
    return path


def cursor_tasks(files: list[Path], *, per_file: int = 2, before_lines: int = 40, after_lines: int = 20,
                 seed: int = 0, mid_line: bool = False):
    """Completion situations cut from real code, shaped like the benchmark tasks: a cursor at the
    first non-blank character of a line, the rest of that line the target, the document the user
    would have (the line's text removed, `before_lines` above and `after_lines` below kept). With
    `mid_line`, the cursor after the line's first word instead (the user typed it; lines of one word
    left out)."""
    import random

    from ghostline.engine.gate import first_word_end

    rng = random.Random(seed)
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        candidates = [i for i in range(8, len(lines)) if len(lines[i].strip()) >= 4 and len(lines[i]) <= 160]
        for i in sorted(rng.sample(candidates, min(per_file, len(candidates)))):
            line = lines[i]
            indent = line[: len(line) - len(line.lstrip())]
            if mid_line:
                indent = line[: first_word_end(line)]  # the text typed before the cursor
                if not line[len(indent):].strip():
                    continue
            above = "\n".join(lines[max(0, i - before_lines) : i])
            text = above + "\n" + indent + "\n" + "\n".join(lines[i + 1 : i + 1 + after_lines])
            yield {"path": str(path), "text": text, "offset": len(above) + 1 + len(indent),
                   "target": line[len(indent):].rstrip() if mid_line else line.strip()}


def history_tasks(paths: Iterable[Path], *, before_lines: int = 40, after_lines: int = 20):
    """Cursor tasks from edit tasks (../shared/EVAL.md's format, e.g. `bench.history` on a repository's
    history): the cursor a few lines below a real commit's edit, on a line the commit left, in the
    document the user had after the edit (the target removed), cut as `cursor_tasks` cuts. The `path`
    is the task's repository and file without the commit, so one file's tasks fall on one side of the
    held-out split. Repositories interleave (a stable order by a hash of the source)."""
    tasks = json_lines(paths)
    tasks.sort(key=lambda t: hashlib.sha256(t["source"].encode()).hexdigest())
    for t in tasks:
        lines, (row, col) = t["after"].split("\n"), (t["cursor"]["line"], t["cursor"]["character"])
        indent = lines[row][:col]
        above = "\n".join(lines[max(0, row - before_lines) : row])
        text = above + "\n" + indent + "\n" + "\n".join(lines[row + 1 : row + 1 + after_lines])
        repo, _, file = t["source"].partition("@")
        yield {"path": f"{repo}:{file.partition(':')[2]}", "text": text, "offset": len(above) + 1 + len(indent),
               "target": t["target"].strip()}


def collect_gate(engine, files: list[Path], *, tasks: int = 400, drafts: int = 3, max_tokens: int = 48,
                 seed: int = 0, context: Callable[[Path, str, int], str] | None = None,
                 cursors: Iterable[dict] | None = None, mid_line: bool = False,
                 progress: Callable[[str], None] = print) -> Iterator[dict]:
    """The product's k-draft decode at each cursor task (gate off), as a record the gate's features
    are computed from (`engine.gate.record_features`): the first step's distribution, the drafts and
    their scores, the text around the cursor, whether the user would keep some of the first line (the
    accept model) and how many characters. With `context` (path, text, offset -> other files' text),
    only tasks it gives context for, decoded as the server does once its background work is done: the
    document opened, the context set in front of it, and the whole refreshed. `cursors`: these tasks
    (`history_tasks`) instead of cuts from `files`; `mid_line`: cuts after each line's first word."""
    from ghostline.engine.completion import CompletionOptions
    from ghostline.engine.gate import accepted, situation

    uri, n, n_rows, n_kept = "file:///calibration/gate.py", 0, 0, 0
    opts = CompletionOptions(max_tokens=max_tokens, drafts=drafts)
    for task in cursor_tasks(files, seed=seed, mid_line=mid_line) if cursors is None else cursors:
        if n >= tasks:
            break
        head = context(Path(task["path"]), task["text"], task["offset"]) if context is not None else ""
        if context is not None and not head:
            continue
        n += 1
        engine.open(uri, task["text"])
        if head:
            engine.set_context(uri, head)
            engine.refresh(uri)
        out = engine.complete(uri, task["offset"], opts)
        conf = out.first_step
        engine.close(uri)
        if not out.drafts or conf is None:
            continue
        kept = accepted(out.text, task["target"])
        n_rows, n_kept = n_rows + 1, n_kept + bool(kept.strip())
        yield {"path": task["path"], "first": [conf.first_p, conf.first_margin, conf.first_entropy],
               "drafts": out.drafts, "scores": out.draft_scores, **situation(task["text"], task["offset"]),
               "target": task["target"], "kept": int(bool(kept.strip())), "chars": len(kept),
               "context_tokens": out.context_tokens}
        if n_rows % 10 == 0:
            progress(f"gate: {n_rows} suggestions, {n_kept} with something kept")


def _open_text(path: Path, mode: str):
    """A text file, gzip-compressed when its name ends in `.gz`."""
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else open(path, mode, encoding="utf-8")


def held_out_files(rows: list[dict]) -> np.ndarray:
    """Which records the gate's fit holds out: a third of the files, by a hash of the path."""
    return np.array([int(hashlib.sha256(r["path"].encode()).hexdigest()[:8], 16) % 3 == 0 for r in rows])


def json_lines(paths: Iterable[Path]) -> list[dict]:
    """The objects of JSON lines files (`.gz` compressed or not), in order: decode records, edit tasks."""
    rows = []
    for path in paths:
        with _open_text(Path(path), "r") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def record_arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gate's features [N, F], kept or not [N] and characters kept [N] of decode records."""
    from ghostline.engine.gate import record_features

    X = np.array([record_features(r) for r in rows])
    y = np.array([r["kept"] for r in rows], dtype=np.float64)
    chars = np.array([r["chars"] for r in rows], dtype=np.float64)
    return X, y, chars


def fit_gate(rows: list[dict], model: str = "logistic"):
    """The show gate (`model`, engine.gate.MODELS) fitted on collected records, a third of the files
    (by a hash of the path) held out for the threshold and the check that the fit generalises."""
    from ghostline.engine.gate import fit

    return fit(*record_arrays(rows), held_out_files(rows), model=model)


def calibrate_gate(engine, name: str, roots: Iterable[Path], *, exclude: Iterable[str] = (), out: Path | None = None,
                   tasks: int = 400, seed: int = 0, rows_files: Iterable[Path] = (),
                   context: Callable[[Path, str, int], str] | None = None, history: Iterable[Path] = (),
                   model: str = "logistic", mid_line: bool = False, progress: Callable[[str], None] = print) -> Path:
    """Fit the show gate (engine.gate) on cursor tasks cut from the code under `roots` (`seed` picks
    the lines); write `gate.json`, or, from records of completions that read context (`context`, as
    in `collect_gate`), the gate for those, `gate-context.json`. With `rows_files`: when they all
    exist, the gate is fitted on their records together without decoding anything (`engine` unused);
    one that does not exist yet receives the records of this collection (JSON lines, `.gz` compressed).
    With `history` (edit task files): the cursor tasks are theirs (`history_tasks`), not cut from `roots`.
    `model`: what gives P(kept) (engine.gate.MODELS); `mid_line`: cursor tasks cut after each line's
    first word (`cursor_tasks`)."""
    from ghostline.engine.gate import CONTEXT_GATE_FILE, GATE_FILE

    t0 = time.perf_counter()
    rows_files = [Path(f) for f in rows_files]
    missing = [f for f in rows_files if not f.is_file()]
    if missing and len(rows_files) > 1:
        raise ValueError(f"gate records not found: {', '.join(map(str, missing))} (collect into one file at a time)")
    rows = []
    if rows_files and not missing:
        rows = json_lines(rows_files)
        progress(f"gate: {len(rows)} records from {', '.join(map(str, rows_files))}")
    else:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(_open_text(missing[0], "w")) if missing else None
            history = [Path(h) for h in history]
            files = [] if history else code_files(roots, exclude=exclude)
            for row in collect_gate(engine, files, tasks=tasks, seed=seed, context=context,
                                    cursors=history_tasks(history) if history else None, mid_line=mid_line,
                                    progress=progress):
                rows.append(row)
                if sink is not None:
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
    kinds = {bool(r.get("context_tokens")) for r in rows}
    if len(kinds) > 1:
        raise ValueError("the gate records mix completions with and without context: fit them apart")
    gate = fit_gate(rows, model)
    gate.meta |= {"seconds": round(time.perf_counter() - t0, 1), "roots": [str(r) for r in roots],
                  "history": [Path(h).name for h in history],
                  "exclude": list(exclude), "tasks": len(rows), "records": [f.name for f in rows_files],
                  "context": kinds == {True}}
    path = gate.save(out or user_folder(name), CONTEXT_GATE_FILE if kinds == {True} else GATE_FILE)
    m = gate.meta
    progress(f"gate: held-out AUC {m['held_out_auc']}, threshold {gate.threshold:.3f}: wrong/100 "
             f"{m['ungated']['wrong_per_100']:.1f} -> {m['gated']['wrong_per_100']:.1f}, chars saved "
             f"{m['ungated']['chars_saved']:.2f} -> {m['gated']['chars_saved']:.2f} -> {path}")
    return path
