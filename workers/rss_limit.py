"""The resident-memory limit of a trial on the CPU: its budget plus a stated margin.

``workers.memory.RssGuard`` stops a CPU trial whose process memory grows past it above
the worker's idle baseline; the scheduler (``orchestrator.tune_driver``) reserves it on
the trial's node as Ray's ``memory`` resource, so trials run at once on one node only
while their limits together fit its memory. No torch here: the control plane reads it.

Example:
    >>> rss_limit_mb(2048.0)
    3584.0
"""

from __future__ import annotations

# Slack of the limit over the budget: what the runtime holds besides the accounted
# tensors (allocator caches, kernel workspaces, autograd's temporaries).
RSS_MARGIN_MB = 512.0
RSS_MARGIN_SHARE = 0.5  # and this share of the budget on top


def rss_limit_mb(budget_mb: float) -> float:
    """Growth of a CPU trial's resident memory, MiB, past which it is stopped."""
    return budget_mb + RSS_MARGIN_MB + RSS_MARGIN_SHARE * budget_mb
