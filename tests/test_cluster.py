"""`ghostline cluster` on a real Ray cluster on loopback: SmolLM2 replicas on Ray Serve behind the
ingress, driven by `RemoteEngine` exactly as a language server drives a team server."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time

import pytest

# Ray reads its authentication settings once, when imported (the router imports it): the cluster's own token
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_urlsafe(32))
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

from ghostline.engine.completion import CompletionOptions  # noqa: E402
from ghostline.engine.serving import cluster  # noqa: E402
from ghostline.engine.serving.autoscaler import P95, LatencyPolicy  # noqa: E402
from ghostline.engine.serving.front import DaemonOptions  # noqa: E402
from ghostline.lsp.remote import RemoteEngine, Unavailable  # noqa: E402
from ghostline.engine.serving.router import owner  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "cluster-token-for-tests-only-0123"
SRC = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\ndef main():\n    "


@pytest.fixture(scope="module")
def ingress():
    """Ray on loopback (its files in a short folder of its own), 1..2 autoscaled replicas, the ingress in a thread."""
    temp = tempfile.mkdtemp(prefix="gl-ray-")
    cluster.start_ray(None, temp, cpus=2)
    try:
        handle = cluster.deploy(cluster.ClusterOptions(model="smollm2-135m", autoscale=(1, 2), target_queue=1.0,
                                                       upscale_delay_s=0.5, downscale_delay_s=900, look_back_s=2.0,
                                                       cpus=0.5))
        front = cluster.Ingress(handle, DaemonOptions(token=TOKEN), replicas=cluster.live_replicas)
        ready = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(front.serve(host="127.0.0.1", port=0,
                                                                          ready=lambda _: ready.set())), daemon=True)
        thread.start()
        assert ready.wait(30)
        yield front
        front.stop()
        thread.join(10)
    finally:
        cluster.shutdown(True)
        shutil.rmtree(temp, ignore_errors=True)


def client(front) -> RemoteEngine:
    return RemoteEngine.connect(tuple(front.address), model=None, token=TOKEN)


def assert_texts_match(engine: RemoteEngine) -> dict[str, str]:
    """Every document's text on its replica equals the client's; the replica of each."""
    where = {}
    for uri, text in engine.docs.items():
        seen = engine.describe(uri)
        assert seen["text"] == text, uri
        where[uri] = seen["replica"]
    return where


def two_replicas(front) -> None:
    """Long completions in flight, above the autoscaler's target of one a replica, until a second runs."""
    stop = threading.Event()

    def load(k: int) -> None:
        busy = client(front)
        busy.open(f"file:///load{k}.py", SRC)
        while not stop.is_set():
            busy.complete(f"file:///load{k}.py", len(SRC), CompletionOptions(max_tokens=64, multiline=True))
        busy.disconnect()

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while cluster.live_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert cluster.live_replicas() == 2


def test_the_ring_moves_only_what_a_new_replica_takes():
    routes = [f"c1|file:///m{i}.py" for i in range(400)]
    two = {r: owner(r, ["a", "b"]) for r in routes}
    three = {r: owner(r, ["a", "b", "c"]) for r in routes}
    moved = [r for r in routes if two[r] != three[r]]
    assert all(three[r] == "c" for r in moved)
    assert 0.2 < len(moved) / len(routes) < 0.5
    assert 0.35 < sum(v == "a" for v in two.values()) / len(routes) < 0.65


def test_the_cluster_refuses_a_client_without_the_token(ingress):
    with pytest.raises(Unavailable):
        RemoteEngine.connect(tuple(ingress.address), model=None, token="not-the-token")
    with pytest.raises(Unavailable):
        RemoteEngine.connect(tuple(ingress.address), model=None, token=None)


