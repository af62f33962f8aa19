"""The Mamba backbones: the selective scan, the kernel boundary, Vim and MambaVision.

The scan is checked against a naive recurrence written here (fp64, one step at a time);
the models' parameter names and shapes against lists derived here from the official
code (hustvl/Vim ``vim/models_mamba.py`` + ``mamba_simple.py``, NVlabs/MambaVision
``models/mamba_vision.py``), and their mixers against the official formulation written
with raw weights, as the official forward passes them to the CUDA kernels.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from orchestrator.spec import TrainConfig, TrialSpec
from workers import checkpoint_plan
from workers.backbones import MAMBA, classifier_name, create_backbone, family, input_size
from workers.checkpointing import (
    MODES,
    Checkpointer,
    apply_checkpointing,
    find_blocks,
    profile_blocks,
    set_mode,
)
from workers.data import ImageData
from workers.mamba import hub, kernels, scan
from workers.mamba.scan import (
    MAX_CHUNK,
    MAX_LOG_DECAY,
    chunk_length,
    selective_scan_chunked,
    selective_scan_reference,
)
from workers.methods import MethodContext, apply_method
from workers.trial import run_trial

TINY_MAMBA_BACKBONES = ["vim_test", "mambavision_test"]

# ---------------------------------------------------------------- the scan


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):  # noqa: ANN001, ANN201
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = C_t . h_t + D u_t; y *= silu(z),
    in fp64, one time step and one state at a time (the paper's Algorithm 2)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = torch.log1p(torch.exp(delta))
    batch, dim, length = u.shape
    h = [torch.zeros(batch, dim, dtype=torch.float64) for _ in range(A.shape[1])]
    ys = []
    for t in range(length):
        y_t = 0.0
        for n in range(A.shape[1]):
            decay = torch.exp(delta[:, :, t] * A[:, n])
            h[n] = decay * h[n] + delta[:, :, t] * B[:, None, n, t] * u[:, :, t]
            y_t = y_t + C[:, None, n, t] * h[n]
        ys.append(y_t)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y


def _scan_inputs(
    batch: int = 2,
    dim: int = 6,
    length: int = 37,
    state: int = 5,
    step: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random inputs as a Mamba layer makes them: A = -(1..state) perturbed, a step-size
    bias around softplus^-1(0.01); ``step`` shifts the step size's pre-activation."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    A = -torch.arange(1, state + 1, dtype=dtype).repeat(dim, 1) * torch.exp(0.3 * randn(dim, state))
    return dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length) + step,
        A=A,
        B=randn(batch, state, length),
        C=randn(batch, state, length),
        D=randn(dim),
        z=randn(batch, dim, length),
        delta_bias=-4.6 + 0.5 * randn(dim),
    )


# step-size regimes: slow decay (one chunk of MAX_CHUNK steps), fast decay (short chunks),
# decays that would overflow fp32 in any chunk longer than one step
REGIMES = {"slow": -2.0, "fast": 6.0, "extreme": 60.0}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("with_extras", [True, False], ids=["D-z-bias", "plain"])
def test_chunked_scan_equals_the_naive_recurrence(regime: str, with_extras: bool) -> None:
    inputs = _scan_inputs(length=75, step=REGIMES[regime])
    if not with_extras:
        inputs = {k: v for k, v in inputs.items() if k not in ("D", "z", "delta_bias")}
    expected = naive_scan(**inputs, softplus=True)
    out = selective_scan_chunked(**inputs, delta_softplus=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    reference = selective_scan_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(reference.double(), expected, atol=1e-5, rtol=1e-5)


def test_regimes_exercise_long_short_and_single_step_chunks() -> None:
    sizes = {}
    for regime, step in REGIMES.items():
        inputs = _scan_inputs(length=75, step=step)
        delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
        sizes[regime] = chunk_length(delta, inputs["A"])
    assert sizes["slow"] == MAX_CHUNK
    assert 1 < sizes["fast"] < MAX_CHUNK
    assert sizes["extreme"] == 1


def test_chunk_length_bounds_every_channels_log_decay() -> None:
    inputs = _scan_inputs(length=100, step=3.0)
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    size = chunk_length(delta, inputs["A"])
    rate = inputs["A"].abs().amax(1)

    def worst(size: int) -> float:
        spans = [delta[..., s + 1 : s + size].sum(-1) * rate for s in range(0, 100, size)]
        return max(float(s.max()) for s in spans)

    assert worst(size) <= MAX_LOG_DECAY < worst(2 * size)  # the longest chunk that fits


@pytest.mark.parametrize("blocks", [1, 7], ids=["one-block", "channel-blocks"])
@pytest.mark.parametrize("regime", ["slow", "fast"])
def test_chunked_scan_gradients_equal_the_naive_recurrences(
    regime: str, blocks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-written backward (the reversed scan), by chunks and by blocks of channels."""
    batch, dim, length, state = 2, 20, 20, 5
    if blocks > 1:  # blocks of 3 channels (the last of 2), as a CPU runs a wide layer
        monkeypatch.setattr(scan, "CPU_BLOCK_ELEMENTS", 3 * batch * length * state)
        monkeypatch.setattr(scan, "MIN_BLOCK_CHANNELS", 1)
    assert len(scan._channel_blocks(batch, dim, length, state, torch.device("cpu"))) == blocks
    inputs = _scan_inputs(batch, dim, length, state, REGIMES[regime], dtype=torch.float64)
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    weights = torch.randn(batch, dim, length, dtype=torch.float64)
    out = selective_scan_chunked(**inputs, delta_softplus=True)
    (out * weights).sum().backward()
    ours = {k: v.grad.clone() for k, v in inputs.items()}
    for v in inputs.values():
        v.grad = None
    expected = naive_scan(**inputs, softplus=True)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    for name, value in inputs.items():
        torch.testing.assert_close(ours[name], value.grad, atol=1e-9, rtol=1e-7, msg=name)


