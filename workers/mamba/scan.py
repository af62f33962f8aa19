"""The selective scan of Mamba, in pure PyTorch: a step-by-step reference and a chunked form.

Gu, Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023.
https://arxiv.org/abs/2312.00752 (Algorithm 2; mamba-ssm's ``selective_scan_fn``).

For every channel d and state n, with a step size delta_t that depends on the input:

    h_t = exp(delta_t A[d, n]) h_{t-1} + delta_t B_t[n] u_t          (h_{-1} = 0)
    y_t = sum_n C_t[n] h_t[n] + D[d] u_t,     out = y * silu(z)  (when z is given)

``delta`` gets ``delta_bias`` added and, with ``delta_softplus``, goes through softplus
first. Tensors use mamba-ssm's layout, so that its fused CUDA kernel is a drop-in
replacement (``workers.mamba.kernels``): ``u``, ``delta``, ``z`` (batch, dim, length);
``A`` (dim, state); ``B``, ``C`` (batch, state, length), input-dependent; ``D`` and
``delta_bias`` (dim,). Both forms compute in fp32 (fp64 inputs stay fp64) and return
the dtype of ``u``, as mamba-ssm does.

The chunked form replaces the loop over time by a few whole-tensor passes, forward and
backward (see ``selective_scan_chunked``): the pure-PyTorch path of the models, on a
CPU and on a GPU without mamba-ssm. The reference is there to check it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Longest chunk of the chunked scan: the loop over chunks is the only sequential part.
MAX_CHUNK = 64
# Largest |log decay| inside a chunk. Within a chunk the state is computed as
# exp(+s) * cumsum(exp(-s) * input): exp(60) ~ 1e26 leaves fp32 (max ~3e38) 12 orders of
# magnitude for the inputs and their sum, and keeps exp(s) above fp32's smallest normal.
MAX_LOG_DECAY = 60.0
# On a CPU the chunked scan runs over blocks of channels whose (batch, channels, length,
# state) temporaries hold about this many elements (2 MiB in fp32), so that its few passes
# over them hit the cache: ~1.5x the throughput of one block at Vim-S's size (d_inner 768,
# 197 tokens, batch 2, one core). A GPU takes all channels at once.
CPU_BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK_CHANNELS = 8  # below this, per-block overhead outweighs the cache


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Inputs in the compute dtype, with the step size's bias and softplus applied."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _output(
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``y`` plus the skip connection D u, gated by silu(z), in ``dtype``."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The recurrence, one time step after the other: the reference the chunked form must
    equal (and the baseline of ``benchmarks/scan.py``)."""
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (batch, dim, length, state)
    inputs = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    # unbind, not indexing: its backward is one stack, not a zero-filled copy per step
    for decay_t, input_t, c_t in zip(decay.unbind(2), inputs.unbind(2), C.unbind(2), strict=True):
        h = decay_t * h + input_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    return _output(torch.stack(ys, dim=-1), u, D, z, dtype)