def test_scaling_from_one_replica_to_two_keeps_every_text(ingress):
    engine = client(ingress)
    for i in range(12):
        uri = f"file:///s{i}.py"
        engine.open(uri, SRC + f"# {i}\n")
        engine.edit(uri, [{"range": {"start": {"line": 0, "character": 4}, "end": {"line": 0, "character": 7}},
                           "text": f"fib{i}"}])
    assert cluster.live_replicas() == 1
    assert len(set(assert_texts_match(engine).values())) == 1
    moved = ingress.counts["moved"]

    two_replicas(ingress)
    assert cluster.live_replicas() == 2
    where = assert_texts_match(engine)  # nothing placed moves: its replica lives
    assert len(set(where.values())) == 1 and ingress.counts["moved"] == moved
    for i in range(12, 24):  # new documents spread over both
        engine.open(f"file:///s{i}.py", SRC)
    assert len(set(assert_texts_match(engine).values())) == 2 and ingress.counts["moved"] == moved
    assert engine.complete("file:///s3.py", len(engine.docs["file:///s3.py"])).stop_reason != "error"
    engine.disconnect()


def spread(front, name: str, n: int):
    """A client with `n` documents open on two replicas: (engine, uris, where each is)."""
    two_replicas(front)
    engine = client(front)
    uris = [f"file:///{name}{i}.py" for i in range(n)]
    for uri in uris:
        engine.open(uri, SRC)
    return engine, uris, assert_texts_match(engine)


def test_every_call_about_a_document_reaches_one_replica(ingress):
    engine, uris, first = spread(ingress, "a", 10)
    assert len(set(first.values())) == 2
    moved = ingress.counts["moved"]
    for round_ in range(3):
        for uri in uris:
            engine.edit(uri, [{"range": {"start": {"line": 7, "character": 4}, "end": {"line": 7, "character": 4}},
                               "text": f"x{round_} = 1\n    "}])
            engine.complete(uri, len(engine.docs[uri]), CompletionOptions(max_tokens=4))
        assert assert_texts_match(engine) == first
    assert ingress.counts["moved"] == moved  # nothing was re-opened: every call found its document
    engine.disconnect()


def test_a_replica_killed_mid_completion_costs_a_reopen_and_no_request(ingress):
    engine, uris, where = spread(ingress, "k", 8)
    victim_uri = uris[0]
    victim = where[victim_uri]
    on_victim = [u for u in uris if where[u] == victim]
    moved = ingress.counts["moved"]
    answers, errors = {}, []

    def complete(uri):  # every document at once: the dead replica's are re-opened side by side
        try:
            answers[uri] = engine.complete(uri, len(SRC), CompletionOptions(max_tokens=64, multiline=True))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=complete, args=(uri,)) for uri in uris]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(int(victim.rsplit("/", 1)[1]), signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert not errors
    assert all(answers[u].stop_reason not in ("error", "cancelled") for u in uris)
    after = assert_texts_match(engine)
    assert victim not in after.values()
    assert engine.complete(victim_uri, len(SRC), CompletionOptions(max_tokens=8)).stop_reason != "error"
    deadline = time.monotonic() + 120  # Serve starts a replacement; nothing placed moves to it
    while cluster.live_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.live_replicas() == 2
    assert assert_texts_match(engine) == after
    assert ingress.counts["moved"] - moved == len(on_victim)  # each document of the dead replica re-opened once
    engine.disconnect()


class Ctx:
    """What the autoscaling policy reads of Ray Serve's AutoscalingContext."""

    def __init__(self, running: int, requests: float, p95s: list[float], target: float = 2.0):
        self.current_num_replicas, self.target_num_replicas, self.total_num_requests = running, running, requests
        self.aggregated_metrics = {P95: {f"r{i}": v for i, v in enumerate(p95s)}}
        self.config = type("Config", (), {"get_target_ongoing_requests": lambda _self: target})()


def test_the_autoscaler_adds_a_replica_for_a_queue_or_for_slow_completions():
    policy = LatencyPolicy(target_p95_ms=1000)
    assert policy(Ctx(2, 4, [300, 400]))[0] == 2  # at the target queue, fast: as many as run
    assert policy(Ctx(2, 8, [300, 400]))[0] == 4  # twice the queue: twice the replicas
    assert policy(Ctx(2, 1, [1800, 1400]))[0] == 3  # a short queue but slow: one more
    assert policy(Ctx(2, 1, [0.0]))[0] == 0.5  # idle: Ray Serve's bounds and delays decide how far down
    assert LatencyPolicy(None)(Ctx(2, 1, [5000]))[0] == 0.5  # the latency rule off