def test_chunked_scan_saves_only_its_inputs() -> None:
    """As mamba-ssm's kernel: the states are recomputed in backward, never kept."""
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(length=40).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan_chunked(**inputs, delta_softplus=True)
    batch, dim, length = inputs["u"].shape
    assert saved and max(t.numel() for t in saved) == batch * dim * length  # no state axis


def test_chunked_scan_keeps_low_precision_inputs_dtype() -> None:
    inputs = _scan_inputs(length=30)
    half = {
        k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()
    }
    out = selective_scan_chunked(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    expected = naive_scan(**{k: v.float() for k, v in half.items()}, softplus=True)
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- the kernel boundary


@pytest.fixture
def kernel_modules(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Install fake mamba-ssm / causal-conv1d modules (or None: not installed)."""
    kernels.optional_kernel.cache_clear()

    def install(scan: object | None, conv: object | None) -> None:
        for (module, name), fn in ((kernels.FUSED_SCAN, scan), (kernels.FUSED_CAUSAL_CONV, conv)):
            fake = None if fn is None else types.SimpleNamespace(**{name: fn})
            monkeypatch.setitem(sys.modules, module, fake)
        kernels.optional_kernel.cache_clear()

    yield install
    kernels.optional_kernel.cache_clear()


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_fused_scan_is_used_on_cuda_when_mamba_ssm_is_installed(kernel_modules) -> None:  # noqa: ANN001
    def fused(*args: object, **kwargs: object) -> str:
        return "fused"

    kernel_modules(scan=fused, conv=None)
    assert kernels.scan_implementation(CUDA) is fused
    assert kernels.scan_implementation(CPU) is selective_scan_chunked
    kernel_modules(scan=None, conv=None)
    assert kernels.scan_implementation(CUDA) is selective_scan_chunked


def test_fused_causal_conv_gets_the_modules_weights(kernel_modules) -> None:  # noqa: ANN001
    calls = []

    def fused(x, weight, bias, activation):  # noqa: ANN001, ANN202
        calls.append((x, weight, bias, activation))
        return x

    kernel_modules(scan=None, conv=fused)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 9)
    assert kernels.conv_implementation(CUDA)(conv, x) is x
    ((_, weight, bias, activation),) = calls
    assert weight.shape == (6, 4) and bias is conv.bias and activation == "silu"
    # the PyTorch path is the causal convolution: output t sees inputs <= t only
    out = kernels.conv_implementation(CPU)(conv, x)
    changed = x.clone()
    changed[..., 5:] += 1.0
    later = kernels.conv_implementation(CPU)(conv, changed)
    assert out.shape == x.shape
    assert torch.equal(out[..., :5], later[..., :5]) and not torch.equal(
        out[..., 5:], later[..., 5:]
    )
    kernel_modules(scan=None, conv=None)
    assert kernels.conv_implementation(CUDA) is kernels.conv_implementation(CPU)


def test_models_give_the_scan_what_the_fused_kernel_requires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32 A, D and delta_bias; (batch, state, length) B and C; the projections' dtype for
    u, delta, z (what mamba-ssm's selective_scan_fn checks), also under bf16 autocast."""
    seen = []

    def checking_scan(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False):  # noqa: ANN001, ANN202
        batch, dim, length = u.shape
        assert delta.shape == u.shape and delta.dtype == u.dtype
        assert A.dtype == D.dtype == torch.float32 and A.shape[0] == D.shape[0] == dim
        assert B.shape == C.shape == (batch, A.shape[1], length) and B.dtype == u.dtype
        assert z is None or (z.shape == u.shape and z.dtype == u.dtype)
        assert delta_bias is None or delta_bias.dtype == torch.float32
        assert delta_softplus
        seen.append(u.dtype)
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    monkeypatch.setattr(kernels, "scan_implementation", lambda device: checking_scan)
    for name in TINY_MAMBA_BACKBONES:
        model = create_backbone(name, num_classes=3)
        model(torch.randn(2, 3, 32, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(2, 3, 32, 32))
    assert torch.float32 in seen and torch.bfloat16 in seen


# ---------------------------------------------------------------- official names and sizes


def official_vim_state(img: int, patch: int, dim: int, depth: int, classes: int) -> dict:
    """Key -> shape of hustvl/Vim's VisionMamba (bimamba v2, middle class token, abs pos
    embed, RMSNorm), derived from its code: ``Mamba(d_state=16, d_conv=4, expand=2)``."""
    inner, rank, state, conv = 2 * dim, math.ceil(dim / 16), 16, 4
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, (img // patch) ** 2 + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
        "norm_f.weight": (dim,),
    }
    for i in range(depth):
        mixer = f"layers.{i}.mixer."
        shapes[f"layers.{i}.norm.weight"] = (dim,)
        shapes[mixer + "in_proj.weight"] = (2 * inner, dim)
        shapes[mixer + "out_proj.weight"] = (dim, inner)
        for b in ("", "_b"):
            shapes[mixer + f"conv1d{b}.weight"] = (inner, 1, conv)
            shapes[mixer + f"conv1d{b}.bias"] = (inner,)
            shapes[mixer + f"x_proj{b}.weight"] = (rank + 2 * state, inner)
            shapes[mixer + f"dt_proj{b}.weight"] = (inner, rank)
            shapes[mixer + f"dt_proj{b}.bias"] = (inner,)
            shapes[mixer + f"D{b}"] = (inner,)
        shapes[mixer + "A_log"] = shapes[mixer + "A_b_log"] = (inner, state)
    return shapes


def _batchnorm(prefix: str, channels: int) -> dict:
    stats = ("weight", "bias", "running_mean", "running_var")
    return {f"{prefix}.{k}": (channels,) for k in stats} | {f"{prefix}.num_batches_tracked": ()}


def official_mambavision_state(
    dim: int, in_dim: int, depths: tuple[int, ...], classes: int, mlp_ratio: int = 4
) -> dict:
    """Key -> shape of NVlabs/MambaVision's MambaVision (no layer scale), derived from its
    code: conv levels 0-1, token levels 2-3 whose second half is self-attention (qkv
    bias), ``MambaVisionMixer(d_state=8, d_conv=3, expand=1)``, timm's Mlp."""
    shapes = {"patch_embed.conv_down.0.weight": (in_dim, 3, 3, 3)}
    shapes |= _batchnorm("patch_embed.conv_down.1", in_dim)
    shapes["patch_embed.conv_down.3.weight"] = (dim, in_dim, 3, 3)
    shapes |= _batchnorm("patch_embed.conv_down.4", dim)
    for i, depth in enumerate(depths):
        d = dim * 2**i
        half, rank = d // 2, math.ceil(d / 16)
        attention = range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            if i < 2:
                for c in ("conv1", "conv2"):
                    shapes |= {p + c + ".weight": (d, d, 3, 3), p + c + ".bias": (d,)}
                shapes |= _batchnorm(p + "norm1", d) | _batchnorm(p + "norm2", d)
                continue
            for norm in ("norm1", "norm2"):
                shapes |= {p + norm + ".weight": (d,), p + norm + ".bias": (d,)}
            shapes |= {
                p + "mlp.fc1.weight": (mlp_ratio * d, d),
                p + "mlp.fc1.bias": (mlp_ratio * d,),
            }
            shapes |= {p + "mlp.fc2.weight": (d, mlp_ratio * d), p + "mlp.fc2.bias": (d,)}
            m = p + "mixer."
            if j in attention:
                shapes |= {m + "qkv.weight": (3 * d, d), m + "qkv.bias": (3 * d,)}
                shapes |= {m + "proj.weight": (d, d), m + "proj.bias": (d,)}
            else:
                shapes |= {
                    m + "in_proj.weight": (d, d),
                    m + "x_proj.weight": (rank + 16, half),
                    m + "dt_proj.weight": (half, rank),
                    m + "dt_proj.bias": (half,),
                    m + "A_log": (half, 8),
                    m + "D": (half,),
                    m + "out_proj.weight": (d, d),
                    m + "conv1d_x.weight": (half, 1, 3),
                    m + "conv1d_z.weight": (half, 1, 3),
                }
        if i < len(depths) - 1:
            shapes[f"levels.{i}.downsample.reduction.0.weight"] = (2 * d, d, 3, 3)
    features = dim * 2 ** (len(depths) - 1)
    shapes |= _batchnorm("norm", features)
    return shapes | {"head.weight": (classes, features), "head.bias": (classes,)}


OFFICIAL = {
    "vim_test": lambda classes: official_vim_state(32, 8, 32, 4, classes),
    "mambavision_test": lambda classes: official_mambavision_state(16, 8, (1, 1, 2, 2), classes),
    "vim_small": lambda classes: official_vim_state(224, 16, 384, 24, classes),
    "mambavision_t": lambda classes: official_mambavision_state(80, 32, (1, 3, 8, 4), classes),
}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_state_dict_has_the_official_names_and_shapes(name: str) -> None:
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    assert _shapes(model) == OFFICIAL[name](1000)
    assert family(name) == MAMBA and classifier_name(model) == "head"


@pytest.mark.parametrize(
    ("name", "published", "digits"), [("vim_small", 26e6, 0), ("mambavision_t", 31.8e6, 1)]
)
def test_full_size_models_have_the_published_parameter_count(
    name: str, published: float, digits: int
) -> None:
    """Vim-S: 26M (Vim paper, Table 1); MambaVision-T: 31.8M (MambaVision paper, Table 1)."""
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    official = sum(math.prod(s) for k, s in OFFICIAL[name](1000).items() if not k.endswith(BUFFERS))
    assert count == official
    assert round(count / 1e6, digits) == round(published / 1e6, digits)
    assert input_size(model) == 224


def _random_state(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def _official_checkpoint(name: str, path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """An ImageNet checkpoint as the official releases store it: hustvl/Vim's training
    checkpoint (model, optimizer, argparse args), MambaVision's timm training checkpoint,
    or the Hugging Face wrapper's safetensors (keys under ``model.``)."""
    state = _random_state(OFFICIAL[name](1000))
    args = argparse.Namespace(model=name, lr=5e-4, drop_path=0.05, data_path="/imagenet")
    if fmt == "vim-pth":
        torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 299, "args": args}, path)
    elif fmt == "timm-pth-tar":
        torch.save({"state_dict": state, "epoch": 309, "arch": name, "args": args}, path)
    else:
        save_file({f"model.{k}": v for k, v in state.items()}, str(path))
    return state


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("vim_test", "vim-pth"), ("mambavision_test", "timm-pth-tar"), ("mambavision_test", "hf")],
)
def test_official_checkpoint_loads_strictly_with_a_new_head(
    name: str, fmt: str, tmp_path: Path
) -> None:
    path = tmp_path / ("weights.safetensors" if fmt == "hf" else "weights.pth")
    state = _official_checkpoint(name, path, fmt)
    model = create_backbone(name, num_classes=7, pretrained=str(path))
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        if key.startswith("head."):
            assert loaded[key].shape[0] == 7  # the dataset's head, re-initialised
        else:
            assert torch.equal(loaded[key], value), key


def test_checkpoint_with_a_missing_official_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    state = _official_checkpoint("vim_test", path, "vim-pth")
    del state["layers.2.mixer.x_proj_b.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match="x_proj_b"):
        create_backbone("vim_test", num_classes=7, pretrained=str(path))


class _Payload:
    def __reduce__(self):  # noqa: ANN204 - what a malicious checkpoint would do
        return (print, ("executed",))


def test_allow_listed_args_do_not_open_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": argparse.Namespace(payload=_Payload())}, path)
    with pytest.raises(pickle.UnpicklingError):
        create_backbone("vim_test", num_classes=7, pretrained=str(path))


@pytest.mark.parametrize("name", TINY_MAMBA_BACKBONES)
def test_saved_model_loads_back_strictly(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_backbone(name, num_classes=5).eval()
    path = tmp_path / "ours.pth"
    torch.save(source.state_dict(), path)
    again = create_backbone(name, num_classes=5)
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), source(x), atol=0, rtol=0)


def test_hub_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    released = hub.HubWeights("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")
    assert hub.resolve("hub", released) == released
    assert hub.resolve("hf-hub:me/vim", released) == hub.HubWeights("me/vim", released.filename)
    assert hub.resolve("hf-hub:me/vim/a/b.pth", None) == hub.HubWeights("me/vim", "a/b.pth")
    for bad in ("hf-hub:me", "hf-hub:/x", "timm/vim"):
        with pytest.raises(ValueError, match="hub reference"):
            hub.resolve(bad, released)
    with pytest.raises(ValueError, match="no released weights"):
        create_backbone("vim_test", num_classes=3, pretrained="hub")
    with torch.device("meta"):
        cfg = create_backbone("mambavision_t", num_classes=3).pretrained_cfg
    assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == (
        "nvidia/MambaVision-T-1K",
        "model.safetensors",
    )

    import huggingface_hub

    path = tmp_path / "w.safetensors"
    state = _official_checkpoint("mambavision_test", path, "hf")
    asked = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, file: asked.append((repo, file)) or path
    )
    model = create_backbone("mambavision_test", num_classes=3, pretrained="hf-hub:me/mv/w.st")
    assert asked == [("me/mv", "w.st")]
    assert torch.equal(
        model.state_dict()["levels.3.blocks.1.mixer.qkv.weight"],
        state["levels.3.blocks.1.mixer.qkv.weight"],
    )

    def offline(repo: str, file: str) -> Path:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="when offline, give a local file"):
        create_backbone("mambavision_test", num_classes=3, pretrained="hf-hub:me/mv/w.st")


