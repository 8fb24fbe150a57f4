"""Exit heads and the early-exit controller (SEC, arXiv 2401.09964), fitted on teacher-forced code.

Terms, as used below:
- layer l: the hidden state after the first l decoder layers (l = L is the model's own output).
- normalised hidden: h / rms(h); both sides of every fit below use it, so the residual stream's
  growing scale does not matter.
- exit head at l: a tuned lens, one d x d affine map per candidate layer from the normalised hidden
  at l to the normalised hidden at L, read through the model's own final norm and LM head. SEC's
  vocab-sized head per layer would be ~168M parameters a layer on Gemma 3; this is 0.4M, and the
  shared head alone (the logit lens, A = I) is measured beside it by `fit` (see `report`).
- controller: at each candidate layer, a logistic regression on the normalised hidden gives
  P(the exit head at l predicts the true token); at layer L, another one on the logits' entropy, top
  probability and top-two margin gives P(stop): that no layer's head predicts the true token, SEC's
  stop label. (The hidden state itself as a stop feature over-fits: held-out precision fell.) A step *exits* at the first candidate layer whose
  P(exit) clears the exit threshold, *stops* (the suggestion ends before the token) when P(stop)
  clears the halt threshold, and otherwise continues to the next layer.
- thresholds: chosen on held-out files (`fit`): the halt threshold is the lowest whose halted
  tokens are wrong at least `halt_precision` of the time, the exit threshold the lowest whose exited
  tokens agree with the full model at least `exit_agreement` of the time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
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
    exit_w: torch.Tensor  # [C, D + 1] logistic weights (last: intercept)
    stop_w: torch.Tensor  # [4] on [entropy, top p, margin, 1]
    exit_threshold: float = math.inf  # inf: never exit
    halt_threshold: float = math.inf  # inf: never stop
    meta: dict | None = None

    def lens(self, c: int, x: torch.Tensor) -> torch.Tensor:
        """Hidden [..., D] at candidate layer `layers[c]` -> what the model's head reads."""
        return (normalise(x) @ self.maps[c] + self.bias[c]).to(x.dtype)

    def p_exit(self, c: int, x: torch.Tensor) -> torch.Tensor:
        w = self.exit_w[c]
        return torch.sigmoid(normalise(x) @ w[:-1] + w[-1])

    def p_stop(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-depth logits [..., V] -> P(stop) [...]."""
        w = self.stop_w
        return torch.sigmoid(logit_features(logits) @ w[:-1] + w[-1])

    def with_thresholds(self, *, exit: float | None = None, halt: float | None = None) -> "Exits":
        return replace(self, exit_threshold=self.exit_threshold if exit is None else exit,
                       halt_threshold=self.halt_threshold if halt is None else halt)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EXITS_FILE
        np.savez_compressed(path, layers=np.array(self.layers), maps=self.maps.half().numpy(),
                            bias=self.bias.numpy(), exit_w=self.exit_w.numpy(), stop_w=self.stop_w.numpy(),
                            thresholds=np.array([self.exit_threshold, self.halt_threshold]))
        (folder / "exits.json").write_text(json.dumps(self.meta or {}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "Exits":
        z = np.load(path)
        meta_path = path.with_suffix(".json")
        return cls(layers=z["layers"].tolist(), maps=torch.from_numpy(z["maps"]).float(),
                   bias=torch.from_numpy(z["bias"]).float(), exit_w=torch.from_numpy(z["exit_w"]).float(),
                   stop_w=torch.from_numpy(z["stop_w"]).float(), exit_threshold=float(z["thresholds"][0]),
                   halt_threshold=float(z["thresholds"][1]),
                   meta=json.loads(meta_path.read_text()) if meta_path.is_file() else None)


def default_layers(n_layers: int) -> list[int]:
    """Candidate exit layers: every other layer of the last third, and the one before the last."""
    return sorted({*range(2 * n_layers // 3, n_layers, 2), n_layers - 1})


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
def collect(model, tokenizer, files: list[Path], *, tokens_per_file: int = 768, budget: int = 24_000,
            progress=print) -> States:
    """Run the files through the model (teacher forcing) and keep every layer's normalised hidden."""
    from engine.calibration import teacher_forced

    hs, ts, fs, seen = [], [], [], 0
    for n, (path, ids, cache) in enumerate(teacher_forced(model, tokenizer, files, tokens_per_file=tokens_per_file)):
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
        self.model, self.rows = model, rows
        self.weight = getattr(model.lm_head, "source", w).detach()[rows].float()  # [R, D]
        self.index = torch.full((model.args.vocab_size,), -1, dtype=torch.long)
        self.index[rows] = torch.arange(len(rows))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x.float()) @ self.weight.T

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


