"""How many engine replicas the cluster wants: requests in flight and completion latency, as a Ray
Serve autoscaling policy.

Ray Serve calls the policy every control-loop period with the deployment's metrics; each replica
reports its recent completion p95 (`Replica.record_autoscaling_stats`). The policy asks for enough
replicas to hold `target_ongoing_requests` each (Ray Serve's own rule) and, while the replicas' p95
is above `target_p95_ms`, for one more than run now. Ray Serve applies the up- and down-scale delays
and the MIN..MAX bounds.
"""

from __future__ import annotations

import math

P95 = "completion_p95_ms"  # the metric each replica reports


class LatencyPolicy:
    def __init__(self, target_p95_ms: float | None = None):
        self.target_p95_ms = target_p95_ms

    def __call__(self, ctx) -> tuple[float, dict]:
        running = ctx.current_num_replicas
        if running == 0:
            return ctx.target_num_replicas, {}
        wanted = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        p95s = [v for v in ((ctx.aggregated_metrics or {}).get(P95) or {}).values() if math.isfinite(v) and v > 0]
        slow = self.target_p95_ms is not None and bool(p95s) and sum(p95s) / len(p95s) > self.target_p95_ms
        if slow:
            wanted = max(wanted, running + 1)
        return wanted, {"p95_ms": round(max(p95s), 1) if p95s else None, "slow": slow}