# ---------------------------------------------------------------- the official formulation


def _causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    k = conv.weight.shape[-1]
    return F.silu(F.conv1d(F.pad(x, (k - 1, 0)), conv.weight, conv.bias, groups=x.shape[1]))


def _official_vim_branch(xz, conv, x_proj, dt_proj, A_log, D):  # noqa: ANN001, ANN202
    """mamba-ssm's mamba_inner_fn_no_out_proj with raw weights, as Vim's forward calls it."""
    x, z = xz.chunk(2, dim=1)
    x = _causal_conv_silu(x, conv)
    x_dbl = x.transpose(1, 2).reshape(-1, x.shape[1]) @ x_proj.weight.T  # ((b l), r + 2n)
    rank, state = dt_proj.weight.shape[1], A_log.shape[1]
    length = x.shape[-1]
    delta = (dt_proj.weight @ x_dbl[:, :rank].T).view(-1, x.shape[0], length).transpose(0, 1)
    B = x_dbl[:, rank : rank + state].view(x.shape[0], length, state).transpose(1, 2)
    C = x_dbl[:, -state:].view(x.shape[0], length, state).transpose(1, 2)
    A = -torch.exp(A_log.float())
    return naive_scan(x, delta, A, B, C, D, z, delta_bias=dt_proj.bias, softplus=True)


