"""`ghostline cluster`: engine replicas on Ray Serve behind one ingress that editors reach as a team server.

Editors connect to the ingress (`tcp://HOST:PORT` and the token: the daemon's protocol, `engine.serving.front`).
The ingress keeps each open document's text and a version, and forwards every call through a Ray
Serve deployment handle; `engine.serving.router` (Ray Serve's request-router extension point) sends every call
about one (client, document) to one replica by consistent hashing over the live replicas. Each
`Replica` is a `Daemon` without a socket: its own engine, scheduler, limits and answers.

A replica that does not hold the document at the version the ingress expects (it died and was
replaced, the ring changed, it evicted a client) answers `moved`; a replica that dies mid-call
fails it with the actor gone. Either way the ingress re-opens the document from its text on the
replica the ring names now, once, and asks again: the editor sees no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ghostline.engine.text import EditError, apply_changes
from ghostline.engine.serving.autoscaler import P95
from ghostline.engine.serving import wire
from ghostline.engine.serving.front import (DaemonOptions, Front, RequestError, Session, TokenBucket, arg, daemon_options,
                                  edit_changes, engine_options, load_token, uri_of)

log = logging.getLogger("ghostline.cluster")
APP = "ghostline"
DEPLOYMENT = "engine"
LATENCY_WINDOW_S = 30.0  # completions a replica's latency metric covers
ATTEMPTS = 6  # tries of one call across moves and replica deaths before the editor gets an error


# a replica ---------------------------------------------------------------------------------------


class ReplicaSession(Session):
    """One ingress client on a replica: answers go to the waiting call, not to a socket."""

    def __init__(self, sid: int):
        super().__init__(sid, None, tcp=False, limit=wire.MAX_FRAME, bucket=TokenBucket(1e9, 10**9))
        self.greeted = True  # the ingress checked the token
        self.versions: dict[str, int] = {}
        self.waiting: dict[int, asyncio.Queue] = {}

    def send(self, msg: dict) -> None:
        q = self.waiting.get(msg.get("id"))
        if q is not None:
            q.put_nowait(msg)


class Replica:
    """An engine replica: a `Daemon` (engine, scheduler, limits) fed by `call` instead of a socket."""

    def __init__(self, model: str | None, engine_options: dict, daemon_options: dict):
        from ghostline.engine import allocator
        from ghostline.engine.engine import Engine, EngineOptions
        from ghostline.engine.serving.daemon import Daemon

        engine = Engine.load(model, options=EngineOptions(**engine_options), progress=lambda m: log.info("load: %s", m))
        allocator.freeze()
        self.daemon = Daemon(engine, DaemonOptions(**daemon_options))
        self.sessions: dict[str, ReplicaSession] = {}
        self._ids = itertools.count(1)
        self.name = _replica_name()
        self.latencies: deque[tuple[float, float]] = deque(maxlen=512)  # (when, ms) of recent completions

    async def call(self, msg: dict, *, route: str, holder: str | None, client: str, version: int):
        """Run one request of `client` about the document `route` names (`route` and `holder` are the
        router's); yield its answers (partials, then the last). A document not held at `version`
        (`version - 1` for an edit) is `moved`."""
        d = self.daemon
        if d.loop is None:
            d.adopt(asyncio.get_running_loop())
        s = self.sessions.get(client)
        if s is None:
            s = self.sessions[client] = ReplicaSession(next(self._ids))
        rid, kind, uri = msg["id"], msg["call"], msg["args"]["uri"]
        held = s.versions.get(uri)
        if kind != "open" and held != (version - 1 if kind == "edit" else version):
            yield self.name, wire.error(rid, "moved", f"{uri} is not held at version {version} here")
            return
        if kind == "close":
            s.versions.pop(uri, None)
        else:
            s.versions[uri] = version
        q = s.waiting[rid] = asyncio.Queue()
        done = False
        try:
            d.dispatch(s, msg)
            while not done:
                reply = await q.get()
                done = "partial" not in reply
                if done and kind == "complete" and isinstance(reply.get("ok"), dict):
                    self.latencies.append((time.monotonic(), float(reply["ok"].get("ms") or 0.0)))
                yield self.name, reply
        finally:
            s.waiting.pop(rid, None)
            job = s.inflight.get(rid)
            if not done and job is not None:  # the ingress went away or cancelled
                job.cancel()
            if not s.docs and not s.inflight:
                self.sessions.pop(client, None)

    def record_autoscaling_stats(self) -> dict:
        """This replica's completion p95 over the last `LATENCY_WINDOW_S` (Ray Serve autoscaling metric)."""
        since = time.monotonic() - LATENCY_WINDOW_S
        recent = sorted(ms for at, ms in self.latencies if at >= since)
        return {P95: recent[int(0.95 * (len(recent) - 1))] if recent else 0.0}

    async def check_health(self) -> None:
        if self.daemon.loop is not None and not self.daemon.scheduler.alive:
            raise RuntimeError("the engine thread died")


def _replica_name() -> str:
    try:
        from ray import serve

        return f"{serve.get_replica_context().replica_id.unique_id}/{os.getpid()}"
    except Exception:  # outside a replica (a test building one directly)
        return f"local/{os.getpid()}"


# the ingress -------------------------------------------------------------------------------------


class Moved(Exception):
    """The replica asked does not hold the document (or died): re-open it where the ring says."""


@dataclass
class Held:
    """What the ingress keeps of an open document, to re-open it on another replica."""

    text: str
    version: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    replica: str = ""


class Ingress(Front):
    """Editors' side of the cluster: the team server's protocol, calls forwarded to the replicas."""

    what = "cluster ingress"

    def __init__(self, handle, options: DaemonOptions | None = None, *, replicas=None, model: str = ""):
        super().__init__(options)
        self.model = model
        self.deployment, self.handle = handle, None
        self.replicas = replicas  # () -> live replica count, for `status`
        self.prefix = secrets.token_hex(4)  # this ingress's clients, apart from another ingress's
        self.held: dict[int, dict[str, Held]] = {}
        self.versions = itertools.count(1)
        self._own = itertools.count(2**62)  # ids of the ingress's own requests (re-opens), apart from clients' ids
        self.counts: Counter = Counter()
        self.calls = {"open": self._open, "edit": self._edit, "context": self._context, "close": self._close,
                      "complete": self._complete, "inspect": self._inspect, "cancel": self._cancel,
                      "status": self._status}

    def _starting(self) -> None:
        # on the serving loop: Ray Serve's router runs on the loop that first uses the handle. Every
        # call streams its answers (partials, then the last), straight to the replica over gRPC
        # (`_by_reference=False`), which halves the hop against passing through Ray's object store.
        self.handle = self.deployment.options(stream=True, _by_reference=False)

    def _about(self) -> dict:
        return {"model": self.model, "cluster": True}

    def _forget(self, s: Session) -> None:
        for task in list(s.inflight.values()):
            task.cancel()
        for uri, held in self.held.pop(s.id, {}).items():
            self._spawn(s, None, self._forward(s, None, uri, held, {"call": "close", "args": {"uri": uri}}))

    # calls: checked here, forwarded in a task ---------------------------------------------------

    def _open(self, s: Session, rid: int, args: dict) -> None:
        uri, text = uri_of(args), arg(args, "text", str)
        docs = self.held.setdefault(s.id, {})
        if uri not in docs and len(docs) >= self.options.max_open:
            raise RequestError("limit", f"more than {self.options.max_open} open documents")
        held = docs.get(uri)
        if held is None:
            held = docs[uri] = Held(text, 0)
        s.docs.add(uri)
        self._spawn(s, rid, self._forward(s, rid, uri, held, {"call": "open", "args": args}, text=text))

    def _edit(self, s: Session, rid: int, args: dict) -> None:
        uri = self._known(s, args)
        changes, held = edit_changes(args), self.held[s.id][uri]
        self._spawn(s, rid, self._forward(s, rid, uri, held, {"call": "edit", "args": args}, changes=changes))

    def _close(self, s: Session, rid: int, args: dict) -> None:
        uri = uri_of(args)
        held = self.held.get(s.id, {}).pop(uri, None)
        s.docs.discard(uri)
        if held is None:
            s.send({"id": rid, "ok": None})
            return
        self._spawn(s, rid, self._forward(s, rid, uri, held, {"call": "close", "args": args}))

    def _complete(self, s: Session, rid: int, args: dict) -> None:
        uri = self._known(s, args)
        self._spawn(s, rid, self._forward(s, rid, uri, self.held[s.id][uri], {"call": "complete", "args": args}))

    def _context(self, s: Session, rid: int, args: dict) -> None:
        """Forwarded to the replica holding the document (a replica that takes it over later gets its
        text only: the client sees its completions read no context and sends it again)."""
        uri, _ = self._known(s, args), arg(args, "text", str)
        self._spawn(s, rid, self._forward(s, rid, uri, self.held[s.id][uri], {"call": "context", "args": args}))

    def _inspect(self, s: Session, rid: int, args: dict) -> None:
        uri = self._known(s, args)
        self._spawn(s, rid, self._forward(s, rid, uri, self.held[s.id][uri], {"call": "inspect", "args": args}))

    def _cancel(self, s: Session, rid: int, args: dict) -> None:
        task = s.inflight.get(arg(args, "id", int))
        if task is not None:
            task.cancel()
            self.counts["cancelled"] += 1
        s.send({"id": rid, "ok": {"cancelled": task is not None}})

    def _status(self, s: Session, rid: int, args: dict) -> None:
        s.send({"id": rid, "ok": {
            "pid": os.getpid(), "cluster": True, "uptime_s": round(time.time() - self.started, 1),
            "clients": len(self.clients), "docs": sum(len(d) for d in self.held.values()),
            "replicas": self.replicas() if self.replicas is not None else None,
            "forwarded": self.counts["forwarded"], "moved": self.counts["moved"], "cancelled": self.counts["cancelled"],
            "you": {"client": s.id, "docs": len(s.docs), "queued": len(s.inflight)}}})

    def _known(self, s: Session, args: dict) -> str:
        uri = uri_of(args)
        if uri not in self.held.get(s.id, {}):
            raise RequestError("not_open", f"document {uri!r} is not open")
        return uri

    def _spawn(self, s: Session, rid: int | None, work) -> None:
        if rid is not None and rid in s.inflight:
            work.close()
            raise RequestError("bad_request", f"request {rid} is already in flight")
        if rid is not None and len(s.inflight) >= self.options.max_queued:
            work.close()
            raise RequestError("limit", f"more than {self.options.max_queued} requests waiting")
        task = asyncio.get_running_loop().create_task(work)
        if rid is not None:
            s.inflight[rid] = task
            task.add_done_callback(lambda t: s.inflight.pop(rid, None) if s.inflight.get(rid) is t else None)

    # forwarding ----------------------------------------------------------------------------------

    async def _forward(self, s: Session, rid: int | None, uri: str, held: Held, msg: dict, *,
                       text: str | None = None, changes=None) -> None:
        """Send one call to the document's replica, in the document's order; re-open it where the router
        says and ask again when that replica does not hold it."""
        kind = msg["call"]
        try:
            async with held.lock:
                if text is not None:
                    held.text, held.version = text, next(self.versions)
                if changes is not None:
                    try:
                        held.text = apply_changes(held.text, changes)
                    except EditError as exc:
                        s.send(wire.error(rid, "edit", str(exc)))
                        return
                    held.version += 1
                await self._deliver(s, rid, uri, held, dict(msg, id=next(self._own) if rid is None else rid))
        except asyncio.CancelledError:
            if rid is not None:
                s.send({"id": rid, "ok": {"text": "", "stop_reason": "cancelled"} if kind == "complete" else None})
            raise
        except Exception as exc:  # never silent: the editor gets the reason
            log.exception("client %d: %s of %s failed", s.id, kind, uri)
            if rid is not None:
                s.send(wire.error(rid, "engine", f"{type(exc).__name__}: {exc}"))

    async def _deliver(self, s: Session, rid: int | None, uri: str, held: Held, msg: dict) -> None:
        import ray.exceptions

        route, client = f"{self.prefix}:{s.id}|{uri}", f"{self.prefix}:{s.id}"
        last = None
        for attempt in range(ATTEMPTS):
            try:
                if attempt and msg["call"] != "open":  # the replica named now gets the text first
                    reopen = {"id": next(self._own), "call": "open", "args": {"uri": uri, "text": held.text}}
                    opened = await self._one(reopen, route, client, held, replay=None)
                    self.counts["moved"] += 1
                    log.info("client %d: %s re-opened on %s", s.id, uri, held.replica)
                    if msg["call"] == "edit":  # the text sent holds the edit
                        if rid is not None:
                            s.send({"id": rid, "ok": opened})
                        return
                await self._one(msg, route, client, held, replay=s if rid is not None else None)
                self.counts["forwarded"] += 1
                return
            except (Moved, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                last = exc
                if msg["call"] == "close":  # nothing left to close
                    if rid is not None:
                        s.send({"id": rid, "ok": None})
                    return
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        raise RuntimeError(f"no replica took {uri} after {ATTEMPTS} tries: {last}")

    async def _one(self, msg: dict, route: str, client: str, held: Held, *, replay: Session | None):
        """One call on one replica; its answers go to `replay` (partials as they come); the last one's result."""
        stream = self.handle.call.remote(msg, route=route, holder=held.replica.split("/")[0] or None, client=client,
                                         version=held.version)
        reply = {}
        try:
            async for name, reply in stream:
                held.replica = name
                err = reply.get("error") if isinstance(reply.get("error"), dict) else None
                if err is not None and err.get("code") == "moved":
                    raise Moved(err.get("message", ""))
                if err is not None and replay is None:
                    raise RuntimeError(f"{msg['call']} failed: {err.get('message')}")
                if replay is not None:
                    if msg["call"] == "inspect" and isinstance(reply.get("ok"), dict):
                        reply["ok"]["replica"] = name
                    replay.send(reply)
        finally:
            stream.cancel()
        return reply.get("ok")


# the command -------------------------------------------------------------------------------------


@dataclass
class ClusterOptions:
    """How the replicas are deployed; checked once, here."""

    model: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on queue length
    target_queue: float = 2.0  # requests in flight per replica the autoscaler aims for
    target_p95_ms: float | None = 1500.0  # and a replica more while completions' p95 is above this (None: off)
    upscale_delay_s: float = 5.0  # load above the target this long adds a replica
    downscale_delay_s: float = 60.0  # load below it this long removes one (its documents move)
    look_back_s: float = 30.0  # the load the autoscaler sees is averaged over this long
    cpus: float = 1.0  # per replica
    gpus: float = 0.0  # per replica
    max_ongoing: int = 64  # requests one replica holds at once
    engine: dict = field(default_factory=dict)  # EngineOptions fields for each replica
    daemon: dict = field(default_factory=dict)  # DaemonOptions fields for each replica

    def __post_init__(self):
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be a positive integer, not {self.replicas!r}")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
                raise ValueError(f"autoscale must be MIN..MAX with 0 <= MIN <= MAX, MAX >= 1, not {lo}..{hi}")
        if self.target_p95_ms is not None and (isinstance(self.target_p95_ms, bool) or not isinstance(
                self.target_p95_ms, (int, float)) or self.target_p95_ms <= 0):
            raise ValueError(f"target_p95_ms must be a positive number, not {self.target_p95_ms!r}")
        for name in ("target_queue", "cpus", "gpus", "upscale_delay_s", "downscale_delay_s", "look_back_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        if isinstance(self.max_ongoing, bool) or not isinstance(self.max_ongoing, int) or self.max_ongoing < 1:
            raise ValueError(f"max_ongoing must be a positive integer, not {self.max_ongoing!r}")


def start_ray(address: str | None, temp_dir: str, *, cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start one on this host: on loopback, with a token of its
    own, its files under `temp_dir` and nothing in the home folder. (A cluster of several machines is
    started with `ray start --head` and joined with `address`.)"""
    if address is None:
        if "ray" in sys.modules and "RAY_AUTH_MODE" not in os.environ:  # Ray reads it once, on import
            raise RuntimeError("start Ray here before importing it, or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # Serve's router and replicas on one loop each
    import ray

    if address is None:
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 object_store_memory=128 * 2**20, namespace=APP, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address, log_to_driver=False, namespace=APP)


def deploy(options: ClusterOptions):
    """Deploy (or re-deploy with new options) the engine replicas; returns the deployment handle once
    every replica has loaded its model."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    o = options
    scale = ({"autoscaling_config": {"min_replicas": o.autoscale[0], "max_replicas": o.autoscale[1],
                                     "target_ongoing_requests": o.target_queue, "upscale_delay_s": o.upscale_delay_s,
                                     "downscale_delay_s": o.downscale_delay_s,
                                     "look_back_period_s": max(o.look_back_s, 1e-3),
                                     "metrics_interval_s": min(10.0, max(o.look_back_s / 3, 0.5)),
                                     "policy": {"policy_function": "ghostline.engine.serving.autoscaler:LatencyPolicy",
                                                "policy_kwargs": {"target_p95_ms": o.target_p95_ms}}}}
             if o.autoscale else {"num_replicas": o.replicas})
    app = serve.deployment(Replica).options(
        name=DEPLOYMENT, max_ongoing_requests=o.max_ongoing, health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0, ray_actor_options={"num_cpus": o.cpus, "num_gpus": o.gpus},
        request_router_config=RequestRouterConfig(request_router_class="ghostline.engine.serving.router:AffinityRouter"), **scale,
    ).bind(o.model, o.engine, o.daemon)
    serve.start(http_options={"location": "NoServer"})
    return serve.run(app, name=APP, route_prefix=None)


def live_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get(DEPLOYMENT) if app is not None else None
    return int(dep.replica_states.get("RUNNING", 0)) if dep is not None else 0


def cluster_options(args) -> ClusterOptions:
    """`ghostline cluster`'s flags as options."""
    autoscale = None
    if args.autoscale:
        lo, sep, hi = args.autoscale.partition("..")
        if not sep or not lo.isdigit() or not hi.isdigit():
            raise ValueError(f"--autoscale takes MIN..MAX, not {args.autoscale!r}")
        autoscale = (int(lo), int(hi))
    return ClusterOptions(model=args.model, replicas=args.replicas, autoscale=autoscale, cpus=args.cpus,
                          gpus=args.gpus, target_queue=args.target_queue, target_p95_ms=args.target_p95_ms or None,
                          engine=engine_options(args))


def run(args) -> int:
    logging.getLogger("ghostline").setLevel(logging.getLogger().level)
    host, _, port = args.listen.rpartition(":")
    host = host or "127.0.0.1"
    try:
        options = cluster_options(args)
        front = daemon_options(args, token=load_token(args))
    except (ValueError, OSError) as exc:
        print(f"ghostline cluster: {exc}", file=sys.stderr)
        return 2
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: frames are not encrypted; put TLS or an SSH tunnel in front", host)
    temp = tempfile.mkdtemp(prefix="ghostline-ray-")  # short: Ray's socket paths must fit 107 bytes
    try:
        print(f"starting Ray ({args.address or 'a local cluster'}) ...", file=sys.stderr, flush=True)
        start_ray(args.address, temp, cpus=args.ray_cpus)
        n = f"{options.autoscale[0]}..{options.autoscale[1]}" if options.autoscale else options.replicas
        print(f"deploying {n} engine replica(s) of {options.model or 'the default model'} ...", file=sys.stderr, flush=True)
        handle = deploy(options)
        ingress = Ingress(handle, front, replicas=live_replicas, model=options.model or "gemma3-270m")

        def ready(_front):
            h, p = ingress.address
            print(f"engine: tcp://{h}:{p}", flush=True)

        async def main():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, ingress.stop)
            await ingress.serve(host=host, port=int(port), ready=ready)

        asyncio.run(main())
    finally:
        shutdown(args.address is None)
        shutil.rmtree(temp, ignore_errors=True)
    return 0


def shutdown(ours: bool) -> None:
    """Stop what this command started: the whole local Ray cluster, or only our application on a joined one."""
    with contextlib.suppress(Exception):
        if not ours:
            from ray import serve

            serve.delete(APP, _blocking=False)
    with contextlib.suppress(Exception):
        import ray

        ray.shutdown()
