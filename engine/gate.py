"""The show gate: before a suggestion reaches the user, decide whether to show it at all.

Most wrong suggestions are wrong from their first word, and the model usually knows it: its
distribution at the cursor is flat, the k drafts disagree on how the line starts. The gate reads
what decoding already computed (no extra forward) into a few features, and a logistic regression
fit on real code (`ghostline calibrate --steps gate`, the label being "the user would keep at least
a word of it", EVAL.md's accept model) turns them into P(kept) (`--gate-model forest`: a random
forest, `Forest`, which ranks held-out code better but did not gate it better; not shipped). A
suggestion below the threshold is withheld. Numpy only: the fit takes a second, a decision
microseconds (a forest's ~0.2 ms). What a user keeps moves the
threshold (`Gate.strength`): once enough suggestions were decided, a user who keeps more than the
calibration expected at its threshold gets a looser gate, one who keeps less a stricter one. A
completion that reads context in front of the document (other files' chunks) is gated by a fit of
its own on decodes made so where one was fitted (`gate-context.json`, `ghostline calibrate --steps
gate --gate-context`; none ships: on such decodes it ranked no better than this one).

Features (`features`), all known when the decode ends:
- the first step's distribution at the cursor (temperature 1): top probability, top-1 minus top-2,
  entropy;
- the drafts' agreement: the share of drafts whose first line starts with the best one's first word;
- the whole drafts: the best one's decoding score per token (k-draft decoding's score: for superposed
  drafts the sharpened model log-probability mixed with the n-gram tables'), and how far the second
  one's is below it;
- the best draft's first line: length (log), whether it is one word or less;
- the context: typing mid-word, text to the right of the cursor, the cursor at the
  line's indentation, the suggestion spanning several lines;
- the text above the cursor's line (`above`, a few thousand characters at most): whether the first
  line's first name, and what share of its names, already occur there (a model inventing names is
  usually wrong), whether the first line repeats a line above, and the block structure: the line
  above blank, the last non-blank line opening a block (`:`, an open bracket) or the cursor dedented
  from it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GATE_FILE = "gate.json"
LEARN_AFTER = 20  # decided suggestions (accepted + rejected) before the user's record moves the strength
LEARN_BOUNDS = (0.5, 1.5)  # the learned factor on the strength setting
LEARN_PRIOR = 10  # pseudo-counts at the expected acceptance that the user's rate is pulled towards
CONTEXT_GATE_FILE = "gate-context.json"  # the gate for completions that read context in front of the document
FEATURES = ("first_p", "first_margin", "first_entropy", "agree", "mean_score", "score_gap", "log_len", "one_word",
            "mid_word", "right_text", "at_indent", "multiline", "name_seen", "names_seen", "repeats_above",
            "blank_above", "opens_block", "dedent")
MODELS = ("logistic", "forest")  # what gives P(kept) (`fit`)
ABOVE_CHARS = 4000  # how much of the text above the cursor's line the features read
_WORD = re.compile(r"\s*(?:\w+|\S)")
_NAME = re.compile(r"[A-Za-z_]\w*")


@dataclass
class Confidence:
    """The first decoding step's distribution at the cursor (temperature 1), from the decoder."""

    first_p: float = 1.0
    first_margin: float = 1.0
    first_entropy: float = 0.0

    @classmethod
    def of(cls, logits) -> "Confidence":
        """From one row of logits (a torch tensor, -inf for masked ids)."""
        import torch

        p = torch.softmax(logits.float(), dim=-1)
        top = p.topk(min(2, p.shape[-1])).values.tolist()
        nz = p[p > 0]
        return cls(top[0], top[0] - (top[1] if len(top) > 1 else 0.0), float(-(nz * nz.log()).sum()))


def accepted(shown: str, target: str) -> str:
    """What a user keeps of a suggestion (EVAL.md's accept model): accepting word by word while it
    agrees with the target, the longest prefix of the shown first line that is also a prefix of the
    target, cut back to its last whole word; the whole line when the first line equals the target."""
    line = shown.split("\n", 1)[0]
    if line.strip() and line.strip() == target.strip():
        return line.strip()
    agree = 0
    while agree < min(len(line), len(target)) and line[agree] == target[agree]:
        agree += 1
    end = 0
    for word in _WORD.finditer(line):
        if word.end() > agree:
            break
        end = word.end()
    return line[:end]


def first_word(text: str) -> str:
    return text[: first_word_end(text)].strip()