def test_vim_mixer_is_the_official_bimamba_v2() -> None:
    torch.manual_seed(0)
    mixer = create_backbone("vim_test", num_classes=3).layers[1].mixer
    hidden = torch.randn(2, 17, 32)
    xz = (hidden @ mixer.in_proj.weight.T).transpose(1, 2)
    out = _official_vim_branch(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    out_b = _official_vim_branch(
        xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b
    )
    expected = ((out + out_b.flip(-1)).transpose(1, 2) / 2) @ mixer.out_proj.weight.double().T
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden).double(), expected, atol=1e-5, rtol=1e-4)


def test_vim_forward_is_the_official_two_stream_residual() -> None:
    """Official blocks return (mixer output, residual) and add them in the next block; the
    head reads the class token inserted at position N // 2."""
    torch.manual_seed(0)
    model = create_backbone("vim_test", num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.patch_embed(images)
        cls = model.cls_token.expand(2, -1, -1)
        hidden = torch.cat([x[:, :8], cls, x[:, 8:]], dim=1) + model.pos_embed
        residual = None
        for layer in model.layers:
            residual = hidden if residual is None else residual + hidden
            hidden = layer.mixer(layer.norm(residual))
        expected = model.head(model.norm_f(residual + hidden)[:, 8])
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


def test_mambavision_mixer_is_the_official_one() -> None:
    """Official: F.conv1d(padding="same") with the modules' weights, the dt bias applied by
    dt_proj and again in the scan, the gate-free z half concatenated."""
    torch.manual_seed(0)
    model = create_backbone("mambavision_test", num_classes=3)
    mixer = model.levels[2].blocks[0].mixer
    with torch.no_grad():  # a non-zero dt bias, so that applying it twice matters
        mixer.dt_proj.bias.uniform_(-3.0, -1.0)
    hidden = torch.randn(3, 16, 64)
    xz = (hidden @ mixer.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, mixer.conv1d_x.weight, padding="same", groups=32))
    z = F.silu(F.conv1d(z, mixer.conv1d_z.weight, padding="same", groups=32))
    dt, B, C = (x.transpose(1, 2) @ mixer.x_proj.weight.T).split([4, 8, 8], dim=-1)
    delta = (dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias).transpose(1, 2)
    A = -torch.exp(mixer.A_log)
    y = naive_scan(
        x,
        delta,
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        mixer.D,
        delta_bias=mixer.dt_proj.bias,
        softplus=True,
    )
    expected = torch.cat([y, z.double()], dim=1).transpose(1, 2) @ mixer.out_proj.weight.double().T
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden).double(), expected, atol=1e-5, rtol=1e-4)


