"""The show gate and the accept model: a gate that never fires leaves the output as it was, one
that always fires shows nothing; the fit refuses labels it cannot predict on held-out rows; what the
user keeps of a suggestion; the strength learned from accepts and rejects stays bounded and rests
where the user keeps what the calibration expected."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pytest

from ghostline.engine.engine import CompletionOptions
from ghostline.engine.gate import (FEATURES, LEARN_AFTER, LEARN_BOUNDS, MODELS, Confidence, Forest, Gate, accepted,
                                   auc, features, fit, situation)
from ghostline.lsp.settings import Settings, SettingsError
from ghostline.lsp.stats import Stats, document_kind, report

TEXT = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\ndef volume(w, h, d):\n    "


def gate_with(threshold: float) -> Gate:
    n = len(FEATURES)
    return Gate([0.0] * n, [1.0] * n, [0.0] * n, 0.0, threshold)  # P(kept) is 0.5 everywhere


@pytest.mark.parametrize("case", [("foo.bar(x)", "foo.bar(y)", "foo.bar("), ("x = 1", "x = 1", "x = 1"),
                                  ("abc", "xyz", ""), ("a, b = c\nmore", "a, b = d", "a, b ="),
                                  ("return self.x", "return self.y", "return self."), ("", "x", "")])
def test_accept_model_keeps_whole_words_that_agree(case):
    shown, target, kept = case
    assert accepted(shown, target) == kept


def test_the_text_features_read_the_lines_above_and_nothing_past_the_cursor():
    doc = "import os\n\ndef size(path):\n    if os.path.isfile(path):\n        return os.stat(path).st_size\n    \nTAIL = 1\n"
    offset = doc.index("    \nTAIL") + 4
    around = situation(doc, offset)
    assert around["above"].endswith("st_size") and around["line_before"] == "    " and around["line_after"] == ""

    def named(draft: str) -> dict:
        x = features(Confidence(), [draft], **around, multiline=False)
        return dict(zip(FEATURES, x.tolist()))

    seen = named("return os.stat(path).st_size")
    assert seen["name_seen"] == seen["names_seen"] == seen["repeats_above"] == 1.0
    assert seen["dedent"] == 1.0 and seen["blank_above"] == 0.0 and seen["opens_block"] == 0.0
    new = named("return TAIL + size_of(path)")  # TAIL is below the cursor: not seen
    assert new["name_seen"] == 1.0 and new["names_seen"] == pytest.approx(2 / 4) and new["repeats_above"] == 0.0
    assert named("raise ValueError(path)")["name_seen"] == 0.0
    block = situation("def f(x):\n    ", len("def f(x):\n    "))
    opened = dict(zip(FEATURES, features(Confidence(), ["pass"], **block, multiline=False).tolist()))
    assert opened["opens_block"] == 1.0 and opened["dedent"] == 0.0 and opened["blank_above"] == 0.0


def test_a_gate_that_never_fires_equals_the_ungated_output(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("file:///a.py", TEXT)
    opts = CompletionOptions(max_tokens=6, drafts=3)
    plain = eng.complete("file:///a.py", len(TEXT), opts)
    assert plain.drafts and plain.confidence is None and plain.first_step is not None
    eng.gate = gate_with(0.4)  # below 0.5: never fires
    kept = eng.complete("file:///a.py", len(TEXT), CompletionOptions(max_tokens=6, drafts=3, gate=True))
    assert (kept.drafts, kept.text, kept.tokens) == (plain.drafts, plain.text, plain.tokens)
    assert kept.confidence == pytest.approx(0.5)
    eng.gate = gate_with(0.6)  # above 0.5: always fires
    gated = eng.complete("file:///a.py", len(TEXT), CompletionOptions(max_tokens=6, drafts=3, gate=True))
    assert (gated.drafts, gated.text, gated.stop_reason) == ([], "", "gated")
    for off in (CompletionOptions(max_tokens=6, drafts=3, gate=False),
                CompletionOptions(max_tokens=6, drafts=3, gate=True, gate_strength=0.0)):
        out = eng.complete("file:///a.py", len(TEXT), off)
        assert (out.drafts, out.text) == (plain.drafts, plain.text)


def test_a_completion_that_reads_context_is_gated_by_the_context_gate(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.gate, eng.context_gate = gate_with(0.4), gate_with(0.6)  # the plain one never fires, the other always
    eng.open("file:///a.py", TEXT)
    opts = CompletionOptions(max_tokens=6, drafts=3, gate=True)
    assert eng.complete("file:///a.py", len(TEXT), opts).drafts
    eng.set_context("file:///a.py", "# lib/shapes.py\ndef circle(r):\n    return 3.14 * r * r\n")
    unread = eng.complete("file:///a.py", len(TEXT), opts)  # none of its rows encoded yet: no context read
    assert unread.context_tokens == 0 and unread.drafts
    while eng.background("file:///a.py") is not None:
        pass
    read = eng.complete("file:///a.py", len(TEXT), opts)
    assert read.context_tokens > 0 and (read.drafts, read.stop_reason) == ([], "gated")
    eng.context_gate = None  # none fitted: the plain gate
    assert eng.complete("file:///a.py", len(TEXT), opts).drafts


def synthetic(n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURES)))
    y = (X[:, 0] - 0.5 * X[:, 3] + rng.normal(scale=0.7, size=n) > 0).astype(float)
    chars = np.where(y == 1, rng.integers(1, 30, size=n), 0).astype(float)
    held = np.arange(n) % 3 == 0
    return X, y, chars, held


@pytest.mark.parametrize("model", MODELS)
def test_the_fit_predicts_held_out_labels_and_keeps_the_characters(model):
    X, y, chars, held = synthetic()
    gate = fit(X, y, chars, held, model=model)
    assert gate.meta["held_out_auc"] > 0.8
    ungated, gated = gate.meta["ungated"], gate.meta["gated"]
    assert gated["chars_saved"] >= 0.92 * ungated["chars_saved"] - 1e-9
    assert gated["wrong_per_100"] < ungated["wrong_per_100"] and gated["accept_pct"] > ungated["accept_pct"]
    assert auc(gate.p_kept(X[held]), y[held]) == pytest.approx(gate.meta["held_out_auc"], abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_a_fit_on_shuffled_labels_fails_its_held_out_check(model):
    X, y, chars, held = synthetic()
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="does not generalise"):
        fit(X, rng.permutation(y), chars, held, model=model)
    with pytest.raises(ValueError, match="gate model"):
        fit(X, y, chars, held, model="tree")


def walk(forest: Forest, x: np.ndarray) -> float:
    """The reference: each tree walked from its root, one node at a time."""
    leaves = []
    for node in forest.roots:
        while forest.feature[node] >= 0:
            node = forest.left[node] if x[forest.feature[node]] <= forest.cut[node] else forest.right[node]
        leaves.append(forest.value[node])
    return float(np.mean(leaves))


def test_the_forest_learns_what_a_logistic_cannot_and_equals_its_tree_walk():
    """Kept when two features agree in sign (no line separates it): the forest ranks held-out rows
    well where the logistic regression cannot; its vectorised prediction equals walking each tree;
    the same seed grows the same forest."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(900, len(FEATURES)))
    y = (X[:, 0] * X[:, 1] > 0).astype(float)
    chars = y * 10
    held = np.arange(len(y)) % 3 == 0
    forest = fit(X, y, chars, held, model="forest", min_auc=0.0)
    assert forest.meta["held_out_auc"] > 0.85 and fit(X, y, chars, held, min_auc=0.0).meta["held_out_auc"] < 0.6
    np.testing.assert_allclose(forest.p_kept(X[:60]), [walk(forest.forest, x) for x in X[:60]])
    assert Forest.grow(X[:300], y[:300], trees=5).as_dict() == Forest.grow(X[:300], y[:300], trees=5).as_dict()