def first_word_end(text: str) -> int:
    """Where the first word of `text`'s first line ends, the blanks before it included (0: none)."""
    m = _WORD.match(text.split("\n", 1)[0])
    return m.end() if m else 0


def features(conf: Confidence, drafts: list[str], *, above: str, line_before: str, line_after: str, multiline: bool,
             scores: list[float] = ()) -> np.ndarray:
    """The gate's feature vector (in FEATURES' order) for a decode whose drafts are best first; `scores`
    the drafts' decoding scores per token, in the same order; `above` the text before the cursor's
    line (its last ABOVE_CHARS characters are read)."""
    best = drafts[0] if drafts else ""
    line = best.split("\n", 1)[0]
    word = first_word(best)
    agree = sum(1 for d in drafts if first_word(d) == word) / len(drafts) if drafts else 0.0
    words = _WORD.findall(line)
    mean_score = scores[0] if scores else 0.0
    gap = scores[0] - scores[1] if len(scores) > 1 else 0.0
    return np.array([conf.first_p, conf.first_margin, conf.first_entropy, agree, mean_score, gap, math.log1p(len(line.strip())),
                     float(len(words) <= 1), float(line_before[-1:].isalnum() or line_before[-1:] == "_"),
                     float(bool(line_after.strip())),
                     float(not line_before.strip()), float(multiline and "\n" in best.strip()),
                     *_context(line, above[-ABOVE_CHARS:], line_before)], dtype=np.float64)


def record_features(r: dict) -> np.ndarray:
    """The features of a stored decode record (`engine.calibration.collect_gate`'s rows)."""
    return features(Confidence(*r["first"]), r["drafts"], above=r["above"], line_before=r["line_before"],
                    line_after=r["line_after"], multiline=False, scores=r["scores"])


def _context(line: str, above: str, line_before: str) -> list[float]:
    """name_seen, names_seen, repeats_above, blank_above, opens_block, dedent (FEATURES)."""
    known = set(_NAME.findall(above))
    names = _NAME.findall(line)
    lines = above.removesuffix("\n").split("\n")
    shown = (line_before + line).strip()
    last = next((ln for ln in reversed(lines) if ln.strip()), "")
    indent = len(line_before) - len(line_before.lstrip())
    return [float(bool(names) and names[0] in known), sum(n in known for n in names) / len(names) if names else 1.0,
            float(bool(shown) and any(ln.strip() == shown for ln in lines)), float(not lines[-1].strip()),
            float(last.rstrip().endswith((":", "(", "[", "{"))),
            float(bool(last) and indent < len(last) - len(last.lstrip()))]


def situation(text: str, offset: int) -> dict:
    """What of the document the features read, around a cursor at `offset` of `text`."""
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    return {"above": text[max(0, line_start - 1 - ABOVE_CHARS) : max(0, line_start - 1)],
            "line_before": text[line_start:offset], "line_after": text[offset : None if line_end < 0 else line_end]}


@dataclass
class Forest:
    """Decision trees over the gate's features, as flat node arrays; P(kept) is the mean of the leaves
    an example reaches. A node splits on `feature` at `cut` (<= goes `left`); a leaf has feature -1 and
    holds the kept share of its training rows in `value`."""

    feature: list[int]
    cut: list[float]
    left: list[int]
    right: list[int]
    value: list[float]
    roots: list[int]

    def __post_init__(self):
        self._arrays = (np.array(self.feature), np.array(self.cut), np.array(self.left), np.array(self.right),
                        np.array(self.value), np.array(self.roots))

    def predict(self, X: np.ndarray) -> np.ndarray:
        feature, cut, left, right, value, roots = self._arrays
        X = np.atleast_2d(X)  # [N, F]
        node = np.broadcast_to(roots, (len(X), len(roots))).copy()  # [N, T]
        rows = np.arange(len(X))[:, None]
        while (inner := feature[node] >= 0).any():
            f = np.maximum(feature[node], 0)
            step = np.where(X[rows, f] <= cut[node], left[node], right[node])
            node = np.where(inner, step, node)
        return value[node].mean(axis=1)

    @classmethod
    def grow(cls, X: np.ndarray, y: np.ndarray, *, trees: int = 200, min_leaf: int = 10, seed: int = 0) -> "Forest":
        """A random forest: each tree on a bootstrap sample, each split the best (Gini) among
        sqrt(F) features drawn at random, no leaf under `min_leaf` rows. Deterministic for a seed."""
        rng = np.random.default_rng(seed)
        n, F = X.shape
        tries = max(1, int(round(math.sqrt(F))))
        nodes: dict[str, list] = {"feature": [], "cut": [], "left": [], "right": [], "value": []}

        def add(feature=-1, cut=0.0, value=0.0) -> int:
            for k, v in zip(("feature", "cut", "left", "right", "value"), (feature, cut, -1, -1, value)):
                nodes[k].append(v)
            return len(nodes["feature"]) - 1

        roots = []
        for _ in range(trees):
            sample = rng.integers(0, n, n)
            roots.append(add(value=float(y[sample].mean())))
            stack = [(roots[-1], sample)]
            while stack:
                at, idx = stack.pop()
                split = _best_split(X[idx], y[idx], rng.choice(F, tries, replace=False), min_leaf)
                if split is None:
                    continue
                f, c = split
                go = X[idx, f] <= c
                nodes["feature"][at], nodes["cut"][at] = int(f), float(c)
                for side, part in (("left", idx[go]), ("right", idx[~go])):
                    nodes[side][at] = add(value=float(y[part].mean()))
                    stack.append((nodes[side][at], part))
        return cls(**nodes, roots=roots)

    def as_dict(self) -> dict:
        return {"feature": self.feature, "cut": self.cut, "left": self.left, "right": self.right,
                "value": [round(v, 4) for v in self.value], "roots": self.roots}