def test_mambavision_levels_attend_in_their_second_half() -> None:
    with torch.device("meta"):
        model = create_backbone("mambavision_t", num_classes=3)
    kinds = [[type(block.mixer).__name__ for block in level.blocks] for level in model.levels[2:]]
    assert kinds == [
        ["MambaVisionMixer"] * 4 + ["Attention"] * 4,
        ["MambaVisionMixer"] * 2 + ["Attention"] * 2,
    ]


# ---------------------------------------------------------------- training on a CPU


@pytest.mark.parametrize("name", TINY_MAMBA_BACKBONES)
def test_tiny_models_train_on_cpu(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=7)
    size = input_size(model)
    assert size == {"vim_test": 32, "mambavision_test": 64}[name] and family(name) == MAMBA
    assert sum(p.numel() for p in model.parameters()) < 600_000
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 7, (4,))
    logits = model(x)
    assert logits.shape == (4, 7)
    F.cross_entropy(logits, y).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_mambavision_takes_any_resolution() -> None:
    model = create_backbone("mambavision_test", num_classes=3, img_size=48).eval()
    assert input_size(model) == 48
    with torch.no_grad():  # 48 px: 3x3 and 2x2 maps, padded to whole 4x4 and 2x2 windows
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
        assert model(torch.randn(1, 3, 40, 56)).shape == (1, 3)