@pytest.mark.parametrize("model", MODELS)
def test_gate_round_trips_and_strength_moves_the_threshold(tmp_path, model):
    X, y, chars, held = synthetic()
    gate = fit(X, y, chars, held, model=model)
    again = Gate.load(gate.save(tmp_path))
    np.testing.assert_allclose(again.p_kept(X[:50]), gate.p_kept(X[:50]), atol=1e-4)
    assert gate.threshold_at(0) == 0 and gate.threshold_at(1) == gate.threshold
    assert gate.threshold_at(2) > gate.threshold_at(1) > gate.threshold_at(0.5)
    raw = json.loads((tmp_path / "gate.json").read_text())
    raw["features"] = ["something", "else"]
    (tmp_path / "gate.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="recalibrate"):
        Gate.load(tmp_path / "gate.json")


def test_gate_settings():
    assert Settings().gate is True and Settings().gate_strength == 1.0
    assert Settings().merged({"gate": False, "gateStrength": 2}).gate_strength == 2.0
    for bad in ({"gate": "yes"}, {"gate_strength": -1}, {"gate_strength": 5}, {"gate_strength": True}):
        with pytest.raises(SettingsError):
            Settings().merged(bad)


def test_accepts_and_rejects_are_counted_by_language_and_kind_of_document(tmp_path):
    """The record is (kept, rejected): suggestions taken and those the user typed count as kept; the
    report shows each kind's learned strength."""
    stats = Stats(tmp_path / "stats.json")
    assert document_kind("file:///w/pkg/module.py") == "source" and document_kind("file:///w/tests/test_x.py") == "test"
    for event in ["rejected"] * 5 + ["accepted"] * 3 + ["typed"] * 2:
        stats.count(event, "python", "source")
    stats.count("accepted", "python", "test")
    assert stats.record("python", "source") == (5, 5) and stats.record("python", "test") == (1, 0)
    assert stats.record("lua", "source") == (0, 0)
    assert Stats(tmp_path / "stats.json").record("python", "source") == (5, 5)  # kept on disk
    for _ in range(40):
        stats.count("rejected", "python", "test")
    gate = gate_with(0.4)
    gate.meta = {"gated": {"accept_pct": 70.0}}
    lines = report(stats.load(), gate).splitlines()
    assert lines[0].split() == "all shown 0 accepted 4 typed 2 rejected 45 kept 11.8% ".split()
    assert lines[-1].startswith("python:test") and lines[-1].endswith(f"gate x{gate.strength(1.0, (1, 40)):.2f}")
    assert gate.strength(1.0, (1, 40)) > 1.0 and "gate" not in report(stats.load())


def test_the_stats_command_prints_the_counts_and_the_embedded_gates_learned_strength(tmp_path):
    import os
    import subprocess
    import sys

    stats = Stats(tmp_path / "stats.json")
    for event in ["accepted"] * 2 + ["typed"] * 3 + ["rejected"] * 40:
        stats.count(event, "python", "test")
    env = {**os.environ, "GHOSTLINE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ghostline", "stats"], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("python:test"))
    assert line.split()[1:9] == ["shown", "0", "accepted", "2", "typed", "3", "rejected", "40"]
    assert line.endswith(f"gate x{LEARN_BOUNDS[1]:.2f}")  # kept 11 %, far below the calibration's 71 %


