"""PIE: rotating cached keys equals encoding at the new positions; edits keep text, ids and cache
consistent; zero stale tokens equals a full encode."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostline.engine.cache import KVCache
from ghostline.engine.document import Hunk, token_hunks
from ghostline.engine.model import build
from ghostline.engine.text import Change, EditError
from ghostline.kernels.rope_shift import rope_shift
from tests.conftest import tiny_hf

SAMPLE = open(__file__.replace("test_pie.py", "data/sessions_before.py")).read()


class OffsetCache(KVCache):
    """Stores positions p at rows p - offset: encodes a sequence as if it started at `offset`."""

    def __init__(self, *shape, offset: int):
        super().__init__(*shape)
        self.offset = offset

    def update(self, layer, k, v, pos):
        (K, V, _), = super().update(layer, k, v, pos - self.offset)
        return [(K, V, self.offset)]


def encode_at(model, ids, start: int, *, offset: int = 0) -> KVCache:
    a = model.args
    c = OffsetCache(a.n_layers, a.n_kv_heads, a.head_dim, offset=offset)
    c.reserve(start - offset + len(ids))
    c.length = start - offset + len(ids)
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(start, start + len(ids)), c)
    return c


@pytest.mark.parametrize("kind", ["gemma3", "llama3"])
@pytest.mark.parametrize("delta", [37, -5])
def test_rotation_equals_encoding_at_new_positions(kind, delta):
    cfg, hf = tiny_hf(kind, 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(0, 300, (40,)).tolist()
    base = 100
    moved = encode_at(model, ids, base, offset=base)  # rows 0..39 hold positions 100..139
    fresh = encode_at(model, ids, base + delta, offset=base + delta)
    k = torch.full((*moved.k.shape[:2], 200, moved.k.shape[3]), float("nan"))
    v = k.clone()
    k[:, :, 50:90], v[:, :, 50:90] = moved.state
    rope_shift(k, v, 50, 90, 50 + delta, model.args.inv_freq)
    got_k, got_v = k[:, :, 50 + delta : 90 + delta], v[:, :, 50 + delta : 90 + delta]
    want_k, want_v = fresh.state
    # Shift invariance of RoPE attention: pre-RoPE keys do not depend on the absolute position, so the
    # only difference is fp32 rounding of angles at positions < 200 (~1e-5 rad) times |k|.
    scale = want_k.abs().max().item()
    assert (got_k - want_k).abs().max().item() < 1e-4 * max(1.0, scale)
    assert (got_v - want_v).abs().max().item() < 1e-4 * max(1.0, want_v.abs().max().item())


def test_token_hunks():
    assert token_hunks([1, 2, 3], [1, 2, 3]) == []
    assert token_hunks([1, 2, 3, 4], [1, 9, 9, 4]) == [Hunk(1, 3, 1, 3)]
    assert token_hunks([1, 2, 3], [1, 2, 3, 4]) == [Hunk(3, 3, 3, 4)]
    many = list(range(100))
    edited = [0, 50] + many[1:60] + many[61:]
    hunks = token_hunks(many, edited, multi=True)
    assert [(h.old_start, h.old_end) for h in hunks] == [(1, 1), (60, 61)]


def states_close(a: KVCache, b: KVCache, atol: float) -> float:
    (ka, va), (kb, vb) = a.state, b.state
    assert ka.shape == kb.shape
    return max((ka - kb).abs().max().item(), (va - vb).abs().max().item())


def test_insertion_at_end_equals_full_encode(tiny_engine_factory):
    eng = tiny_engine_factory("gemma3")
    text = SAMPLE[:800]
    eng.open("a", text)
    lines = text.split("\n")
    stats = eng.edit("a", [{"range": {"start": {"line": len(lines) - 1, "character": len(lines[-1])},
                                      "end": {"line": len(lines) - 1, "character": len(lines[-1])}},
                            "text": "\n    return session\n"}])
    assert stats.stale == 0 and stats.encoded < 20
    ref = tiny_engine_factory("gemma3")
    ref.open("a", eng.text("a"))
    assert eng.docs["a"].ids == ref.docs["a"].ids
    assert states_close(eng.docs["a"].cache, ref.docs["a"].cache, 0) < 1e-5


def test_hunks_encoded_together_equal_one_edit_per_hunk(tiny_engine_factory):
    """An edit's hunks share forwards (chunks of 8 here, some spanning two hunks); the cache equals
    applying the changes one edit at a time, top to bottom, each hunk encoded on its own."""
    def change(line, text):
        return {"range": {"start": {"line": line, "character": 0}, "end": {"line": line, "character": 0}}, "text": text}

    changes = [change(2, "import json\n"), change(9, "x = compute(1, 2)\n"), change(40, "    return json.dumps(x)\n" * 2)]
    together, apart = tiny_engine_factory("gemma3", encode_chunk=8), tiny_engine_factory("gemma3", encode_chunk=8)
    for eng in (together, apart):
        eng.open("a", SAMPLE[:2500])
    stats = together.edit("a", changes)
    for c in changes:
        apart.edit("a", [c])
    assert stats.hunks == 3 and together.docs["a"].ids == apart.docs["a"].ids
    assert together.docs["a"].stale == apart.docs["a"].stale
    assert states_close(together.docs["a"].cache, apart.docs["a"].cache, 0) < 1e-5


def test_refresh_equals_full_encode_after_middle_edits(tiny_engine_factory):
    eng = tiny_engine_factory("gemma3", encode_chunk=64, refresh_stale_min=8, refresh_stale_share=0.0)
    eng.open("a", SAMPLE[:1500])
    assert not eng.needs_refresh("a")
    eng.edit("a", [{"range": {"start": {"line": 10, "character": 0}, "end": {"line": 12, "character": 0}},
                    "text": "import json\nimport sys\nimport re\n"},
                   {"range": {"start": {"line": 3, "character": 0}, "end": {"line": 3, "character": 4}}, "text": "X"}])
    doc = eng.docs["a"]
    assert doc.stale_count >= 8 and eng.needs_refresh("a")
    ref = tiny_engine_factory("gemma3")
    ref.open("a", eng.text("a"))
    assert states_close(doc.cache, ref.docs["a"].cache, 0) > 1e-3  # stale rows really differ
    eng.refresh("a")
    assert doc.stale_count == 0 and not eng.needs_refresh("a")
    assert states_close(doc.cache, ref.docs["a"].cache, 0) < 1e-5


def test_naive_and_pie_differ_only_in_the_suffix_rotation(tiny_engine_factory):
    change = [{"range": {"start": {"line": 2, "character": 0}, "end": {"line": 2, "character": 0}}, "text": "x = 1\n" * 5}]
    caches = {}
    for strategy in ("pie", "naive"):
        eng = tiny_engine_factory("llama")
        eng.open("a", SAMPLE[:600])
        eng.edit("a", change, strategy=strategy)
        caches[strategy] = eng.docs["a"].cache
    (kp, vp), (kn, vn) = caches["pie"].state, caches["naive"].state
    assert torch.equal(vp, vn)
    assert (kp - kn).abs().max() > 1e-2


def test_bad_edit_changes_nothing(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("a", "x = 1\ny = 2\n")
    before = (eng.text("a"), list(eng.docs["a"].ids))
    with pytest.raises(EditError):
        eng.edit("a", [{"range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 1}}, "text": "z"},
                       {"range": {"start": {"line": 9, "character": 0}, "end": {"line": 9, "character": 0}}, "text": "!"}])
    assert (eng.text("a"), eng.docs["a"].ids) == before
    with pytest.raises(KeyError):
        eng.edit("nope", [])


def test_memory_budget_evicts_least_recently_used(tiny_engine_factory):
    eng = tiny_engine_factory("llama", memory_budget_mb=0.05, encode_chunk=128)
    for name in "abc":
        eng.open(name, SAMPLE[:400])
    assert eng.docs["c"].cache is not None and eng.docs["a"].cache is None
    assert eng.memory_bytes() <= max(0.05 * 2**20, eng.docs["c"].cache.nbytes)
    out = eng.complete("a", 100)  # rebuilt on demand
    assert eng.docs["a"].cache is not None and out.ctx_tokens > 0


def test_edits_that_grow_a_cache_keep_every_cache_within_the_budget(tiny_engine_factory):
    """Growing a cache holds its old storage and the new one at once: the least recently used other
    caches make room first, so the caches never exceed the budget, counting that copy."""
    probe = tiny_engine_factory("llama")
    probe.open("p", SAMPLE[:400])
    unit, grown = probe.docs["p"].cache, len(probe.tok.encode(SAMPLE[:3000])[0])
    budget = (1.5 * unit.nbytes + unit.nbytes + unit.reserve_bytes(grown)) / 2**20  # room for one other cache
    eng = tiny_engine_factory("llama", memory_budget_mb=budget)
    for name in "abc":
        eng.open(name, SAMPLE[:400])
    assert all(eng.docs[n].cache is not None for n in "abc")
    peak, grow = [0], eng.docs["c"].cache.reserve

    def reserve(n):  # the caches while "c" is copied into its new storage
        peak[0] = max(peak[0], eng.memory_bytes() + eng.docs["c"].cache.reserve_bytes(n))
        grow(n)

    eng.docs["c"].cache.reserve = reserve
    eng.edit("c", [Change(400, 400, SAMPLE[400:3000])], encode=False)
    assert eng.docs["a"].cache is None and eng.docs["b"].cache is not None  # the oldest made room
    assert peak[0] <= budget * 2**20 and eng.memory_bytes() <= budget * 2**20


ALPHABET = "ab (_)\n\t:=éü😀x"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.text(ALPHABET, max_size=12)), min_size=1, max_size=6),
       st.booleans())
def test_random_edits_keep_text_ids_and_cache_consistent(tiny_engine_factory, edits, batched):
    eng = tiny_engine_factory("llama")
    text = SAMPLE[:300]
    eng.open("a", text)
    changes = []
    for fa, fb, new in edits:
        a, b = sorted((int(fa * len(text)), int(fb * len(text))))
        changes.append(Change(a, b, new))
        text = text[:a] + new + text[b:]
        if not batched:
            eng.edit("a", changes[-1:])
    if batched:
        eng.edit("a", changes)
    doc = eng.docs["a"]
    assert doc.text == text
    assert doc.ids == eng.tok.encode(text)[0]
    assert doc.cache.length == len(doc.ids) == len(doc.stale)


def test_a_stopped_encode_resumes_and_nothing_reads_missing_rows(tiny_engine_factory):
    """An open stopped after two chunks keeps those rows (fresh), the rest missing; refresh encodes
    only the rest; an edit of a part-encoded document encodes every missing row; a completion
    encodes only the missing rows before its cursor. Each equals the same steps on a document
    encoded in one go."""
    from ghostline.engine.engine import Cancelled, CompletionOptions

    text = SAMPLE[:1200]
    ref = tiny_engine_factory("llama", encode_chunk=64)
    ref.open("d", text)
    eng = tiny_engine_factory("llama", encode_chunk=64, mend_budget=4096)  # no budget: every row it reads
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        eng.open("d", text, should_stop=lambda: next(calls) >= 2)
    doc = eng.docs["d"]
    assert doc.first_stale == 128 and doc.missing_count == doc.stale_count == len(doc.ids) - 128
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        eng.refresh("d", should_stop=lambda: next(calls) >= 1)  # one more chunk, then stopped again
    assert doc.first_stale == 192 and doc.missing_count == len(doc.ids) - 192
    assert eng.refresh("d").encoded == len(doc.ids) - 192
    torch.testing.assert_close(doc.cache.state[0], ref.docs["d"].cache.state[0], rtol=0, atol=1e-5)

    calls = iter(range(100))
    with pytest.raises(Cancelled):
        eng.open("d", text, should_stop=lambda: next(calls) >= 1)
    change = [{"range": {"start": {"line": 3, "character": 0}, "end": {"line": 3, "character": 0}}, "text": "x = 1\n"}]
    eng.edit("d", change)
    doc = eng.docs["d"]
    assert doc.missing_count == 0 and doc.cache.length == len(doc.ids)
    eng.refresh("d")
    fresh = tiny_engine_factory("llama", encode_chunk=64)
    fresh.open("d", eng.text("d"))
    torch.testing.assert_close(doc.cache.state[0], fresh.docs["d"].cache.state[0], rtol=0, atol=1e-5)

    calls = iter(range(100))
    with pytest.raises(Cancelled):
        eng.open("d", text, should_stop=lambda: next(calls) >= 1)
    opts = CompletionOptions(max_tokens=6)
    ref.open("d", text)
    assert eng.complete("d", 700, opts).tokens == ref.complete("d", 700, opts).tokens
    doc = eng.docs["d"]
    P = doc.token_at(700)
    assert 0 < doc.missing_count and doc.first_stale >= P - 1 and doc.cache.length == len(doc.ids)


def test_a_deferred_edit_encodes_what_the_completion_reads_and_equals_the_eager_edit(tiny_engine_factory):
    """`encode=False` leaves the new rows missing: a completion below them encodes them (rows above
    the cursor only) and answers as after an eager edit; `refresh` encodes the rest, and the cache
    then equals the eager edit's."""
    from ghostline.engine.engine import CompletionOptions

    lazy, eager = tiny_engine_factory("gemma3", encode_chunk=32), tiny_engine_factory("gemma3", encode_chunk=32)
    text = SAMPLE[:1500]
    for eng in (lazy, eager):
        eng.open("a", text)
    first = [{"range": {"start": {"line": 4, "character": 0}, "end": {"line": 4, "character": 0}}, "text": "import json\n"}]
    below = [{"range": {"start": {"line": 30, "character": 0}, "end": {"line": 30, "character": 0}},
              "text": "    data = json.loads(raw)\n"}]
    stats = lazy.edit("a", first + below, encode=False)
    eager.edit("a", first + below)
    doc = lazy.docs["a"]
    assert stats.encoded == 0 and 0 < doc.missing_count <= stats.stale
    lines = eager.text("a").split("\n")
    cursor = sum(len(x) + 1 for x in lines[:9]) + len(lines[9])  # the end of line 9, between the edits
    opts = CompletionOptions(max_tokens=8)
    assert lazy.complete("a", cursor, opts).tokens == eager.complete("a", cursor, opts).tokens
    P = doc.token_at(cursor)
    assert doc.missing_count > 0 and doc.first_stale < P  # the rows below the cursor wait ...
    assert not any(m == 2 for m in doc.stale[:P])  # ... those above it were encoded
    assert lazy.background("a").strategy == "mend"  # what the engine does when idle
    assert doc.missing_count == 0 and doc.stale == eager.docs["a"].stale
    assert states_close(doc.cache, eager.docs["a"].cache, 0) < 1e-5


