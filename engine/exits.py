"""Exit heads and the early-exit controller (SEC, arXiv 2401.09964), fitted on teacher-forced code.

Terms, as used below:
- layer l: the hidden state after the first l decoder layers (l = L is the model's own output).
- normalised hidden: h / rms(h); both sides of every fit below use it, so the residual stream's
  growing scale does not matter.
- exit head at l: a tuned lens, one d x d affine map per candidate layer from the normalised hidden
  at l to the normalised hidden at L, read through the model's own final norm and LM head: fitted
  by least squares, then distilled (`distill`: KL to the full model's next-token distribution over
  the head's rows). SEC's vocab-sized head per layer would be ~168M parameters a layer on Gemma 3;
  this is 0.4M, and the shared head alone (the logit lens, A = I) is measured beside it by `fit`.
- mini head: the M rows of the head whose tokens are most often the true next token in the fit's
  training files, folded with the final norm's scale ([M, D]); its logits of the lens's output cost
  about a fifth of a layer and say how sure the exit head is (entropy, top probability, margin).
- controller: at each candidate layer, a logistic regression on the normalised hidden and the mini
  head's three logit features gives P(exit): that the exit head agrees with the full model (SEC's
  label, that it predicts the true token, saved fewer layers for the same harm on held-out
  code); at layer L, another one on the logits' entropy, top probability and top-two margin
  gives P(stop): that no layer's head predicts the true token, SEC's stop label. (The hidden state
  itself as a stop feature over-fits: held-out precision fell.) A step *exits* at the first
  candidate layer whose P(exit) clears the exit threshold, *stops* (the suggestion ends before the
  token) when P(stop) clears the halt threshold, and otherwise continues to the next layer.
- candidate layers: `fit` keeps the `keep` layers (of those offered) whose exits save the most
  layers on held-out files at the agreement target, with a least-squares lens and the hidden alone.
- thresholds: chosen on held-out files (`fit`): the halt threshold is the lowest whose halted
  tokens are wrong at least `halt_precision` of the time, the exit threshold the lowest whose exited
  tokens agree with the full model at least `exit_agreement` of the time.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

EXITS_FILE = "exits.npz"


def normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def logit_features(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., 3]: entropy (nats), top probability, top-two margin."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    ent = -(p * torch.nan_to_num(logp, neginf=0.0)).sum(-1)
    top = p.topk(2, -1).values
    return torch.stack([ent, top[..., 0], top[..., 0] - top[..., 1]], -1)


@dataclass
class Exits:
    """A model's exit heads and controller. Shapes: C candidate layers, D model width."""

    layers: list[int]  # candidate exit layers, ascending, each < L
    maps: torch.Tensor  # [C, D, D] tuned lens
    bias: torch.Tensor  # [C, D]
    exit_w: torch.Tensor  # [C, D + 3 + 1] logistic weights on [hidden, mini head features, 1] ([C, D + 1]: no mini head)
    stop_w: torch.Tensor  # [4] on [entropy, top p, margin, 1]
    mini: torch.Tensor | None = None  # [M, D] the mini head's rows, folded with the final norm's scale
    exit_threshold: float = math.inf  # inf: never exit
    halt_threshold: float = math.inf  # inf: never stop
    meta: dict | None = None
    _fast: tuple | None = field(default=None, init=False, repr=False, compare=False)  # `decide`'s int8 copies

    def lens(self, c: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden [..., D] at candidate layer `layers[c]` -> what the model's head reads."""
        return (normalise(x) @ self.maps[c] + self.bias[c]).to(x.dtype)

    def features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The controller's features [..., F] of hidden x and its lens output y [..., D]."""
        if self.mini is None:
            return normalise(x)
        return torch.cat([normalise(x), logit_features(normalise(y) @ self.mini.T)], -1)

    def judge(self, c: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden x [..., D] at candidate c -> (P(exit) [...], the lens output [..., D])."""
        y = self.lens(c, x)
        w = self.exit_w[c]
        return torch.sigmoid(self.features(x, y) @ w[:-1] + w[-1]), y

    def p_exit(self, c: int, x: torch.Tensor) -> torch.Tensor:
        return self.judge(c, x)[0]

    def decide(self, c: int, x: torch.Tensor) -> torch.Tensor | None:
        """One decode step's exit decision at candidate c: hidden x [D] -> the lens output [D] when
        P(exit) clears the exit threshold, else None. `judge`'s arithmetic with the lens and the mini
        head in int8 rows (`engine.quant`: the C product where it serves; read from memory after the
        layers evicted them, fp32 copies cost 0.4 ms a step, int8 a quarter) and the rest on host
        floats and numpy (no BLAS: its idle threads would take the cores from the C step's)."""
        from ghostline.engine.quant import int8_matmul

        candidates, mini = self._prepared()
        qa, sa, b, w_h, w_0, w_f = candidates[c]
        h = x.detach().float()
        h = h * (1.0 / math.sqrt(float(h.dot(h)) / len(h) + 1e-6))
        y = int8_matmul(h, qa, sa) + b  # [D] = h @ a + b
        z = float(h.dot(w_h)) + w_0
        if mini is not None:
            lg = (int8_matmul(y, *mini) * (1.0 / math.sqrt(float(y.dot(y)) / len(y) + 1e-6))).numpy()  # [M]
            top2 = np.partition(lg, len(lg) - 2)[-2:]
            e = np.exp(lg - top2[1])
            total = float(e.sum())
            p1, p2 = 1.0 / total, math.exp(float(top2[0] - top2[1])) / total
            entropy = math.log(total) - float((e * (lg - top2[1])).sum()) / total
            z += w_f[0] * entropy + w_f[1] * p1 + w_f[2] * (p1 - p2)
        p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        return y.to(x.dtype) if p >= self.exit_threshold else None

    def _prepared(self) -> tuple[list, tuple | None]:
        """`decide`'s int8 lens, bias and split controller weights per candidate, and the int8 mini
        head (made once, shared by the copies `with_thresholds` makes for each request)."""
        from ghostline.engine.quant import quantize_rows

        if self._fast is None:
            feats = 3 if self.mini is not None else 0
            candidates = []
            for m, b, w in zip(self.maps, self.bias, self.exit_w):
                qa, sa = quantize_rows(m.T)
                candidates.append((qa, sa.float(), b, w[: len(w) - 1 - feats], float(w[-1]),
                                   w[len(w) - 1 - feats : -1].tolist()))
            mini = None
            if self.mini is not None:
                qm, sm = quantize_rows(self.mini)
                mini = (qm, sm.float())
            self._fast = (candidates, mini)
        return self._fast

    def p_stop(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-depth logits [..., V] -> P(stop) [...]."""
        w = self.stop_w
        return torch.sigmoid(logit_features(logits) @ w[:-1] + w[-1])

    def with_thresholds(self, *, exit: float | None = None, halt: float | None = None) -> "Exits":
        out = replace(self, exit_threshold=self.exit_threshold if exit is None else exit,
                      halt_threshold=self.halt_threshold if halt is None else halt)
        out._fast = self._prepared()
        return out

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EXITS_FILE
        np.savez_compressed(path, layers=np.array(self.layers), maps=self.maps.half().numpy(),
                            bias=self.bias.numpy(), exit_w=self.exit_w.numpy(), stop_w=self.stop_w.numpy(),
                            **({} if self.mini is None else {"mini": self.mini.half().numpy()}),
                            thresholds=np.array([self.exit_threshold, self.halt_threshold]))
        (folder / "exits.json").write_text(json.dumps(self.meta or {}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Exits":
        z = np.load(path)
        meta_path = path.with_suffix(".json")
        return cls(layers=z["layers"].tolist(), maps=torch.from_numpy(z["maps"]).float(),
                   bias=torch.from_numpy(z["bias"]).float(), exit_w=torch.from_numpy(z["exit_w"]).float(),
                   stop_w=torch.from_numpy(z["stop_w"]).float(),
                   mini=torch.from_numpy(z["mini"]).float() if "mini" in z else None, exit_threshold=float(z["thresholds"][0]),
                   halt_threshold=float(z["thresholds"][1]),
                   meta=json.loads(meta_path.read_text()) if meta_path.is_file() else None)


def default_layers(n_layers: int) -> list[int]:
    """The layers `fit` may choose exits from: every layer of the last third."""
    return list(range(2 * n_layers // 3, n_layers))


# fitting ------------------------------------------------------------------------------------------


def ridge(x: torch.Tensor, y: torch.Tensor, *, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ x A + b with an L2 penalty on A; x [N, D], y [N, E] -> A [D, E], b [E]."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = (x - mx).double(), (y - my).double()
    gram = xc.T @ xc + lam * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    a = torch.linalg.solve(gram, xc.T @ yc).float()
    return a, my - mx @ a


def logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS; x [N, F] (features standardised inside),
    y [N] in {0, 1} -> weights [F + 1] on the raw features (last: intercept)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1] + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], y.float())
        out = out + l2 * w[:-1].pow(2).sum()
        out.backward()
        return out

    with torch.enable_grad():
        opt.step(loss)
    w = w.detach()
    raw = w[:-1] / sd
    return torch.cat([raw, (w[-1] - (mu * raw).sum())[None]])


def lowest_threshold(prob: np.ndarray, good: np.ndarray, *, target: float, min_count: int = 20) -> float:
    """The lowest cut-off c such that the positions with prob >= c are `good` at least `target` of
    the time (and there are at least `min_count` of them); inf when none is."""
    order = np.argsort(-prob)
    hits = np.cumsum(good[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero((hits >= target) & (np.arange(1, len(order) + 1) >= min_count))[0]
    return float(prob[order][ok.max()]) if len(ok) else math.inf


@dataclass
class States:
    """Teacher-forced hidden states of real code: per position, the normalised hidden after every
    layer, the true next id and the file it came from (for held-out splits by file)."""

    hidden: torch.Tensor  # [N, L, D] fp16, normalised
    target: torch.Tensor  # [N] true next ids
    file: torch.Tensor  # [N] file index


@torch.no_grad()
def collect(model, forced: Iterable[tuple[Path, list[int], object]], *, budget: int = 24_000,
            progress=print) -> States:
    """Run files through the model (teacher forcing: `forced` yields each file's path, ids and an empty
    cache sized for them, as `engine.calibration.teacher_forced`) and keep every layer's normalised hidden."""
    hs, ts, fs, seen = [], [], [], 0
    for n, (path, ids, cache) in enumerate(forced):
        for s in range(0, len(ids) - 1, 256):
            e = min(len(ids), s + 256)
            states: list[torch.Tensor] = []
            model(torch.tensor([ids[s:e]]), torch.arange(s, e), cache, return_hidden=True, states=states)
            keep = min(e, len(ids) - 1) - s  # positions with a next token
            hs.append(torch.stack([normalise(x[0, :keep]) for x in states], 1).half())  # [T, L, D]
            ts.append(torch.tensor(ids[s + 1 : s + 1 + keep]))
            fs.append(torch.full((keep,), n))
        seen += len(ids)
        progress(f"exits: {seen} tokens from {path.name}")
        if seen >= budget:
            break
    return States(torch.cat(hs), torch.cat(ts), torch.cat(fs))


class RowHead:
    """The model's final norm + LM head over a shortlist of rows (the code vocabulary), for fitting:
    the argmax over the rows, with true ids outside the rows counted as misses."""

    def __init__(self, model, rows: torch.Tensor):
        w = model.embed_tokens.weight if model.args.tie_embeddings else model.lm_head.weight
        self.norm = copy.deepcopy(model.norm).float().requires_grad_(False)  # the fits never train it
        self.rows = rows
        self.weight = getattr(model.lm_head, "source", w).detach()[rows].float()  # [R, D]
        self.index = torch.full((model.args.vocab_size,), -1, dtype=torch.long)
        self.index[rows] = torch.arange(len(rows))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()) @ self.weight.T

    def folded(self, rows: torch.Tensor) -> torch.Tensor:
        """Head rows (indices into the shortlist) [M] -> [M, D] times the final norm's scale, so that
        normalise(x) @ folded.T are those rows' logits."""
        w = self.norm.weight.float()
        return self.weight[rows] * (w + self.norm.offset if self.norm.offset else w)

    def argmax(self, x: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
        return torch.cat([self.logits(x[s : s + chunk]).argmax(-1) for s in range(0, len(x), chunk)])

    def features(self, x: torch.Tensor, *, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """argmax [N] and logit features [N, 3] (see `logit_features`)."""
        arg, feats = [], []
        for s in range(0, len(x), chunk):
            lg = self.logits(x[s : s + chunk])
            arg.append(lg.argmax(-1))
            feats.append(logit_features(lg))
        return torch.cat(arg), torch.cat(feats)


def distill(x: torch.Tensor, final: torch.Tensor, head: RowHead, a: torch.Tensor, b: torch.Tensor, *,
            epochs: int = 2, batch: int = 256, lr: float = 1e-4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine a lens y = x a + b (from `ridge`) on what it is for: Adam on KL(full model's next-token
    distribution || the lens's) over the head's rows. x, final [N, D] normalised hiddens at the exit
    layer and at L. Least squares weighs every direction of the hidden state alike; the head reads
    only some (on Gemma 3 270M at layer 13: held-out top-1 agreement 70 % -> 75 %)."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    opt = torch.optim.Adam([a, b], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), batch):
                i = order[s : s + batch]
                with torch.no_grad():
                    want = torch.log_softmax(head.logits(final[i]), -1)
                got = torch.log_softmax(head.logits(x[i] @ a + b), -1)
                loss = torch.nn.functional.kl_div(got, want, log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
    return a.detach(), b.detach()


def fit(states: States, head: RowHead, *, layers: list[int], keep: int = 1, held_out: float = 0.3,
        lam: float = 1e-3, epochs: int = 2, mini_rows: int = 1024, halt_precision: float = 0.85,
        exit_agreement: float = 0.98, report_layers: list[int] | None = None, progress=print) -> Exits:
    """Fit the exit heads, the controller and its thresholds; held-out files choose the candidate
    layers and the thresholds and give the figures recorded in `meta` (per layer: top-1 agreement
    with the full model and with the true token of the logit lens, least squares and, where kept,
    the distilled lens)."""
    N, L, D = states.hidden.shape
    files = states.file.unique()
    test_files = files[torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[: max(1, int(len(files) * held_out))]]
    test = torch.isin(states.file, test_files)
    tr, te = ~test, test
    final = states.hidden[:, L - 1].float()
    target = head.index[states.target]  # [N] row of the true token, -1 outside the shortlist
    full_arg, full_feat = head.features(final)
    lenses, report, saves, right = {}, {}, {}, {L: full_arg == target}
    for l in sorted(set(layers) | set(report_layers or [])):
        x = states.hidden[:, l - 1].float()
        a, b = ridge(x[tr], final[tr], lam=lam)
        tuned = head.argmax(x @ a + b)
        row = {"tuned_agree": float((tuned[te] == full_arg[te]).float().mean()),
               "tuned_right": float((tuned[te] == target[te]).float().mean())}
        if report_layers and l in report_layers:
            plain = head.argmax(x[te])
            row |= {"logit_lens_agree": float((plain == full_arg[te]).float().mean()),
                    "logit_lens_right": float((plain == target[te]).float().mean())}
        if l in layers:  # how much this layer alone would save (least squares, the hidden alone)
            lenses[l] = (a, b)
            right[l] = tuned == target
            w = logistic(x[tr], tuned[tr] == full_arg[tr])
            p = torch.sigmoid(x[te] @ w[:-1] + w[-1])[None]
            row["alone_saves"] = saves[l] = exit_threshold(p, (tuned == full_arg)[te][None], np.array([l]), L,
                                                           target=exit_agreement)[1]
        report[l] = row
        progress(f"exits: layer {l}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    layers = sorted(sorted(saves, key=lambda l: -saves[l])[:keep])
    counts = torch.bincount(target[tr].clamp_min(0), minlength=len(head.rows))
    mini = head.folded(counts.argsort(descending=True)[:mini_rows])
    maps, biases, exit_w, agree = [], [], [], []
    for l in layers:
        x = states.hidden[:, l - 1].float()
        progress(f"exits: distilling the lens at layer {l} ({epochs} epochs over {int(tr.sum())} tokens)")
        a, b = distill(x[tr], final[tr], head, *lenses[l], epochs=epochs)
        y = x @ a + b
        arg = head.argmax(y)
        report[l] |= {"distilled_agree": float((arg[te] == full_arg[te]).float().mean()),
                      "distilled_right": float((arg[te] == target[te]).float().mean())}
        progress(f"exits: layer {l}: distilled lens agrees {report[l]['distilled_agree']:.3f} "
                 f"(least squares {report[l]['tuned_agree']:.3f})")
        maps.append(a)
        biases.append(b)
        right[l] = arg == target
        agree.append((arg == full_arg)[te])
        feats = torch.cat([x, logit_features(normalise(y) @ mini.T)], -1)
        exit_w.append(logistic(feats[tr], (arg == full_arg)[tr]))
    stop = ~torch.stack(list(right.values())).any(0)  # no offered head predicts the true token: SEC's stop label
    stop_w = logistic(full_feat[tr], stop[tr])
    exits = Exits(layers, torch.stack(maps), torch.stack(biases), torch.stack(exit_w), stop_w, mini=mini)
    # thresholds on the held-out files
    p_stop = torch.sigmoid(full_feat[te] @ stop_w[:-1] + stop_w[-1]).numpy()
    wrong = (full_arg[te] != target[te]).numpy()
    halt = lowest_threshold(p_stop, wrong, target=halt_precision)
    p_exit = torch.stack([exits.p_exit(c, states.hidden[te, l - 1].float()) for c, l in enumerate(layers)])  # [C, n]
    exit_thr, saved = exit_threshold(p_exit, torch.stack(agree), np.array(layers), L, target=exit_agreement)
    exits.exit_threshold, exits.halt_threshold = exit_thr, halt
    exits.meta = {"tokens": N, "train_tokens": int(tr.sum()), "held_out_tokens": int(te.sum()), "layers": L,
                  "candidates": exits.layers, "offered": sorted(saves), "lam": lam, "epochs": epochs,
                  "mini_rows": mini_rows, "per_layer": {str(k): v for k, v in report.items()},
                  "full_right": float(right[L][te].float().mean()), "stop_share": float(stop[te].float().mean()),
                  "halt_threshold": halt, "halt_precision_target": halt_precision,
                  "halted_share": float((p_stop >= halt).mean()),
                  "exit_threshold": exit_thr, "exit_agreement_target": exit_agreement,
                  "held_out_layers_saved": saved}
    progress(f"exits: halt threshold {halt:.3f} (halts {exits.meta['halted_share']:.1%} of held-out tokens), "
             f"exit threshold {exit_thr:.3f} at layer(s) {layers} (saves {saved:.1%} of layers on held-out tokens)")
    return exits


def exit_threshold(p_exit: torch.Tensor, agree: torch.Tensor, layers: np.ndarray, n_layers: int, *,
                   target: float) -> tuple[float, float]:
    """The lowest threshold whose exits (each token at the first candidate layer with P(exit) >= it)
    agree with the full model at least `target` of the time; returns it and the share of layers saved."""
    best = (math.inf, 0.0)
    for thr in np.unique(np.round(p_exit.numpy(), 3))[::-1]:
        hit = p_exit >= float(thr)  # [C, n]
        any_hit = hit.any(0)
        if not any_hit.any():
            continue
        first = hit.float().argmax(0)  # first candidate that fires
        agreed = agree.gather(0, first[None])[0]
        share = float(agreed[any_hit].float().mean())
        if share < target:
            break
        saved = float(((n_layers - torch.as_tensor(layers)[first]) * any_hit).sum() / (n_layers * p_exit.shape[1]))
        best = (float(thr), saved)
    return best
