"""The README's figures, drawn from the committed benchmark rows only (no model runs).

    python -m bench.figures [--out docs/figures] [--only latency,pie,drafts,exit]

  latency.png  a one-line suggestion after an edit through the LSP, against llama.cpp (prefix reuse)
               and HF transformers (re-encode) on the same tasks (bench.lsp_replay runs 6-8,
               bench/results/replay-step{6,7,8}-rows.jsonl; the anchors are in run 6's rows file)
  pie.png      the cache update after an edit: PIE against full, prefix and naive re-encoding
               (bench.edits, bench/results/edits-rows.jsonl)
  drafts.png   k = 3 drafts: superposed decoding against greedy, nucleus sampling and beam search
               (bench.drafts, bench/results/drafts-rows.jsonl)
  exit.png     halting across thresholds, and early exit's layers saved against first-line ES
               (bench.exit, bench/results/exit-kl2-rows.jsonl.gz: the 200-task run with the
               distilled exit head, the one the README's settings quote)

Every figure is computed with the benchmark's own summary functions over its rows, so its numbers
are those of bench/RESULTS.md; the hardware named on each is the one RESULTS.md gives for that run.
The summaries import the engine's modules (torch), but no model is loaded.
"""

from __future__ import annotations

import argparse
import math
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from bench.plot import COLORS, figure, save

RESULTS = Path(__file__).with_name("results")
OUT = Path(__file__).resolve().parent.parent / "docs" / "figures"
FIGURES = ("latency", "pie", "drafts", "exit")

EPYC = "2-core AMD EPYC"  # bench/RESULTS.md's name for the machine of the CPU figures