@pytest.mark.parametrize("reread", [8, 10**6])
def test_idle_work_encodes_again_the_stale_rows_before_where_the_user_works(tiny_engine_factory, reread):
    """An edit above the cursor leaves the rows below it rotated and stale; after a completion at the
    end, idle work encodes again the stale rows among the `reread` before it and no others (no refresh
    due here): with enough of them the cache equals one encode."""
    from ghostline.engine.document import FRESH, STALE
    from ghostline.engine.engine import CompletionOptions

    eng = tiny_engine_factory("llama", reread=reread, refresh_stale_share=1.0)
    text = SAMPLE[:1200]
    at = text.index("\n", 300) + 1
    eng.open("a", text)
    eng.edit("a", [Change(at, at, "import json\n")])
    doc, end = eng.docs["a"], len(text) + len("import json\n")
    before = doc.stale_count
    assert before > 8
    eng.complete("a", end, CompletionOptions(max_tokens=4))
    assert eng.describe("a")["due"] == "reread"  # what the idle work does next (`ghostline/inspect`)
    assert [s.strategy for s in iter(lambda: eng.background("a"), None)] == ["reread"]
    assert eng.describe("a")["due"] is None
    P = doc.token_at(end)
    if reread == 8:
        assert doc.stale_count == before - 8 and set(doc.stale[P - 8 : P]) == {FRESH} and doc.stale[P - 9] == STALE
        return
    assert doc.stale_count == 0
    ref = tiny_engine_factory("llama")
    ref.open("a", eng.text("a"))
    assert states_close(doc.cache, ref.docs["a"].cache, 0) < 1e-5