def fit(states: States, head: RowHead, *, layers: list[int], held_out: float = 0.3, lam: float = 1e-3,
        halt_precision: float = 0.85, exit_agreement: float = 0.97, report_layers: list[int] | None = None,
        progress=print) -> Exits:
    """Fit the exit heads, the controller and its thresholds; held-out files choose the thresholds
    and give the figures recorded in `meta` (per-layer agreement of logit lens and tuned lens)."""
    N, L, D = states.hidden.shape
    layers = sorted(layers)
    files = states.file.unique()
    test_files = files[torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[: max(1, int(len(files) * held_out))]]
    test = torch.isin(states.file, test_files)
    tr, te = ~test, test
    final = states.hidden[:, L - 1].float()
    target = head.index[states.target]  # [N] row of the true token, -1 outside the shortlist
    full_arg, full_feat = head.features(final)
    right = {L: full_arg == target}
    maps, biases, report, agree = [], [], {}, []
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
        report[l] = row
        progress(f"exits: layer {l}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
        if l in layers:
            maps.append(a)
            biases.append(b)
            right[l] = tuned == target
            agree.append((tuned == full_arg)[te])
    exit_w = torch.stack([logistic(states.hidden[tr, l - 1].float(), right[l][tr]) for l in layers])
    stop = ~torch.stack(list(right.values())).any(0)  # no head predicts the true token: SEC's stop label
    stop_w = logistic(full_feat[tr], stop[tr])
    exits = Exits(layers, torch.stack(maps), torch.stack(biases), exit_w, stop_w)
    # thresholds on the held-out files
    p_stop = torch.sigmoid(full_feat[te] @ stop_w[:-1] + stop_w[-1]).numpy()
    wrong = (full_arg[te] != target[te]).numpy()
    halt = lowest_threshold(p_stop, wrong, target=halt_precision)
    p_exit = torch.stack([exits.p_exit(c, states.hidden[te, l - 1]) for c, l in enumerate(layers)])  # [C, n]
    exit_thr, saved = exit_threshold(p_exit, torch.stack(agree), np.array(layers), L, target=exit_agreement)
    exits.exit_threshold, exits.halt_threshold = exit_thr, halt
    exits.meta = {"tokens": N, "train_tokens": int(tr.sum()), "held_out_tokens": int(te.sum()), "layers": L,
                  "candidates": exits.layers, "lam": lam, "per_layer": {str(k): v for k, v in report.items()},
                  "full_right": float(right[L][te].float().mean()), "stop_share": float(stop[te].float().mean()),
                  "halt_threshold": halt, "halt_precision_target": halt_precision,
                  "halted_share": float((p_stop >= halt).mean()),
                  "exit_threshold": exit_thr, "exit_agreement_target": exit_agreement,
                  "held_out_layers_saved": saved}
    progress(f"exits: halt threshold {halt:.3f} (halts {exits.meta['halted_share']:.1%} of held-out tokens), "
             f"exit threshold {exit_thr:.3f} (saves {saved:.1%} of layers on held-out tokens)")
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
