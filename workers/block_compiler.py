"""Blocks compiled with ``torch.compile`` under PyTorch's activation memory budget.

AOTAutograd's min-cut partitioner decides what a compiled forward keeps for backward;
``torch._functorch.config.activation_memory_budget`` (a fraction: 1.0 keeps what the
default partition keeps, 0.0 recomputes all it can) makes it recompute the cheapest
ops until the kept bytes fit that fraction. A :class:`BlockCompiler` wraps a block's
forward so that it is compiled with that budget and counts the seconds compilation
takes, which a trial reports apart from its step times.

- The budget is set only while this compiler's backend runs (no global setting that
  another trial in the same process would inherit), and each compiler is its own
  backend, so Dynamo does not reuse a graph compiled under another budget.
- The backward graph is compiled with the forward (not lazily at the first backward),
  so that all compile time falls inside one timed call.
- The batch dimension is dynamic from the first call: the smaller last batch of an
  epoch does not compile again.
- Identical blocks (a ViT's) share one compiled graph: the cost is one block's compile.
- A new compiler resets Dynamo (one trial at a time runs in a worker process), so a
  worker's hundredth ``compiled`` trial compiles as its first did.

Example::

    compiler = BlockCompiler(budget=0.5)
    block.forward = compiler.wrap(block.forward)
    ...  # train; compiler.compile_s: seconds spent compiling
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._functorch.config as functorch_config  # the budget lives here, not in a public API

log = logging.getLogger(__name__)


class BlockCompiler:
    """Compiles forwards with Inductor under ``budget``; ``compile_s`` sums compile time."""

    def __init__(self, budget: float) -> None:
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"activation memory budget must be in [0, 1], got {budget}")
        # a fresh start for every trial: Dynamo's caches of earlier trials in this worker
        # process would otherwise pile up on the blocks' shared code until its recompile
        # limit (8) turned compilation off, silently running blocks eagerly
        torch._dynamo.reset()
        self.budget = budget
        self.compile_s = 0.0  # seconds of the calls that compiled (the block's run included)
        self.compiles = 0  # graphs compiled

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx  # Inductor loads only when used

        self.compiles += 1
        with functorch_config.patch(
            activation_memory_budget=self.budget, force_non_lazy_backward_lowering=True
        ):
            return compile_fx(graph, example_inputs)

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` compiled on its first call (and timed whenever a call compiles)."""
        compiled = torch.compile(forward, backend=self._backend)

        def run(x: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] > 1:
                torch._dynamo.mark_dynamic(x, 0)  # any batch size, one graph
            before, t0 = self.compiles, time.perf_counter()
            out = compiled(x, *args, **kwargs)
            if self.compiles != before:
                seconds = time.perf_counter() - t0
                self.compile_s += seconds
                log.info(
                    "compiled a block in %.1f s (activation budget %.2f)", seconds, self.budget
                )
            return out

        return run