# ---------------------------------------------------------------- checkpointing


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("vim_test", [f"layers.{i}" for i in range(4)]),
        (
            "mambavision_test",
            ["levels.0.blocks.0", "levels.1.blocks.0"]
            + [f"levels.{i}.blocks.{j}" for i in (2, 3) for j in (0, 1)],
        ),
    ],
)
def test_blocks_are_found_under_their_official_names(name: str, blocks: list[str]) -> None:
    assert [n for n, _ in find_blocks(create_backbone(name, num_classes=3))] == blocks


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)  # the same drop_path draws in every run
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", TINY_MAMBA_BACKBONES)
def test_every_checkpointing_mode_gives_plain_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=4, drop_path_rate=0.2).train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    reference = _grads(model, x, y)
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y), repeats=1)
    assert [b.name for b in profile.blocks] == [n for n, _ in find_blocks(model)]
    assert all(0 < b.input_bytes < b.saved_bytes for b in profile.blocks)
    blocks = find_blocks(model)
    allowed = {b.name: [o.kind for o in b.options()] for b in profile.blocks}
    for mode in MODES:
        for block_name, block in blocks:
            set_mode(block, mode if mode in allowed[block_name] else "save")
        grads = _grads(model, x, y)
        assert grads.keys() == reference.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], reference[key], atol=1e-5, rtol=1e-4)
    for _, block in blocks:
        set_mode(block, "save")
    model.set_grad_checkpointing(True)  # timm's switch: the same gradients, blocks run twice
    calls = []
    hooks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for _, b in blocks]
    grads = _grads(model, x, y)
    assert len(calls) == 2 * len(blocks)
    for hook in hooks:
        hook.remove()
    for key in grads:
        torch.testing.assert_close(grads[key], reference[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY_MAMBA_BACKBONES)
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_strategies_apply_to_adapted_models(name: str, method: str) -> None:
    """static recomputes every block; adaptive plans within a budget between the least
    feasible and the unconstrained one."""
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=4)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=4)
    args = {"compute_dtype": "fp32"} if method == "qlora" else {}
    model = apply_method(method, args, model, ctx).model.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    assert apply_checkpointing("static", {}, model) == [n for n, _ in find_blocks(model)]
    ckpt = Checkpointer("adaptive", {}, model)
    profile = profile_blocks(model, lambda: F.cross_entropy(model(x), y), repeats=1)
    least = checkpoint_plan.min_peak(profile.costs()) + profile.prefix_bytes
    budget = (least + profile.unconstrained_bytes) // 2
    assert least < budget < profile.unconstrained_bytes
    ckpt.use(profile, budget - profile.prefix_bytes)
    assert 0 < len(ckpt.checkpointed()) < len(find_blocks(model))
    assert ckpt.predicted_activation_bytes() <= budget
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    ("backbone", "method", "checkpointing"),
    [("vim_test", "qlora", "static"), ("mambavision_test", "snella", "adaptive")],
)
def test_trials_run_on_the_tiny_mamba_models(
    backbone: str, method: str, checkpointing: str, synthetic_data: ImageData
) -> None:
    spec = TrialSpec(
        backbone=backbone,
        method=method,
        checkpointing=checkpointing,
        dataset="synthetic",
        dataset_args={"num_classes": 4, "images_per_class": 24, "image_size": 16},
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, max_steps=3),
    )
    rec = run_trial(spec, num_threads=1, data=synthetic_data)
    assert rec.status == "ok", rec.error
    assert rec.steps == 3 and rec.total_blocks == len(find_blocks(create_backbone(backbone, 4)))
    assert (rec.checkpointed_blocks > 0) == (checkpointing == "static")
    assert 0 < rec.params_trainable < rec.params_total