def test_a_deferred_open_encodes_nothing_until_read_and_then_equals_an_eager_open(tiny_engine_factory):
    """`open(encode=False)` (a daemon's resync after a restart) leaves every row missing; a completion
    encodes the rows above its cursor and answers as after an eager open; `background` mends the rest."""
    from ghostline.engine.engine import CompletionOptions

    lazy, eager = tiny_engine_factory("gemma3", encode_chunk=32), tiny_engine_factory("gemma3", encode_chunk=32)
    text = SAMPLE[:1500]
    stats = lazy.open("a", text, encode=False)
    eager.open("a", text)
    doc = lazy.docs["a"]
    assert stats.encoded == 0 and doc.missing_count == len(doc.ids) == stats.stale
    opts = CompletionOptions(max_tokens=8)
    assert lazy.complete("a", 700, opts).tokens == eager.complete("a", 700, opts).tokens
    P = doc.token_at(700)
    assert 0 < doc.missing_count and not any(m == 2 for m in doc.stale[: P - 1])  # row P - 1 is fed, not read
    while lazy.background("a") is not None:
        pass
    assert doc.missing_count == 0 and states_close(doc.cache, eager.docs["a"].cache, 0) < 1e-5


SHIFTS = [(48, 5, 20, 30), (48, 30, 44, 2), (48, 10, 30, 17), (48, 12, 40, 5), (48, 20, 47, 21), (48, 5, 45, 4),
          (48, 7, 7, 3)]  # (capacity, src, end, dst): disjoint, overlapping both ways, +-1, nothing to move


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SHIFTS, ids=[f"{s}-{e}->{d}" for _, s, e, d in SHIFTS])
def test_cpu_rope_shift_is_the_reference_bit_for_bit(case, dtype):
    from ghostline.kernels.rope_shift import rope_shift_cpu, rope_shift_reference

    cap, src, end, dst = case
    gen = torch.Generator().manual_seed(cap + src + end + dst)
    k0, v0 = (torch.randn(3, 2, cap, 32, generator=gen).to(dtype) for _ in range(2))  # [L, KV, cap, hd]
    inv_freq = 1.0 / torch.tensor([10000.0, 500.0, 1e6])[:, None] ** (torch.arange(0, 32, 2).float() / 32)
    k, v, k_ref, v_ref = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    rope_shift_cpu(k, v, src, end, dst, inv_freq)
    rope_shift_reference(k_ref, v_ref, src, end, dst, inv_freq)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_a_rewrite_of_many_lines_encodes_only_what_changed_inside(tiny_engine_factory):
    """A reload from disk replaces a run of lines with a copy that differs in two far apart: the
    cache update encodes those lines' tokens, not all between, and refresh equals a full encode."""
    eng = tiny_engine_factory("llama")
    text = SAMPLE[:1500]
    eng.open("a", text)
    lines = text.split("\n")
    start, end = len("\n".join(lines[:3])) + 1, len("\n".join(lines[:25]))
    one, two = [i for i in range(5, 24) if len(lines[i]) > 12 and text.count(lines[i]) == 1][::8][:2]
    new = text[start:end].replace(lines[one], lines[one] + "  # one").replace(lines[two], lines[two] + "  # two")
    stats = eng.edit("a", [Change(start, end, new)])
    assert stats.encoded < 30 and stats.hunks == 2
    eng.refresh("a")
    ref = tiny_engine_factory("llama")
    ref.open("a", eng.text("a"))
    assert eng.docs["a"].ids == ref.docs["a"].ids
    assert states_close(eng.docs["a"].cache, ref.docs["a"].cache, 0) < 1e-5


