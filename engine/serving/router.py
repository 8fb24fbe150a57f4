"""Document affinity for the cluster: a consistent-hash ring, plugged into Ray Serve's request router.

Every call about one (client, document) carries `route=` and `holder=` (the replica that holds the
document, if any); `AffinityRouter` sends it to the holder while it lives, else to the replica that
owns the route on a ring of the live replicas (`VNODES` points each). So a document moves only when
its replica dies or is drained, once, to the replica the ring names; a new replica takes new
documents (spread by the ring), not the ones already placed.
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
    """A request with `route=` goes to `holder=` (the replica that holds the document) while that one
    lives, else to the route's owner among the live replicas; a request without a route anywhere."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        kwargs = pending_request.kwargs if pending_request is not None else {}
        route, holder = kwargs.get("route"), kwargs.get("holder")
        if route is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[holder if holder in by_id else owner(route, sorted(by_id))]]]