def whole(v: float) -> str:
    """`v` (a summary's figure, already rounded to 0.1) to a whole number, halves up, as bench/RESULTS.md has it."""
    return str(Decimal(str(v)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ms(v: float) -> str:
    """A latency as bench/RESULTS.md writes it: one decimal under a second, whole milliseconds above."""
    return f"{v:.1f} ms" if v < 1000 else f"{whole(v)} ms"


def shown_path(path: Path) -> str:
    """A rows file as the repository names it (bench/results/...), else as given."""
    path = Path(path)
    return f"bench/results/{path.name}" if path.resolve().parent == RESULTS.resolve() else str(path)


# (a) latency ----------------------------------------------------------------------------------------

def latency(out: Path) -> Path:
    from bench.lsp_replay import load_rows, summary

    runs = {n: load_rows(RESULTS / f"replay-step{n}-rows.jsonl") for n in (6, 7, 8)}

    def rows(run: int, kind: str, system: str, ids: set[str] | None = None) -> list[dict]:
        return [r for r in runs[run] if r["set"] == kind and r["system"] == system and (ids is None or r["id"] in ids)]

    def ids(run: int, kind: str, system: str) -> set[str]:
        return {r["id"] for r in rows(run, kind, system)}

    # Run 6's rows file also holds Ghostline's answers to the 4 anchor files that are not among the
    # 20 (bench/RESULTS.md, "The edit's tail"): run 6's own 20 are the files runs 7 and 8 answered.
    files20 = ids(7, "bigfile", "ghostline")
    panels = {}
    for kind, panel, twenty, unit in (("edits", "Edit tasks from requests' history", None, "tasks"),
                                      ("bigfile", "4,000-token files from the stdlib", files20, "files")):
        bars, seen = [], []
        for run in (6, 7, 8):
            s = summary(rows(run, kind, "ghostline", twenty))
            bars.append(("ghostline", f"Ghostline, run {run} ({s['tasks']} {unit})", s))
        anchors = (("llamacpp", "llama.cpp, prefix reuse", "llama.cpp's"), ("hf", "HF transformers, re-encode", "HF's"))
        same = ids(6, kind, "llamacpp") == ids(6, kind, "hf")
        for system, name, whose in anchors:
            mine = ids(6, kind, system)
            g, a = summary(rows(6, kind, "ghostline", mine)), summary(rows(6, kind, system))
            if mine not in seen:
                seen.append(mine)
                whose = "the anchors'" if same else whose
                bars.append(("ghostline", f"Ghostline, run 6, on {whose} {g['tasks']} {unit}", g))
            errors = f", {a['errors']} failed" if a["errors"] else ""
            bars.append((system, f"{name} ({a['tasks']} {unit}{errors})", a))
        panels[panel] = bars[::-1]  # drawn bottom up: top to bottom as listed

    sizes = [len(bars) for bars in panels.values()]
    fig, axes = figure(nrows=2, width=9.5, height=7.6, sharex=True, gridspec_kw={"height_ratios": sizes})
    for ax, (panel, bars) in zip(axes, panels.items()):
        for y, (system, _label, s) in enumerate(bars):
            color = COLORS[system]
            ax.barh(y + 0.2, s["latency_ms_p50"], height=0.38, color=color)
            ax.barh(y - 0.2, s["latency_ms_p95"], height=0.38, color=color, alpha=0.4)
            ax.text(s["latency_ms_p50"] * 1.08, y + 0.2, ms(s["latency_ms_p50"]), va="center", fontsize=7)
            ax.text(s["latency_ms_p95"] * 1.08, y - 0.2, ms(s["latency_ms_p95"]), va="center", fontsize=7,
                    color="#555555")
        ax.set_yticks(range(len(bars)), [label for _, label, _ in bars], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(50, 300_000)
        ax.set_title(panel, loc="left")
        ax.grid(axis="y", visible=False)
    axes[-1].set_xlabel("latency from sending didChange to the inlineCompletion answer (ms, log scale)")
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS["ghostline"], label="Ghostline"), Patch(color=COLORS["llamacpp"], label="llama.cpp"),
               Patch(color=COLORS["hf"], label="HF transformers"), Patch(color="#555555", label="p50"),
               Patch(color="#555555", alpha=0.4, label="p95")]
    axes[0].legend(handles=handles, loc="upper right", frameon=False)
    path = out / "latency.png"
    save(fig, str(path), title="Latency of a one-line suggestion after an edit",
         subtitle=f"{EPYC} with AVX512-BF16, nothing else running; Gemma 3 270M: int8 layers, code head, "
                  "3 superposed drafts, 25 ms debounce, one line",
         caption="bench.lsp_replay: the real language server over stdio, one line of ghost text; runs 6-8 are "
                 "three runs of the same code (bench/results/replay-step{6,7,8}-rows.jsonl). The anchors ran "
                 "after the server exited, on the first 54 (llama.cpp) and 40 (HF) edit tasks and 8 files, in "
                 "run 6's rows file; Ghostline's bars beside them are run 6 on the same tasks. A failed "
                 "llama.cpp request counts as a task, not in its latency.")
    return path


# (b) PIE ----------------------------------------------------------------------------------------------

def pie(out: Path) -> Path:
    from bench.edits import MODES, summary
    from bench.tasks import saved_rows

    rows = list(saved_rows(RESULTS / "edits-rows.jsonl").values())
    res = {m: summary(m, [r[m] for r in rows]) for m in MODES}
    names = {"full": "full re-encode", "prefix": "prefix re-encode", "pie": "PIE", "naive": "naive (not rotated)"}
    order = [m for m in ("naive", "pie", "prefix", "full")]  # bottom to top

    fig, (left, right) = figure(2, width=10.5, height=4.8)
    for y, m in enumerate(order):
        s = res[m]
        left.barh(y + 0.2, s["update_ms_p50"], height=0.38, color=COLORS[m])
        left.barh(y - 0.2, s["update_ms_p95"], height=0.38, color=COLORS[m], alpha=0.4)
        left.text(s["update_ms_p50"] * 1.08, y + 0.2, f"{s['update_ms_p50']:.1f} ms", va="center", fontsize=7)
        left.text(s["update_ms_p95"] * 1.08, y - 0.2, f"{s['update_ms_p95']:.1f} ms", va="center", fontsize=7,
                  color="#555555")
    left.set_yticks(range(len(order)), [f"{names[m]}\n{whole(res[m]['encoded_tokens_p50'])} tokens encoded (p50)"
                                        for m in order], fontsize=8)
    left.set_xscale("log")
    left.set_xlim(50, 400_000)
    left.set_xlabel("cache update after the edit (ms, log scale)")
    left.set_title("What an edit costs", loc="left")
    left.grid(axis="y", visible=False)
    from matplotlib.patches import Patch

    left.legend(handles=[Patch(color="#555555", label="p50"), Patch(color="#555555", alpha=0.4, label="p95")],
                loc="lower right", frameon=False)

    x = paired_bars(right, [([res[m][metric] for m in order], label) for metric, label in
                            (("em", "exact match (EM)"), ("es", "edit similarity (ES)"))],
                    [COLORS[m] for m in order], pad=0.8)
    right.set_xticks(list(x), [names[m] for m in order], fontsize=8)
    right.set_ylabel("first line against the target (%)")
    right.set_ylim(0, 55)
    right.set_title("What it keeps of the quality", loc="left")
    right.grid(axis="x", visible=False)
    right.legend(handles=[Patch(facecolor="#888888", alpha=0.45, hatch="//", edgecolor="white", label="EM"),
                          Patch(color="#555555", label="ES")], loc="upper left", frameon=False)
    path = out / "pie.png"
    save(fig, str(path), title="PIE: encode only the edited tokens, rotate the keys that moved",
         subtitle=f"{EPYC}, torch 2.13; Gemma 3 270M, fp32 layers, full LM head (the reference), greedy, one line",
         caption=f"bench.edits, {res['pie']['tasks']} tasks: open `before`, apply the edit, complete at the cursor; "
                 "each mode starts from a copy of the same warm cache (bench/results/edits-rows.jsonl). The first "
                 "58 tasks shared the machine with other runs, which inflates their update times for all four "
                 "modes alike; EM and ES do not depend on it.")
    return path


def paired_bars(ax, groups, colors, *, pad: float) -> range:
    """Two bars a position (the first faint and hatched), each labelled with its value; the positions."""
    x = range(len(colors))
    for i, (vals, label) in enumerate(groups):
        xs = [j + (i - 0.5) * 0.38 for j in x]
        ax.bar(xs, vals, width=0.36, color=colors, alpha=0.45 if i == 0 else 1.0, hatch="//" if i == 0 else None,
               edgecolor="white", label=label)
        for xx, v in zip(xs, vals):
            ax.text(xx, v + pad, f"{v:.1f}", ha="center", fontsize=7)
    return x


# (c) drafts -------------------------------------------------------------------------------------------

def drafts(out: Path) -> Path:
    from bench.drafts import summarize

    res = summarize([str(RESULTS / "drafts-rows.jsonl")])
    base = res["greedy"]["ms_per_request"]
    names = {"greedy": "greedy", "superposed": "superposed (default)", "superposed_rerank": "superposed + re-rank",
             "nucleus": "nucleus (p 0.9, T 0.8)", "beam": "beam search (3 beams)"}
    methods = list(res)
    fig, (left, right) = figure(2, width=10.5, height=4.6)
    x = paired_bars(left, [([res[m][key] for m in methods], label) for key, label in
                           (("em", "top draft"), ("best_of_k_em", "best of the 3 drafts"))],
                    [COLORS[m] for m in methods], pad=0.4)
    left.set_xticks(list(x), [names[m] for m in methods], fontsize=8, rotation=15, ha="right")
    left.set_ylabel("exact match of the first line (%)")
    left.set_ylim(0, 30)
    left.set_title("Quality: the top draft and the best of three", loc="left")
    left.grid(axis="x", visible=False)
    from matplotlib.patches import Patch

    left.legend(handles=[Patch(facecolor="#888888", alpha=0.45, hatch="//", edgecolor="white", label="top draft EM"),
                         Patch(color="#555555", label="best of the 3 drafts EM")], loc="upper left", frameon=False)
    order = methods[::-1]
    for y, m in enumerate(order):
        v = res[m]["ms_per_request"]
        right.barh(y, v, height=0.6, color=COLORS[m])
        right.text(v + 40, y, f"{v:.1f} ms, {v / base:.2f}x greedy", va="center", fontsize=7)
    right.set_yticks(range(len(order)), [names[m] for m in order], fontsize=8)
    right.set_xlim(0, 5000)
    right.set_xlabel("time per request (ms, mean)")
    right.set_title("Cost: time per request", loc="left")
    right.grid(axis="y", visible=False)
    path = out / "drafts.png"
    tasks = next(iter(res.values()))["tasks"]
    save(fig, str(path), title="Drafts: three suggestions for about the time of one",
         subtitle="16-core Intel Xeon (the CPU of an H200 host, GPU unused), one thread per process: "
                  f"times compare within this figure, not with the {EPYC}",
         caption=f"bench.drafts, {tasks} tasks, k = 3 drafts per request after the edit, one line, at most 48 "
                 "tokens; Gemma 3 270M, fp32 layers, code head. Superposed decoding runs one forward per step for "
                 "all drafts (the server's default, drafts: 3); the re-rank re-scores its final drafts in one "
                 "batched forward; nucleus pays k separate decodes (bench/results/drafts-rows.jsonl).")
    return path


# (d) halting and early exit ---------------------------------------------------------------------------

def exits(out: Path, rows_file: Path) -> Path:
    import numpy as np

    from bench.exit import summary, sweep
    from bench.tasks import saved_rows

    rows = list(saved_rows(rows_file).values())
    greedy, halt = summary(rows, "greedy"), summary(rows, "halt")
    default = rows[0]["halt_threshold"]
    p_stop = np.array([p for r in rows for p in (r["trace"]["p_stop"] or []) if p >= 0])
    thresholds = sorted(set(np.quantile(p_stop, np.linspace(0.5, 0.995, 40)).tolist()) | {default})
    curve = sweep(rows, thresholds + [math.inf])  # the last point: halting off

    fig, (left, right) = figure(2, width=10.5, height=4.9)
    left.plot([s["shown_chars"] for s in curve], [s["shown_precision"] for s in curve], color=COLORS["halt"],
              linewidth=1.5, label=f"halting at thresholds {thresholds[0]:.2f}-{thresholds[-1]:.2f}, then off")
    left.scatter([halt["shown_chars"]], [halt["shown_precision"]], s=60, color=COLORS["halt"], zorder=3,
                 label=f"halting at the calibrated {default:.3f}")
    left.scatter([greedy["shown_chars"]], [greedy["shown_precision"]], s=60, color=COLORS["greedy"], zorder=3,
                 label="halting off (greedy)")
    left.annotate(f"{halt['shown_precision']} % right, {halt['shown_chars']} characters",
                  (halt["shown_chars"], halt["shown_precision"]), xytext=(8, 6), textcoords="offset points", fontsize=8)
    left.annotate(f"{greedy['shown_precision']} % right, {greedy['shown_chars']} characters",
                  (greedy["shown_chars"], greedy["shown_precision"]), xytext=(-10, 10), textcoords="offset points",
                  fontsize=8, ha="right")
    left.set_xlim(0, 170)
    left.set_ylim(0, 100)
    left.set_xlabel("characters shown per multi-line suggestion (mean)")
    left.set_ylabel("shown characters that match the author's text (%)")
    left.set_title("Halting: less text, more of it right", loc="left")
    left.legend(loc="upper right", frameon=False)

    sweeps = sorted((k for k in rows[0] if k.startswith("exit@")), key=lambda k: -float(k[5:]))
    points = [("exit", f"{rows[0]['exit_threshold']:.3f} (calibrated)")] + [(k, k[5:]) for k in sweeps]
    table = [f"{'P(exit) >=':<11} {'layers':>7}   {'ES':>5}   {'time':>5}"]
    for i, (method, label) in enumerate(points):
        s = summary(rows, method)
        saved = 100 * (1 - s["layers_per_token"] / greedy["layers_per_token"])
        d_es, ratio = s["es"] - greedy["es"], s["ms"] / greedy["ms"]
        right.scatter([saved], [d_es], s=50, color=COLORS["exit"], zorder=3)
        right.annotate(label, (saved, d_es), xytext=(6, -13 if i % 2 else 6), textcoords="offset points", fontsize=8)
        table.append(f"{label.split()[0]:<11} {saved:>5.1f} %   {d_es:+.2f}   {ratio:.2f}x")
    right.text(0.98, 0.03, "\n".join(table), transform=right.transAxes, ha="right", va="bottom", fontsize=7.5,
               family="monospace", bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round,pad=0.4"})
    right.scatter([], [], s=50, color=COLORS["exit"], label="early exit at a P(exit) threshold")
    right.axhline(-1.0, color="#d62728", linestyle="--", linewidth=1, label="the bar: ES within 1 point of greedy")
    right.axhline(0.0, color="#888888", linewidth=0.8)
    right.set_xlim(0, 25)
    right.set_ylim(-3.6, 0.5)
    right.set_xlabel("decoder layers saved per token (%)")
    right.set_ylabel("first-line ES against greedy's (points)")
    right.set_title("Early exit: layers saved, quality lost", loc="left")
    right.legend(loc="upper right", frameon=False)
    path = out / "exit.png"
    save(fig, str(path), title="Halting and early exit from layer 13's exit head",
         subtitle=f"{EPYC}; Gemma 3 270M, int8 layers, code head; multi-line suggestions of up to 64 tokens",
         caption=f"bench.exit, {greedy['tasks']} tasks ({shown_path(rows_file)}). At the "
                 f"calibrated threshold {halt['halt_precision']} % of halts withheld a wrong token. The halting "
                 "curve cuts a traced greedy run at each threshold (its per-step P(stop)); the exit points are "
                 "separate decodes. Both settings ship off (halt: false, exit: false).")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(OUT), help="folder for the PNGs (default docs/figures)")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated, of {', '.join(FIGURES)}")
    p.add_argument("--exit-rows", default=str(RESULTS / "exit-kl2-rows.jsonl.gz"), help="bench.exit rows for exit.png")
    args = p.parse_args(argv)
    only = [f for f in args.only.split(",") if f]
    if unknown := set(only) - set(FIGURES):
        p.error(f"unknown figures {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw = {"latency": latency, "pie": pie, "drafts": drafts, "exit": lambda o: exits(o, Path(args.exit_rows))}
    for name in only:
        path = draw[name](out)
        print(f"{path} ({math.ceil(path.stat().st_size / 1024)} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