def test_strength_learned_from_the_record_rests_where_the_calibration_expected_and_is_bounded():
    gate = gate_with(0.4)
    gate.meta = {"gated": {"accept_pct": 70.0}}
    assert gate.expected_accept() == pytest.approx(0.7)
    assert gate.strength(1.0, (0, LEARN_AFTER - 1)) == 1.0  # too few to learn from
    assert gate.strength(1.0, (70, 30)) == pytest.approx(1.0)  # kept what the calibration expected
    assert gate.strength(1.0, (50, 50)) > 1.0 > gate.strength(1.0, (90, 10))  # kept less: stricter; more: looser
    assert gate.strength(1.0, (0, 2000)) == pytest.approx(LEARN_BOUNDS[1])
    assert gate.strength(2.0, (2000, 0)) == pytest.approx(2.0 * LEARN_BOUNDS[0])
    assert gate_with(0.4).strength(1.0, (50, 50)) == pytest.approx(1.0)  # no expectation recorded: a half


def test_the_record_a_request_carries_moves_the_engines_threshold(tiny_engine_factory, tmp_path):
    from ghostline.lsp.positions import Mirror
    from ghostline.lsp.server import GhostlineServer

    eng = tiny_engine_factory("llama")
    eng.gate = gate_with(0.45)  # P(kept) is 0.5: shown at the calibrated threshold
    eng.gate.meta = {"gated": {"accept_pct": 70.0}}
    eng.open("file:///a.py", TEXT)
    opts = CompletionOptions(max_tokens=6, drafts=3, gate=True)
    assert eng.complete("file:///a.py", len(TEXT), opts).drafts
    opts.gate_record = (0, 200)  # a user who kept nothing: stricter, 0.45 ** (1 / 1.5) > 0.5
    assert eng.complete("file:///a.py", len(TEXT), opts).stop_reason == "gated"
    server = GhostlineServer()
    server.stats = Stats(tmp_path / "stats.json")
    for event in ["accepted"] * 4 + ["rejected"] * 30:
        server.stats.count(event, "python", "source")
    server.languages["file:///w/a.py"] = "python"
    assert server.options_for(Mirror(TEXT, 1), len(TEXT), "file:///w/a.py").gate_record == (4, 30)


