"""The resident-memory limit of a trial on the CPU: its budget plus a stated margin.

``workers.memory.RssGuard`` stops a CPU trial whose process memory grows past it above
the worker's idle baseline; the scheduler (``orchestrator.tune_driver``) reserves it on
the trial's node as Ray's ``memory`` resource, so trials run at once on one node only
while their limits together fit its memory. No torch here: the control plane reads it.

Example:
    >>> rss_limit_mb(2048.0)
    3174.4
"""

from __future__ import annotations

# Slack of the limit over the budget: what the runtime holds besides the accounted
# tensors (allocator caches, oneDNN scratch, autograd's temporaries, memory an earlier
# phase freed but the process kept). Measured on CPU (benchmarks/memory_phases.py,
# docs/measurements.md) it is about constant, not a share of the budget: training
# 350-910 MiB above its accounted peak (MobileNetV2 and ViT-S at 2.5, 4 and 8 GiB; full,
# mobiletl, lbp_wht); MobileNetV2's fitted evaluation ~1.65 GiB above its prediction at
# batch 128 and 256 alike, 670-790 MiB above the budget at 2.5 and 4 GiB; at 8 GiB no
# phase passed 4.8 GiB. An evaluation or inference-cost measurement whose fit lands nearer
# the budget and passes the limit is stopped and run again at half its batch
# (workers.batch_fit); the deployment evaluates at the batch the evaluation settled on.
RSS_MARGIN_MB = 1024.0
RSS_MARGIN_SHARE = 0.05  # and this share of the budget, for what grows with the tensors


def rss_limit_mb(budget_mb: float) -> float:
    """Growth of a CPU trial's resident memory, MiB, past which it is stopped."""
    return budget_mb + RSS_MARGIN_MB + RSS_MARGIN_SHARE * budget_mb