def chunk_length(delta: torch.Tensor, A: torch.Tensor, max_chunk: int = MAX_CHUNK) -> int:
    """The longest chunk (``max_chunk`` or the whole sequence, halved as needed) in which no
    channel's log decay exceeds ``MAX_LOG_DECAY`` (after its first step, whose decay is
    applied apart).

    ``delta`` (batch, dim, length) is the step size after bias and softplus. A bound per
    channel: |A[d, :]|max x sum of |delta| over the chunk's steps after the first.
    """
    delta = delta.detach().abs()
    rate = A.detach().abs().amax(dim=1)[:, None]  # (dim, 1)
    batch, dim, length = delta.shape
    size = min(max_chunk, length)
    while size > 1:
        chunks = -(-length // size)
        steps = F.pad(delta, (0, chunks * size - length)).view(batch, dim, chunks, size)
        if float((steps[..., 1:].sum(-1) * rate).max()) <= MAX_LOG_DECAY:
            return size
        size = (size + 1) // 2
    return 1


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    max_chunk: int = MAX_CHUNK,
) -> torch.Tensor:
    """The selective scan by chunks of time steps: exact, parallel inside each chunk.

    Inside a chunk of T steps (s_t: the log decay from the chunk's first step to step t,
    x_t = delta_t B_t u_t, g: the first step's own decay, h_in: the state entering it):

        h_t = exp(s_t) * (g * h_in + sum_{k <= t} x_k / exp(s_k))

    a cumulative sum over the chunk for every channel at once. s_t = A * (cumulative sum
    of delta), so the cumulative sum runs over (batch, dim) before the state axis is
    broadcast. Only the states entering the chunks are carried sequentially, one step
    per chunk. ``chunk_length`` keeps exp(+-s) finite in fp32; steps added to fill the
    last chunk have delta = 0 (no decay, no input) and are cropped.

    Backward is the adjoint recurrence, the same scan run backwards in time (``_Scan``):
    like mamba-ssm's kernel, only the inputs are kept for it and the states are
    recomputed, so that saved-activation meters see what the CUDA kernel keeps.
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    return _output(_Scan.apply(u, delta, A, B, C, max_chunk), u, D, z, dtype)


def _channel_blocks(batch: int, dim: int, length: int, state: int, device: torch.device) -> list:
    """Slices of the channels that run together: all of them on a GPU; on a CPU, blocks
    whose (batch, channels, length, state) tensors hold ~``CPU_BLOCK_ELEMENTS``."""
    size = dim
    if device.type == "cpu":
        size = max(MIN_BLOCK_CHANNELS, CPU_BLOCK_ELEMENTS // (batch * length * state))
    return [slice(start, start + size) for start in range(0, dim, size)]


class _Scan(torch.autograd.Function):
    """y_t = sum_n C_t[n] h_t[n] with h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, for
    prepared inputs (bias and softplus applied, compute dtype).

    Backward: g_t = dL/dh_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}, the recurrence
    reversed in time, by chunks as well. Then, with P_t = g_t h_{t-1} exp(delta_t A):
    dA = sum P_t delta_t, ddelta_t = sum_n P_t A + u_t sum_n g_t B_t, du_t = delta_t
    sum_n g_t B_t, dB_t = sum_d g_t delta_t u_t, dC_t = sum_d dy_t h_t.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, max_chunk):  # noqa: ANN001, ANN205
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.max_chunk = max_chunk
        x = delta * u
        y = torch.empty_like(u)
        for block in _channel_blocks(*u.shape, A.shape[1], u.device):
            states = _states(delta[:, block], x[:, block], A[block], B, max_chunk)
            y[:, block] = torch.einsum("bdln,bnl->bdl", states, C)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        u, delta, A, B, C = ctx.saved_tensors
        x = delta * u
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA, dB, dC = torch.empty_like(A), torch.zeros_like(B), torch.zeros_like(C)
        # g'_k = g_{L-1-k}: the decay that reaches it is delta_{L-k} (nothing before k = 0)
        reverse_step = F.pad(delta.flip(-1)[..., :-1], (1, 0))
        for block in _channel_blocks(*u.shape, A.shape[1], u.device):
            step, a = delta[:, block], A[block]
            states = _states(step, x[:, block], a, B, ctx.max_chunk)
            g = _states(reverse_step[:, block], dy[:, block].flip(-1), a, C.flip(-1), ctx.max_chunk)
            g = g.flip(2)
            dC += torch.einsum("bdln,bdl->bnl", states, dy[:, block])
            previous = F.pad(states[:, :, :-1], (0, 0, 1, 0))  # h_{t-1}, h_{-1} = 0
            p = g * previous * torch.exp(step.unsqueeze(-1) * a[:, None, :])
            dA[block] = torch.einsum("bdln,bdl->dn", p, step)
            q = torch.einsum("bdln,bnl->bdl", g, B)  # d loss / d x_t
            ddelta[:, block] = torch.einsum("bdln,dn->bdl", p, a) + q * u[:, block]
            du[:, block] = q * step
            dB += torch.einsum("bdln,bdl->bnl", g, x[:, block])
        return du, ddelta, dA, dB, dC, None


def _states(
    step: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, max_chunk: int
) -> torch.Tensor:
    """All states h_t = exp(step_t A) h_{t-1} + x_t B_t (h_{-1} = 0), (batch, dim, length,
    state), by chunks (see ``selective_scan_chunked``). No autograd: in-place where it can."""
    batch, dim, length = step.shape
    state = A.shape[1]
    size = chunk_length(step, A, max_chunk)
    chunks = -(-length // size)
    if pad := chunks * size - length:
        step, x, B = (F.pad(t, (0, pad)) for t in (step, x, B))
    step = step.reshape(batch, dim, chunks, size)
    # (batch, 1, chunks, size, state), made contiguous: the broadcast products are faster
    B = B.reshape(batch, 1, state, chunks, size).permute(0, 1, 3, 4, 2).contiguous()

    # log decay s_t from each chunk's first step to step t (0 at the first step)
    cumulative = F.pad(step[..., 1:].cumsum(-1), (1, 0))
    decay = torch.exp(cumulative.unsqueeze(-1) * A[:, None, None, :])
    within = (x.reshape(batch, dim, chunks, size, 1) * B).div_(decay).cumsum(3)
    if chunks > 1:  # the state entering each chunk (none enters the first)
        first = torch.exp(step[..., 0].unsqueeze(-1) * A[:, None, :])
        within += _entering(decay, within, first).unsqueeze(3)
    states = within.mul_(decay)
    return states.view(batch, dim, chunks * size, state)[:, :, :length]


def _entering(decay: torch.Tensor, within: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """g * h_in of every chunk (batch, dim, chunks, state), carried one chunk at a time:
    a chunk's last state is exp(s_last) * (g * h_in + within_last)."""
    last = decay[:, :, :, -1]
    gates = (last * first).unbind(2)
    ends = (last * within[:, :, :, -1]).unbind(2)
    h = torch.zeros_like(ends[0])
    entering = []
    for gate, end in zip(gates, ends, strict=True):
        entering.append(h)
        h = gate * h + end
    return first * torch.stack(entering, dim=2)