@pytest.mark.slow
def test_server_withholds_what_the_gate_rejects():
    """Over stdio on a real model: the model's gate (a strict one, written where `ghostline calibrate`
    puts it) withholds an automatic suggestion (inspect tells what it withheld); `gate: false`, or
    asking explicitly, shows it."""
    from ghostline.engine.calibration import user_folder
    from ghostline.engine.loader import resolve
    from ghostline.lsp.client import running_server

    gate_with(0.9).save(user_folder(resolve("smollm2-135m").stem))
    uri = "file:///w/shapes.py"
    lines = TEXT.split("\n")

    async def ask(options, invoked=False):
        async with running_server(options={"max_tokens": 8, "multiline": "never", "debounce_ms": 0, **options}) as c:
            c.open(uri, TEXT)
            res = await c.inline(uri, len(lines) - 1, len(lines[-1]), invoked=invoked)
            last = await c.inspect(uri)
            last = last["last_completion"] if isinstance(last, dict) else last.last_completion
            return [i.insert_text for i in res.items], last

    try:
        items, last = asyncio.run(ask({}))
        stop, withheld = (last["stop_reason"], last["withheld"]) if isinstance(last, dict) else (last.stop_reason, last.withheld)
        assert items == [] and stop == "gated" and withheld.strip()
        assert asyncio.run(ask({"gate": False}))[0]
        assert asyncio.run(ask({}, invoked=True))[0]  # asked for explicitly: shown whatever the gate says
    finally:
        (user_folder(resolve("smollm2-135m").stem) / "gate.json").unlink()


