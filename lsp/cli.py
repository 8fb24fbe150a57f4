"""The `ghostline` command: serve (LSP), engine (the shared engine daemon), complete (a quick demo), info
(load a model and report), stats."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _complete(args) -> int:
    from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
    from ghostline.engine.text import offset_of

    text = open(args.file, encoding="utf-8", errors="strict").read()
    t0 = time.perf_counter()
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    load_s = time.perf_counter() - t0
    uri = "file://" + args.file
    opened = engine.open(uri, text)
    offset = offset_of(text, args.line - 1, args.col - 1)
    out = engine.complete(uri, offset, CompletionOptions(multiline=args.multiline, max_tokens=args.max_tokens))
    print(out.text)
    print(
        f"-- load {load_s:.1f}s ({'cached' if engine.loaded.from_cache else 'first start'}), "
        f"encode {opened.encoded} tokens {opened.ms:.0f}ms, complete {out.ms:.0f}ms "
        f"({len(out.tokens)} tokens, first {out.first_token_ms:.0f}ms, stop: {out.stop_reason})",
        file=sys.stderr,
    )
    return 0


def _info(args) -> int:
    from ghostline.engine.loader import load

    loaded = load(args.model)
    a = loaded.model.args
    print(
        f"{loaded.source}\n  family {a.family}, {a.n_layers} layers, width {a.dim}, vocab {a.vocab_size}\n"
        f"  loaded in {loaded.seconds:.1f}s ({'cached safetensors' if loaded.from_cache else 'first start: de-quantised'})"
    )
    return 0


def _calibrate(args) -> int:
    from pathlib import Path

    from ghostline.engine.calibration import STEPS, calibrate_adadec, calibrate_exits, calibrate_vocab
    from ghostline.engine.loader import load
    from ghostline.engine.vocab import default_roots

    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        raise ValueError(f"unknown calibration steps {sorted(unknown)} (of {', '.join(STEPS)})")
    roots = [Path(c) for c in args.corpus] or default_roots()
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise FileNotFoundError(f"corpus folder not found: {', '.join(missing)}")
    loaded = load(args.model)
    out = Path(args.out) if args.out else None
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if "vocab" in steps:
        calibrate_vocab(loaded.tokenizer, loaded.source.stem, roots, exclude=args.exclude, out=out, progress=say)
    if "adadec" in steps:
        calibrate_adadec(loaded.model, loaded.tokenizer, loaded.source.stem, roots, exclude=args.exclude, out=out,
                         budget=args.tokens, progress=say)
    if "exits" in steps:
        calibrate_exits(loaded.model, loaded.tokenizer, loaded.source.stem, roots, exclude=args.exclude, out=out,
                        budget=min(args.tokens, 24_000), progress=say)
    if "gate" in steps:  # the product's decoding, so the engine the server runs (int8, code head)
        from ghostline.engine.calibration import calibrate_gate
        from ghostline.engine.engine import Engine, EngineOptions

        rows = [Path(f) for f in args.gate_rows]
        reuse = bool(rows) and all(f.is_file() for f in rows)
        engine = None if reuse else Engine.load(args.model, options=EngineOptions(precision="int8", head="code"))
        context = None
        if args.gate_context:
            from ghostline.lsp.context import Projects

            context = Projects(roots)
        calibrate_gate(engine, loaded.source.stem, roots, exclude=args.exclude, out=out, tasks=args.gate_tasks,
                       seed=args.gate_seed, rows_files=rows, context=context, history=args.gate_history,
                       model=args.gate_model, mid_line=args.gate_mid_line, progress=say)
    return 0


def _stats(args) -> int:
    from ghostline.engine.calibration import find
    from ghostline.engine.gate import GATE_FILE, Gate
    from ghostline.engine.loader import model_stem
    from ghostline.lsp.stats import Stats, report, stats_path

    data = Stats().load()
    if not data:
        print(f"no suggestions counted yet ({stats_path()})")
        return 0
    path = find(model_stem(args.model), GATE_FILE)
    print(report(data, Gate.load(path) if path else None))
    return 0


def _engine(args) -> int:
    from ghostline.engine.serving.daemon import run

    return run(args)


def _listen(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def _cluster(args) -> int:
    try:
        from ghostline.engine.serving.cluster import run
    except ImportError as exc:
        print(f"ghostline cluster needs Ray Serve: pip install 'ghostline[cluster]' ({exc})", file=sys.stderr)
        return 2
    return run(args)


def _model_flags(p) -> None:
    p.add_argument("--model", default=None, help="gemma3-270m (default), smollm2-135m, a .gguf or a HF folder")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="all clients' KV caches together, least recently used evicted (default 2048)")
    p.add_argument("--window-above", type=int, default=None,
                   help="a document of more tokens is cached as a window around where its user works (default 16384)")
    p.add_argument("--window-tokens", type=int, default=None, help="that window's size in tokens (default 4096)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="int8", help="layer weights (default int8)")
    p.add_argument("--head", choices=("code", "full"), default="code",
                   help="LM head over the code vocabulary (default) or the full vocabulary")


def _client_flags(p) -> None:
    p.add_argument("--token-file", default=None)
    p.add_argument("--max-docs", type=int, default=None,
                   help="cached documents per client, least recently used evicted past it (default 256)")
    p.add_argument("--max-open", type=int, default=None, help="open documents per client (default 4096)")
    p.add_argument("--max-queued", type=int, default=None, help="waiting requests per client (default 32)")
    p.add_argument("--max-frame-mb", type=float, default=None, help="largest frame (default 16)")
    p.add_argument("--max-hello-bytes", type=int, default=None,
                   help="largest frame a TCP client may send before its token is accepted (default 4096)")
    p.add_argument("--hello-timeout", type=float, default=None, metavar="SECONDS",
                   help="close a TCP client that has not sent a valid hello by then (default 5)")
    p.add_argument("--max-unauthenticated", type=int, default=None,
                   help="TCP connections held at once before their hello (default 64)")
    p.add_argument("--max-clients", type=int, default=None, help="connections held at once (default 256)")
    p.add_argument("--rate", type=float, default=None, metavar="CALLS_PER_S",
                   help="calls a second per client on average; past it calls get `rate_limited` (default 200)")
    p.add_argument("--rate-burst", type=int, default=None, help="calls per client in a burst (default 1000)")
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without clients (servers start daemons with 300)")


def _engine_parser(sub) -> None:
    """`ghostline engine` (engine.serving.daemon) and `ghostline cluster` (engine.serving.cluster), declared here so that
    `ghostline serve` never imports the model or Ray."""
    e = sub.add_parser("engine", help="run the engine daemon that language servers share (Unix socket, or TCP + token)")
    _model_flags(e)
    e.add_argument("--socket", default=None, help="Unix socket path (default: per model, in the runtime folder)")
    e.add_argument("--listen", default=None, metavar="HOST:PORT", type=_listen,
                   help="serve TCP instead (a team server): clients need the token ($GHOSTLINE_TOKEN, --token-file, or generated)")
    _client_flags(e)
    e.add_argument("--stop", action="store_true", help="stop the running daemons of this user and exit")
    e.set_defaults(func=_engine)

    c = sub.add_parser("cluster", help="serve editors from engine replicas on Ray Serve (TCP + token, as `engine --listen`)")
    _model_flags(c)
    c.add_argument("--listen", required=True, metavar="HOST:PORT", type=_listen,
                   help="where editors connect (port 0: any free one); prints `engine: tcp://HOST:PORT` when ready")
    c.add_argument("--replicas", type=int, default=1, help="engine replicas, one model each (default 1)")
    c.add_argument("--autoscale", default=None, metavar="MIN..MAX",
                   help="scale between MIN and MAX replicas on requests in flight (instead of --replicas)")
    c.add_argument("--target-queue", type=float, default=2.0,
                   help="requests in flight per replica the autoscaler aims for (default 2)")
    c.add_argument("--target-p95-ms", type=float, default=1500.0,
                   help="with --autoscale, add a replica while completions' p95 is above this (0: off; default 1500)")
    c.add_argument("--cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    c.add_argument("--gpus", type=float, default=0.0, help="GPUs reserved per replica (default 0)")
    c.add_argument("--address", default=None,
                   help="join this Ray cluster (`ray start --head` printed it) instead of starting one here")
    c.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a Ray cluster started here (default: all)")
    _client_flags(c)
    c.set_defaults(func=_cluster)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ghostline", description="Code completion with a per-document KV cache kept current by PIE.")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("complete", help="complete FILE at LINE:COL (1-based) and print timings")
    c.add_argument("file")
    c.add_argument("--line", type=int, required=True)
    c.add_argument("--col", type=int, required=True)
    c.add_argument("--model", default=None, help="gemma3-270m (default), smollm2-135m, a .gguf or a HF folder")
    c.add_argument("--multiline", action="store_true")
    c.add_argument("--max-tokens", type=int, default=48)
    c.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    c.add_argument("--head", choices=("code", "full"), default="code")
    c.set_defaults(func=_complete)

    i = sub.add_parser("info", help="load a model and report its shape and load time")
    i.add_argument("--model", default=None)
    i.set_defaults(func=_info)

    from ghostline.lsp.server import add_serve_parser

    add_serve_parser(sub)
    _engine_parser(sub)

    cal = sub.add_parser("calibrate", help="fit the per-model artifacts (code vocabulary, AdaDec threshold, exit heads, show gate) on real code")
    cal.add_argument("--model", default=None)
    cal.add_argument("--corpus", nargs="*", default=[], help="folders of code (default: the stdlib and installed packages)")
    cal.add_argument("--exclude", nargs="*", default=[], help="skip paths containing any of these words")
    cal.add_argument("--steps", default="vocab,adadec,exits,gate", help="comma-separated: vocab, adadec, exits, gate")
    cal.add_argument("--gate-tasks", type=int, default=400, help="cursor tasks cut from the corpus for the show gate")
    cal.add_argument("--gate-mid-line", action="store_true", help="cut the gate's cursor tasks after each line's "
                     "first word (a request mid-line) instead of at its indentation")
    cal.add_argument("--gate-model", choices=("logistic", "forest"), default="logistic", help="what gives the "
                     "gate's P(kept): a logistic regression, or a random forest over the same features")
    cal.add_argument("--gate-seed", type=int, default=0, help="which lines of the corpus the gate's cursor tasks take")
    cal.add_argument("--gate-rows", nargs="*", default=[], help="JSON lines of the show gate's decode records: one "
                     "new file is written while collecting; when all exist, the gate is refitted from them together "
                     "without decoding")
    cal.add_argument("--gate-history", nargs="*", default=[], help="edit task files (EVAL.md's format, e.g. made by "
                     "bench.history from other repositories' histories): the gate's cursor tasks, instead of cuts "
                     "from the corpus")
    cal.add_argument("--gate-context", action="store_true", help="fit the gate for completions that read context "
                     "(gate-context.json): each task's project, the corpus folder holding it, as its workspace")
    cal.add_argument("--tokens", type=int, default=60_000, help="teacher-forced tokens for the AdaDec fit (the exits fit takes at most 24,000)")
    cal.add_argument("--out", help="folder for the artifacts (default: the model's folder in the cache)")
    cal.set_defaults(func=_calibrate)

    st = sub.add_parser("stats", help="print what became of the suggestions shown here, and the show gate's strength learned from it")
    st.add_argument("--model", default=None, help="whose show gate the learned strengths are for (default: the embedded model)")
    st.set_defaults(func=_stats)

    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ghostline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
