"""Document affinity for the cluster: a consistent-hash ring, plugged into Ray Serve's request router.

Every call about one (client, document) carries `route=`; `AffinityRouter` sends it to the replica
that owns the route on a ring of the live replicas (`VNODES` points each). Adding or removing a
replica moves only the routes it gains or loses; the ingress re-opens those documents there.
"""

from __future__ import annotations

import bisect
import hashlib

from ray.serve.request_router import RequestRouter

VNODES = 64  # points on the ring per replica


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def owner(route: str, replicas: list[str]) -> str:
    """The replica (by id) that holds `route` on a consistent-hash ring of `replicas`."""
    ring = sorted((_point(f"{r}#{i}"), r) for r in replicas for i in range(VNODES))
    at = bisect.bisect(ring, (_point(route), "")) % len(ring)
    return ring[at][1]


class AffinityRouter(RequestRouter):
    """A request with `route=` goes to the route's owner among the live replicas; any other anywhere."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        if route is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[owner(route, sorted(by_id))]]]