def test_the_gate_reads_each_drafts_score_per_token(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("file:///a.py", TEXT)
    eng.gate = gate_with(0.4)
    out = eng.complete("file:///a.py", len(TEXT), CompletionOptions(max_tokens=6, drafts=3, gate=True))
    assert len(out.draft_scores) == len(out.drafts) >= 2 and all(lp <= 0 for lp in out.draft_scores)
    n = len(FEATURES)
    w = [0.0] * n
    w[FEATURES.index("mean_score")], w[FEATURES.index("score_gap")] = 1.0, 0.5
    eng.gate = Gate([0.0] * n, [1.0] * n, w, 0.0, 0.0)
    again = eng.complete("file:///a.py", len(TEXT), CompletionOptions(max_tokens=6, drafts=3, gate=True))
    lp = again.draft_scores
    assert again.confidence == pytest.approx(1 / (1 + np.exp(-(lp[0] + 0.5 * (lp[0] - lp[1])))))


def test_calibration_records_give_the_features_the_engine_gates_on(tiny_engine_factory, tmp_path):
    from ghostline.engine.calibration import collect_gate
    from ghostline.engine.gate import record_features

    (tmp_path / "shapes.py").write_text(TEXT.rstrip() + "\n" + "\n".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(12)))
    eng = tiny_engine_factory("llama")
    eng.gate = Gate([0.0] * len(FEATURES), [1.0] * len(FEATURES), list(np.linspace(-1, 1, len(FEATURES))), 0.1, 0.0)
    rows = list(collect_gate(eng, [tmp_path / "shapes.py"], tasks=2, max_tokens=6, progress=lambda _: None))
    assert rows and all(set(r) >= {"first", "drafts", "scores", "above", "line_before", "line_after", "kept"} for r in rows)
    for r in rows:  # the same document and cursor, decoded live with the gate reading it
        text = r["above"] + "\n" + r["line_before"] + r["line_after"]
        eng.open("file:///again.py", text)
        live = eng.complete("file:///again.py", len(r["above"]) + 1 + len(r["line_before"]),
                            CompletionOptions(max_tokens=6, drafts=3, gate=False))
        assert live.drafts == r["drafts"]
        assert eng.gate.p_kept(record_features(r))[0] == pytest.approx(live.confidence)


def test_history_tasks_are_the_document_after_the_edit_without_the_target(tiny_engine_factory, tmp_path):
    from ghostline.engine.calibration import collect_gate, history_tasks

    after = TEXT.rstrip() + "\n" + "\n".join(f"def f{i}(x):\n    return x * {i}" for i in range(3)) + "\n"
    lines = after.split("\n")
    row = lines.index("    return x * 1")
    tasks = tmp_path / "edits.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "source": f"shapes@{c}:pkg/shapes.py", "after": after,
                                         "cursor": {"line": row, "character": 4}, "target": "return x * 1"}) + "\n"
                             for i, c in enumerate(("abc123", "def456"))))
    got = list(history_tasks([tasks]))
    assert [t["path"] for t in got] == ["shapes:pkg/shapes.py"] * 2  # one file, one side of the held-out split
    t = got[0]
    assert t["target"] == "return x * 1" and "return x * 1" not in t["text"]
    assert t["text"][: t["offset"]].endswith("def f1(x):\n    ") and t["text"][t["offset"] :].startswith("\ndef f2(x)")
    eng = tiny_engine_factory("llama")
    rows = list(collect_gate(eng, [], tasks=1, max_tokens=6, cursors=iter(got), progress=lambda _: None))
    assert len(rows) == 1 and rows[0]["path"] == "shapes:pkg/shapes.py" and rows[0]["target"] == "return x * 1"


def test_cursor_tasks_cut_at_the_indentation_or_after_the_first_word(tmp_path):
    """At the indentation the target is the line's text; mid-line the cursor follows the first word,
    which stays in the document, and the target is the rest of the line with its leading blank (the
    accept model compares from the cursor); a line of one word is never cut mid-line."""
    from ghostline.engine.calibration import cursor_tasks

    code = "\n".join(f"value_{i} = compute({i}, scale=2)" if i % 2 else "pass" for i in range(40)) + "\n"
    (tmp_path / "m.py").write_text(code)
    at = list(cursor_tasks([tmp_path / "m.py"], per_file=40))
    mid = list(cursor_tasks([tmp_path / "m.py"], per_file=40, mid_line=True))
    assert {t["target"] for t in at} >= {"pass"} and len(mid) == sum(t["target"] != "pass" for t in at) > 0
    for t in mid:
        before = t["text"][: t["offset"]].rsplit("\n", 1)[1]
        assert before.startswith("value_") and t["target"].startswith(" = compute(")
        assert before + t["target"] in code and before + t["target"] not in t["text"]