def _best_split(X: np.ndarray, y: np.ndarray, features: np.ndarray, min_leaf: int) -> tuple[int, float] | None:
    """The (feature, cut) among `features` whose split most lowers the Gini impurity of `y`, or None."""
    n = len(y)
    if n < 2 * min_leaf or y.min() == y.max():
        return None
    best, found = n * 2 * y.mean() * (1 - y.mean()) - 1e-9, None  # the impurity to beat, times n
    for f in features:
        order = np.argsort(X[:, f], kind="stable")
        xs, ys = X[order, f], y[order]
        k = np.arange(min_leaf, n - min_leaf + 1)  # rows on the left
        k = k[xs[k - 1] < xs[np.minimum(k, n - 1)]]  # only between distinct values
        if not len(k):
            continue
        pos = np.cumsum(ys)[k - 1]
        pl, pr = pos / k, (ys.sum() - pos) / (n - k)
        impurity = 2 * (k * pl * (1 - pl) + (n - k) * pr * (1 - pr))
        i = int(np.argmin(impurity))
        if impurity[i] < best:
            best, found = impurity[i], (int(f), float((xs[k[i] - 1] + xs[k[i]]) / 2))
    return found


@dataclass
class Gate:
    """A fitted gate: the threshold on P(kept) chosen on held-out code, and what gives P(kept): a
    logistic regression (standardisation, weights; empty for a forest) or, where fitted so, a forest."""

    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    threshold: float
    meta: dict = field(default_factory=dict)
    forest: Forest | None = None

    def p_kept(self, x: np.ndarray) -> np.ndarray:
        if self.forest is not None:
            return self.forest.predict(np.asarray(x, dtype=np.float64))
        z = (np.atleast_2d(x) - np.array(self.mean)) / np.array(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.array(self.weights) + self.bias)))

    def threshold_at(self, strength: float) -> float:
        """The cut-off at a strength: 0 shows everything, 1 is the calibrated threshold, above is stricter."""
        if strength <= 0:
            return 0.0
        return self.threshold ** (1.0 / strength)

    def expected_accept(self) -> float:
        """The share of shown suggestions users kept on the calibration's held-out code at the threshold
        (0.5 for a gate fitted before that was recorded)."""
        pct = self.meta.get("gated", {}).get("accept_pct")
        return float(pct) / 100 if isinstance(pct, (int, float)) and 0 < pct < 100 else 0.5

    def strength(self, base: float, record: tuple[int, int]) -> float:
        """The strength after a user's (accepted, rejected) suggestions: `base` until LEARN_AFTER were
        decided, then `base` times a factor in LEARN_BOUNDS, 1 where the user keeps what the calibration
        expected (`expected_accept`), above where they keep less, below where they keep more."""
        accepted, rejected = record
        if accepted + rejected < LEARN_AFTER:
            return base
        aim = self.expected_accept()
        rate = (accepted + LEARN_PRIOR * aim) / (accepted + rejected + LEARN_PRIOR)
        return base * min(LEARN_BOUNDS[1], max(LEARN_BOUNDS[0], 1.0 + (aim - rate) * 2))

    def shows(self, x: np.ndarray, strength: float = 1.0) -> bool:
        return bool(self.p_kept(x)[0] >= self.threshold_at(strength))

    def save(self, folder: Path, name: str = GATE_FILE) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        body = {"features": list(FEATURES), "mean": self.mean, "scale": self.scale, "weights": self.weights,
                "bias": self.bias, "threshold": self.threshold, "meta": self.meta}
        text = json.dumps(body, indent=1)
        if self.forest is not None:  # its node arrays on one line, not one number a line
            text = f'{text[:-2]},\n "forest": {json.dumps(self.forest.as_dict())}\n}}'
        path.write_text(text + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Gate":
        raw = json.loads(Path(path).read_text())
        if raw.get("features") != list(FEATURES):
            raise ValueError(f"{path}: gate features {raw.get('features')} differ from {list(FEATURES)}: recalibrate")
        forest = Forest(**raw["forest"]) if raw.get("forest") else None
        return cls(raw["mean"], raw["scale"], raw["weights"], raw["bias"], raw["threshold"], raw.get("meta", {}), forest)


def logistic(X: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, steps: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of an L2-regularised logistic regression (Newton steps) on standardised X."""
    A = np.hstack([X, np.ones((len(X), 1))])
    w = np.zeros(A.shape[1])
    reg = l2 * np.eye(A.shape[1])
    reg[-1, -1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(A @ w)))
        grad = A.T @ (p - y) + reg @ w
        hess = (A * (p * (1 - p))[:, None]).T @ A + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (the chance a kept example outranks a withheld one; ties count half)."""
    pos = y == 1
    if pos.all() or not pos.any():
        return 0.5
    values, inverse = np.unique(score, return_inverse=True)
    counts = np.bincount(inverse)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # mean rank of each tie group, from 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def outcome(p: np.ndarray, y: np.ndarray, chars: np.ndarray, threshold: float) -> dict:
    """The accept model's figures if suggestions with P(kept) >= threshold are shown."""
    show = p >= threshold
    n = len(y)
    return {"shown_pct": 100 * show.mean(), "wrong_per_100": 100 * (show & (y == 0)).sum() / n,
            "chars_saved": float((chars * show).sum() / n),
            "accept_pct": 100 * (show & (y == 1)).sum() / max(1, show.sum())}


def threshold_for(p: np.ndarray, y: np.ndarray, chars: np.ndarray, *, keep_chars: float) -> float:
    """The strictest threshold on P(kept) that still keeps `keep_chars` of the characters users would
    keep if everything were shown (rows with p < 0 are never shown)."""
    full = outcome(p, y, chars, 0.0)["chars_saved"]
    best = 0.0
    for t in np.unique(p[p >= 0]):
        if outcome(p, y, chars, t)["chars_saved"] >= keep_chars * full:
            best = max(best, float(t))
    return best


def fit(X: np.ndarray, y: np.ndarray, chars: np.ndarray, held_out: np.ndarray, *, keep_chars: float = 0.92,
        min_auc: float = 0.6, model: str = "logistic") -> Gate:
    """Fit on the rows not `held_out` (`model`: `logistic` or `forest`), choose the threshold on the
    held-out rows: the strictest that keeps `keep_chars` of the characters users would keep (accept
    model) when everything is shown. Raises ValueError when the fit does not generalise (held-out AUC
    below `min_auc`)."""
    if model not in MODELS:
        raise ValueError(f"gate model {model!r}: one of {', '.join(MODELS)}")
    train = ~held_out
    if model == "forest":
        gate = Gate([], [], [], 0.0, 0.0, forest=Forest.grow(X[train], y[train]))
    else:
        mu, sd = X[train].mean(0), X[train].std(0)
        sd[sd < 1e-9] = 1.0
        w, b = logistic((X[train] - mu) / sd, y[train])
        gate = Gate(mu.tolist(), sd.tolist(), w.tolist(), b, 0.0)
    p = gate.p_kept(X[held_out])
    score = auc(p, y[held_out])
    if score < min_auc:
        raise ValueError(f"the gate does not generalise: held-out AUC {score:.3f} < {min_auc}")
    yh, ch = y[held_out], chars[held_out]
    full = outcome(p, yh, ch, 0.0)
    best = gate.threshold = threshold_for(p, yh, ch, keep_chars=keep_chars)
    gate.meta = {"model": model, "train": int(train.sum()), "held_out": int(held_out.sum()), "held_out_auc": round(score, 4),
                 "keep_chars": keep_chars, "ungated": _rounded(full), "gated": _rounded(outcome(p, yh, ch, best))}
    return gate


def _rounded(d: dict) -> dict:
    return {k: round(float(v), 3) for k, v in d.items()}
