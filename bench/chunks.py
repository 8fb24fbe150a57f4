"""Which chunks of other files help, encoded together with the document: the quality reference of a
context choice, without the cache's approximation.

For each task its workspace (../shared/EVAL.md; the task's own file left out) is indexed, and one
prompt per form is encoded from scratch and completed at the cursor (the server's int8 engine, one
line, the gate off so the model's own writing is scored):

- `prefix`: the document at completion time, nothing before it;
- `overlap`: a naive choice: the workspace's 40-line chunks ranked by how many distinct identifiers
  they share with the 30 lines above the cursor, each under a `# path` line, within the budget, the
  best nearest the document;
- `chosen`: the product's choice (`lsp.context.choose`) within the same budget, in the product's order;
- `oracle`: a ceiling, not a method (it reads the target): the workspace's chunks holding the most of
  the target's names that the text above the cursor lacks (builtins and keywords aside), ties by the
  names shared with the lines above, within the same budget, the best nearest the document: what
  chunks picked knowing the line's names give this model at this budget;
- `stale`: the product's cache (`Engine.set_context`): the document encoded with the choice for its
  first lines in front of it, then that context replaced by the cursor's choice (PIE: the chunks
  kept and the document's rows moved and rotated, the new chunks encoded, the document's rows not
  encoded again), against `chosen`, its zero-staleness reference.

`--above N` cuts the document to its last N lines above the cursor's line for every form alike (a
whole long file costs a CPU a minute a form; the 15 sliding-window layers see 512 tokens anyway).

    python -m bench.chunks --tasks T.jsonl --workspace W.json.gz [--limit N] [--drafts 1] [--above N] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import builtins
import gzip
import json
import keyword
import re

from bench.context import workspace_of
from bench.suffix import at_completion
from bench.tasks import chosen_forms, first_line, form_figures, mean, read_tasks, run_forms, user_document
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.lsp.context import CHARS_PER_TOKEN, QUERY_LINES, Library, Options, chunk_file, context_text, identifiers

FORMS = ("prefix", "overlap", "chosen", "stale", "oracle")
STALE_LINES = 30  # `stale` first holds the choice for the cursor at the end of the document's first lines
OVERLAP_LINES = 40
URI = "file:///chunks/task.py"
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLAIN = frozenset(dir(builtins)) | frozenset(keyword.kwlist) | {"self", "cls"}


def overlap_context(files: dict[str, str], doc: str, offset: int, budget: int) -> str:
    """The naive choice's text: 40-line chunks by distinct identifiers shared with the lines above."""
    query = set(identifiers("\n".join(doc[:offset].split("\n")[-QUERY_LINES - 1 :])))
    scored = []
    for path, text in sorted(files.items()):
        if not path.endswith(".py"):
            continue
        lines = text.split("\n")
        for first in range(0, len(lines), OVERLAP_LINES):
            body = "\n".join(lines[first : first + OVERLAP_LINES]).rstrip()
            shared = len(query & set(identifiers(body)))
            if shared:
                scored.append((-shared, path, first, f"# {path}\n{body}\n"))
    scored.sort()
    return within(budget, [chunk for *_, chunk in scored])


def within(budget: int, ranked: list[str]) -> str:
    """The chunk texts, best first, that fit the budget taken in order, joined with the best last."""
    out, left = [], budget * CHARS_PER_TOKEN
    for chunk in ranked:
        if len(chunk) <= left:
            out.append(chunk)
            left -= len(chunk)
    return "".join(reversed(out))


def chosen_context(files: dict[str, str], path: str, doc: str, offset: int, budget: int) -> str:
    lib = Library()
    for p, text in files.items():
        lib.put(p, text)
    return context_text(lib, doc, offset, path=path, opts=Options(budget=budget))


def oracle_context(files: dict[str, str], doc: str, offset: int, budget: int, target: str) -> str:
    """The ceiling's text: chunks by how many of the target's names new to the document they hold."""
    above = doc[:offset]
    new = {w for w in NAME.findall(target) if w not in above and w not in PLAIN and len(w) > 2}
    query = set(identifiers("\n".join(above.split("\n")[-QUERY_LINES - 1 :])))
    scored = []
    for path, text in sorted(files.items()):
        if not path.endswith(".py"):
            continue
        for chunk in chunk_file(path, text):
            hit = sum(1 for w in new if re.search(rf"\b{re.escape(w)}\b", chunk.text))
            shared = len(query & set(identifiers(chunk.text)))
            if hit or shared:
                scored.append((-(100 * hit + shared), path, chunk.first, chunk.text))
    scored.sort()
    return within(budget, [text for *_, text in scored])


def prompt(form: str, files: dict[str, str], path: str, doc: str, offset: int, budget: int, target: str = "") -> str:
    if form == "prefix":
        return ""
    if form == "overlap":
        return overlap_context(files, doc, offset, budget)
    if form in ("chosen", "stale"):
        return chosen_context(files, path, doc, offset, budget)
    if form == "oracle":
        return oracle_context(files, doc, offset, budget, target)
    raise ValueError(f"unknown form {form!r} (of {', '.join(FORMS)})")


def run_task(engine: Engine, task: dict, ws: dict, forms: list[str], budget: int, opts: CompletionOptions,
             above: int | None = None) -> dict:
    path, files = workspace_of(ws, task)
    doc, offset = user_document(task) if above is None else at_completion(task, above)
    row = {"id": task["id"], "target": task["target"]}
    for form in forms:
        head = prompt(form, files, path, doc, offset, budget, task["target"])
        at = len(head) + offset
        if form == "stale":
            early = sum(len(ln) + 1 for ln in doc.split("\n")[:STALE_LINES])
            old = chosen_context(files, path, doc, min(early, offset), budget)
            engine.open(URI, doc)
            engine.set_context(URI, old)
            engine.refresh(URI)  # the document and its first context, encoded together
            engine.set_context(URI, head)
            while engine.docs[URI].missing_count:  # the new chunks' rows, as the idle engine encodes them
                engine.background(URI)
            row["stale_same"], at = old == head, offset
        else:
            engine.open(URI, head + doc)
        try:
            row[form] = first_line(engine.complete(URI, at, opts).text)
        finally:
            engine.close(URI)
        row[f"{form}_chars"] = len(head)
    return row


def report(rows: list[dict], forms: list[str]) -> dict:
    return {form: {**form_figures(rows, form),
                   "context_chars": round(mean([r[f"{form}_chars"] for r in rows if form in r]), 1)} for form in forms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="edit tasks (../shared/EVAL.md format)")
    p.add_argument("--workspace", required=True, help="their workspaces (json.gz)")
    p.add_argument("--limit", type=int)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--budget", type=int, default=Options.budget, help="context tokens (estimated)")
    p.add_argument("--drafts", type=int, default=3, help="1: greedy")
    p.add_argument("--above", type=int, help="lines kept above the cursor's line (default: the whole document)")
    p.add_argument("--model", default=None)
    p.add_argument("--out", help="append each task's row here (a rerun skips what is there)")
    args = p.parse_args(argv)
    forms = chosen_forms(p, args.forms, FORMS)
    tasks = read_tasks(args.tasks, args.limit)
    with gzip.open(args.workspace, "rt", encoding="utf-8") as f:
        ws = json.load(f)
    engine = Engine.load(args.model, options=EngineOptions(precision="int8", head="code"))
    opts = CompletionOptions(max_tokens=48, drafts=args.drafts, gate=False)
    rows = run_forms(tasks, args.out, forms, lambda t: run_task(engine, t, ws, forms, args.budget, opts, args.above))
    print(json.dumps(report(rows, forms)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