def test_the_context_gates_records_are_decodes_that_read_their_projects_context(tiny_engine_factory, tmp_path):
    from ghostline.engine.calibration import calibrate_gate, collect_gate
    from ghostline.lsp.context import Projects

    root, body = tmp_path / "corpus", "\n".join(f"def f{i}(width, height):\n    return width * height + {i}\n" for i in range(8))
    (root / "shapes").mkdir(parents=True)
    (root / "shapes" / "area.py").write_text(body)
    (root / "shapes" / "solid.py").write_text("def volume(width, height, depth):\n    return width * height * depth\n")
    (root / "alone.py").write_text(body)  # directly under the root: no project, so no context
    projects = Projects([root])
    assert projects(root / "alone.py", body, len(body)) == ""
    head = projects(root / "shapes" / "area.py", body, len(body))
    assert head.startswith("# solid.py\n") and "area.py" not in head  # the file itself is never its context
    eng = tiny_engine_factory("llama")
    rows = list(collect_gate(eng, [root / "alone.py", root / "shapes" / "area.py"], tasks=2, max_tokens=6,
                             context=projects, progress=lambda _: None))
    assert rows and all(r["path"].endswith("area.py") and r["context_tokens"] > 0 for r in rows)
    records = tmp_path / "rows.jsonl"
    rng = np.random.default_rng(5)
    with open(records, "w") as f:
        for i in range(240):
            p = float(rng.uniform(0.05, 1.0))
            kept = int(rng.uniform() < p)
            f.write(json.dumps({"path": f"/code/m{i % 40}.py", "first": [p, p / 2, 1 - p], "drafts": ["x = y(z)"],
                                "scores": [-1.0], "above": "y = 1", "line_before": "", "line_after": "", "kept": kept,
                                "chars": 6 * kept, "context_tokens": 100}) + "\n")
    path = calibrate_gate(None, "m", [], out=tmp_path / "model", rows_files=[records], progress=lambda _: None)
    assert path.name == "gate-context.json" and Gate.load(path).meta["context"]
    with open(records, "a") as f:  # one record of a completion without context among them
        f.write(json.dumps({**json.loads(records.read_text().split("\n")[0]), "context_tokens": 0}) + "\n")
    with pytest.raises(ValueError, match="mix"):
        calibrate_gate(None, "m", [], out=tmp_path / "model", rows_files=[records], progress=lambda _: None)


def test_the_gate_refits_from_stored_records_without_decoding(tmp_path):
    """Records stored by earlier collections (two files here) are fitted together, nothing decoded
    (no engine); a second file that does not exist is refused rather than half the records used."""
    from ghostline.engine.calibration import calibrate_gate

    rng = np.random.default_rng(3)
    files = [tmp_path / "rows.jsonl.gz", tmp_path / "more.jsonl"]
    for n, rows_file in enumerate(files):
        with (gzip.open(rows_file, "wt") if rows_file.suffix == ".gz" else open(rows_file, "w")) as f:
            for i in range(120):
                p = float(rng.uniform(0.05, 1.0))
                kept = int(rng.uniform() < p)
                f.write(json.dumps({"path": f"/code/m{n}{i % 30}.py", "first": [p, p / 2, 1 - p], "drafts": ["x = y(z)"],
                                    "scores": [-1.0], "above": "y = 1\nz = 2", "line_before": "", "line_after": "",
                                    "kept": kept, "chars": 6 * kept}) + "\n")
    path = calibrate_gate(None, "m", [], out=tmp_path / "model", rows_files=files, progress=lambda _: None)
    gate = Gate.load(path)
    assert gate.meta["tasks"] == 240 and gate.meta["held_out_auc"] > 0.6
    with pytest.raises(ValueError, match="not found"):
        calibrate_gate(None, "m", [], out=tmp_path / "model", rows_files=[files[0], tmp_path / "absent.jsonl"],
                       progress=lambda _: None)
    assert gate.weights[FEATURES.index("first_p")] > 0 and gate.forest is None and gate.meta["model"] == "logistic"
    forest = Gate.load(calibrate_gate(None, "m", [], out=tmp_path / "forest", rows_files=files, model="forest",
                                      progress=lambda _: None))
    assert forest.forest is not None and forest.meta["model"] == "forest" and forest.meta["held_out_auc"] > 0.6