# ---------------------------------------------------------------- PEFT targets


EXPECTED_TARGETS = {
    "vim_test": {
        f"layers.{i}.mixer.{p}"
        for i in range(4)
        for p in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
    },
    "mambavision_test": {
        f"levels.{i}.blocks.{j}.{p}"
        for i in (2, 3)
        for j, mixer in ((0, ("in_proj", "x_proj", "dt_proj", "out_proj")), (1, ("qkv", "proj")))
        for p in [f"mixer.{m}" for m in mixer] + ["mlp.fc1", "mlp.fc2"]
    },
}


@pytest.mark.parametrize("name", TINY_MAMBA_BACKBONES)
def test_lora_adapts_every_linear_layer_of_the_blocks_and_nothing_else(name: str) -> None:
    model = create_backbone(name, num_classes=3)
    ctx = MethodContext(classifier=classifier_name(model), total_steps=4)
    adapted = apply_method("lora", {"r": 2}, model, ctx).model
    prefix = "base_model.model."
    wrapped = {
        n.removeprefix(prefix).removesuffix(".lora_A")
        for n, _ in adapted.named_modules()
        if n.endswith(".lora_A")
    }
    assert wrapped == EXPECTED_TARGETS[name]
    linears = {
        n
        for n, m in create_backbone(name, num_classes=3).named_modules()
        if isinstance(m, nn.Linear)
    }
    assert linears - wrapped == {"head"}  # every other linear layer is a block's