def test_a_completion_encodes_at_most_its_budget_and_never_reads_the_rows_it_skips(tiny_engine_factory):
    """Past `mend_budget` missing rows before the cursor, a completion encodes the nearest ones only;
    the others are left out of what it reads (whatever they hold, the answer is the same), and the
    background work encodes them, after which a refresh equals a full encode."""
    from ghostline.engine.document import MISSING
    from ghostline.engine.engine import CompletionOptions

    text = SAMPLE[:1500]
    at = text.index("\n", 600) + 1
    paste = SAMPLE[2000:2400]
    answers = []
    for poison in (float("nan"), 1e4):
        eng = tiny_engine_factory("gemma3", encode_chunk=16, mend_budget=24)
        eng.open("a", text)
        eng.edit("a", [Change(at, at, paste)], encode=False)
        doc = eng.docs["a"]
        missing = doc.missing_before(len(doc.ids))
        assert len(missing) > 24
        doc.cache.k[:, :, missing] = poison
        doc.cache.v[:, :, missing] = poison
        out = eng.complete("a", at + len(paste), CompletionOptions(max_tokens=8))
        answers.append(out.tokens)
        done = [p for p in missing if doc.stale[p] != MISSING]
        skipped = [p for p in missing if doc.stale[p] == MISSING and p < done[-1]]
        assert len(done) == 24 and skipped and max(skipped) < min(done)  # the 24 nearest the cursor
    assert answers[0] == answers[1] and answers[0]
    assert eng.background("a").strategy == "mend" and doc.missing_count == 0
    eng.refresh("a")
    ref = tiny_engine_factory("gemma3")
    ref.open("a", eng.text("a"))
    assert states_close(doc.cache, ref.docs["a"].cache, 0) < 1e-5
