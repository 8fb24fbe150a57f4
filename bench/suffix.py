"""Does the text below the cursor help a model without fill-in-the-middle tokens? (Gemma 3 has none.)

The product reads the suffix only through FIM tokens (engine.infill). For a model without them the
suffix can only go into the prompt as ordinary text before the cursor; this measures the forms that
could work, each against the prefix alone, on the same tasks and engine (the server's int8 engine,
its k-draft decode, one line, the gate off so the model's own writing is scored):

- `prefix`: the document at completion time (../shared/EVAL.md), nothing added;
- `raw`: the suffix (the cursor's line's rest and the lines below, `engine.infill.suffix_text`) placed
  before the document, then a blank line;
- `comment`: the same lines as `#` comments at the document's start.

(The same comments just above the cursor's line, inside the 512-token sliding window of 15 of Gemma
3's 18 layers, were tried on two tasks and dropped: the model went on writing comments in both.)

The document is cut to its last `--above` lines before the cursor's line for every form alike (the
sliding window sees little more; it keeps each task a few seconds on a CPU).

    python -m bench.suffix --tasks T.jsonl [--limit N] [--out rows.jsonl]
    python -m bench.suffix --stdlib 60 --out rows.jsonl      # cursor tasks cut from the standard library
"""

from __future__ import annotations

import argparse
import json

from bench.tasks import chosen_forms, first_line, form_figures, read_tasks, run_forms, user_document
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.infill import suffix_text

FORMS = ("prefix", "raw", "comment")
URI = "file:///suffix/task.py"


def at_completion(task: dict, above: int) -> tuple[str, int]:
    """The document a user has (target removed from the cursor's line), cut to `above` lines above
    the cursor's line, and the cursor's offset in it."""
    doc, offset = user_document(task)
    start = offset
    for _ in range(above + 1):
        start = doc.rfind("\n", 0, start)
        if start < 0:
            break
    start = max(0, start + 1)
    return doc[start:], offset - start


def form(name: str, doc: str, offset: int) -> tuple[str, int]:
    """The prompt document of one form and the cursor's offset in it."""
    below = suffix_text(doc, offset).strip("\n")
    lines = [ln for ln in below.split("\n") if ln.strip()]
    if name == "prefix" or not lines:
        return doc, offset
    if name == "raw":
        head = "\n".join(lines) + "\n\n"
        return head + doc, offset + len(head)
    if name == "comment":
        head = "# The code below the cursor:\n" + "".join(f"# {ln.strip()}\n" for ln in lines) + "\n"
        return head + doc, offset + len(head)
    raise ValueError(f"unknown form {name!r} (of {', '.join(FORMS)})")


def run_task(engine: Engine, task: dict, forms: list[str], above: int, opts: CompletionOptions) -> dict:
    doc, offset = at_completion(task, above)
    row = {"id": task["id"], "target": task["target"]}
    for name in forms:
        text, at = form(name, doc, offset)
        engine.open(URI, text)
        try:
            pred = first_line(engine.complete(URI, at, opts).text)
        finally:
            engine.close(URI)
        row[name] = pred
    return row


def report(rows: list[dict], forms: list[str]) -> dict:
    return {name: form_figures(rows, name) for name in forms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", help="edit tasks (../shared/EVAL.md format)")
    p.add_argument("--stdlib", type=int, help="instead: this many cursor tasks cut from the standard library")
    p.add_argument("--limit", type=int)
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--above", type=int, default=60, help="lines kept above the cursor's line")
    p.add_argument("--model", default=None)
    p.add_argument("--out", help="append each task's row here (a rerun skips what is there)")
    args = p.parse_args(argv)
    forms = chosen_forms(p, args.forms, FORMS)
    if bool(args.tasks) == bool(args.stdlib):
        p.error("give --tasks or --stdlib")
    if args.stdlib:
        from bench.tune_superposed import make_tasks

        tasks = make_tasks(args.stdlib, seed=7)
    else:
        tasks = read_tasks(args.tasks, args.limit)
    engine = Engine.load(args.model, options=EngineOptions(precision="int8", head="code"))
    opts = CompletionOptions(max_tokens=48, drafts=3, gate=False)
    rows = run_forms(tasks, args.out, forms, lambda t: run_task(engine, t, forms, args.above, opts))
    print(json.dumps(report(rows, forms)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
