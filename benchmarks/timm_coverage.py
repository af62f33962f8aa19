"""timm coverage: does every timm architecture train under every method with adaptive checkpointing?

For one small model of every timm architecture module (``timm.list_modules()``; per
module the model with the fewest parameters, counted on the meta device; a name that
does not build without weights is passed over), random init, at a reduced input size,
a few steps each on the CPU:

- the input size: the first of 64, 96, ..., 256 px (then the model's native size) at
  which ``check_backbone`` builds the model on the meta device and runs its forward
  there (``img_size`` is passed where the architecture takes it, otherwise the model
  runs at that size as it is); ``size`` says which, ``built`` gives the reason when
  none works;
- ``full``, ``bitfit`` and ``lora`` (``convs: true`` when the blocks have no linear
  layer), each checked with ``why_not`` first (a refusal is a validation row, with its
  reason), then trained with ``none`` and with ``adaptive`` checkpointing;
- ``fits 1/2``: the ``adaptive`` trial runs with ``budget_mb`` = what the ``none`` trial
  accounted for weights, gradients, optimizer and batch + half of its activation peak
  (``accounted_peak_mb - activations_mb / 2``). The trial itself is the check, the most
  faithful one: profiling, the exact plan, re-plans and the accounted peak of the steps
  that ran. ``over_budget`` there means the least plan does not fit half (a stem that
  cannot be checkpointed, one block larger than half): the method is then run
  ``adaptive`` at the unconstrained peak, so that "runs with adaptive" is still shown.

A model too large for this CPU (``REDUCED``: DeepSeek's 412 M ViT) runs with fewer
blocks, through the backbone's ``model_args``; its row names them.

A module counts as covered when all three methods run (``ok``) under both strategies.
Every model runs in its own subprocess with a timeout: a crash or a hang is a row with
its reason, never the end of the run. The models chosen are cached per timm version in
``benchmarks/results/timm_coverage_models.json`` (choosing them builds ~1,300 models on
the meta device: minutes).

    .venv/bin/python -m benchmarks.timm_coverage [--modules resnet,swin_transformer]
        [--out benchmarks/results/timm_coverage.json]
        [--markdown benchmarks/results/timm_coverage.md] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
MODELS_CACHE = RESULTS / "timm_coverage_models.json"
METHODS = ("full", "bitfit", "lora")
SIZES = (64, 96, 128, 160, 192, 224, 256)  # tried in order; then the native size
NUM_CLASSES = 4
UNBOUNDED_MB = 1.0e6  # the `none` trial's budget: never the limit
SELECT_TIMEOUT_S = 600  # choosing a module's model (every variant built on meta)
# Modules whose smallest model is too large for the CPU here (412 M parameters: over an
# hour a module on two cores): run with fewer blocks, passed to timm as `model_args`;
# the architecture (blocks, attention, MLP) is the same, and the row says so.
REDUCED: dict[str, dict[str, Any]] = {"deepseek_vit_412m": {"depth": 2}}


@dataclass
class MethodResult:
    """One method on one model: the trials' statuses and what went wrong first."""

    none: str = ""  # status of the `none` trial ('' = not run)
    adaptive: str = ""  # status of `adaptive` at half the activation peak (or unconstrained)
    fits_half: bool | None = None  # the adaptive plan fit half the activation peak
    stage: str = ""  # where it failed: validation | trial ('' = it ran)
    error: str = ""  # first line of the reason
    activations_mb: float | None = None  # unconstrained activation peak (`none`)
    adaptive_activations_mb: float | None = None  # accounted by the adaptive trial
    checkpointed_blocks: int | None = None

    @property
    def ok(self) -> bool:
        return self.none == "ok" and self.adaptive == "ok"


@dataclass
class Row:
    """One architecture module: its model, how it built, each method's outcome."""

    module: str
    model: str = ""
    params: int | None = None
    size: int | None = None
    size_note: str = ""  # img_size (the architecture takes it) | as is | native
    built: str = ""  # yes | the reason it did not
    blocks: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # REDUCED's, passed to timm
    methods: dict[str, MethodResult] = field(default_factory=dict)
    failure: str = ""  # '' | validation | trial | timeout | crash
    reason: str = ""  # first line of the first failure
    seconds: float = 0.0

    @property
    def covered(self) -> bool:
        return len(self.methods) == len(METHODS) and all(m.ok for m in self.methods.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["covered"] = self.covered
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        data = {k: v for k, v in data.items() if k != "covered"}
        data["methods"] = {k: MethodResult(**v) for k, v in data.get("methods", {}).items()}
        return cls(**data)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text and text.strip() else ""


# ---------------------------------------------------------------- choosing the models


def smallest_model(module: str) -> tuple[str, int] | None:
    """The model of timm ``module`` with the fewest parameters (built on meta)."""
    import timm
    import torch

    best: tuple[str, int] | None = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception as exc:  # noqa: BLE001 - a name that needs weights: passed over
            log.info("%s: not built without weights (%s)", name, _first_line(str(exc)))
            continue
        params = sum(p.numel() for p in model.parameters())
        if best is None or params < best[1]:
            best = (name, params)
    return best


def _load_cache() -> dict[str, Any]:
    import timm

    if MODELS_CACHE.is_file():
        cache = json.loads(MODELS_CACHE.read_text())
        if cache.get("timm") == timm.__version__:
            return cache
    return {"timm": timm.__version__, "models": {}}


# ---------------------------------------------------------------- one model (child process)


def _backbone_args(name: str, size: int) -> dict[str, Any]:
    """The backbone arguments of ``name`` at ``size`` px (with REDUCED's model_args)."""
    reduced = REDUCED.get(name)
    return {"img_size": size, **({"model_args": reduced} if reduced else {})}


def _input_size(name: str) -> tuple[int | None, str, str]:
    """(size, how it is given, '' or the reason no size works)."""
    import timm

    from workers.backbones import _accepts, check_backbone
    from workers.registry import RegistryError

    native = int(timm.get_pretrained_cfg(name, allow_unregistered=True).input_size[-1])
    first = ""
    for size in (*SIZES, *(() if native in SIZES else (native,))):
        try:
            check_backbone(name, _backbone_args(name, size))
        except RegistryError as exc:
            first = first or _first_line(str(exc))
            continue
        how = "img_size" if _accepts(name, "img_size") else "as is"
        return size, "native" if size == native and size not in SIZES else how, ""
    return None, "", first or "no input size works"


def _spec(name: str, size: int, method: str, method_args: dict, strategy: str, budget: float):  # noqa: ANN202
    from orchestrator.spec import TrainConfig, TrialSpec
    from workers.backbones import BACKBONES

    return TrialSpec(
        backbone=name,
        backbone_args=BACKBONES.resolve_args(name, _backbone_args(name, size)),
        method=method,
        method_args=method_args,
        checkpointing=strategy,
        dataset="synthetic",
        dataset_args={"num_classes": NUM_CLASSES, "images_per_class": 4, "image_size": size},
        # two steps: the first is profiled, planned and checked, the second runs the plan
        train=TrainConfig(epochs=1, batch_size=2, max_steps=2, eval_batch_size=8),
        budget_mb=budget,
    )


def _run_method(name: str, size: int, method: str, method_args: dict) -> MethodResult:
    from workers.backbones import check_backbone
    from workers.methods.base import why_not
    from workers.trial import run_trial

    result = MethodResult()
    try:
        reason = why_not(method, name, method_args, _backbone_args(name, size))
    except Exception as exc:  # noqa: BLE001 - a validation error is the row's reason
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        result.stage, result.error = "validation", _first_line(reason)
        return result

    def trial(strategy: str, budget: float):  # noqa: ANN202
        record = run_trial(_spec(name, size, method, method_args, strategy, budget), num_threads=0)
        if record.status == "failed" and not result.error:
            result.stage, result.error = "trial", _first_line(record.error or "")
        return record

    plain = trial("none", UNBOUNDED_MB)
    result.none, result.activations_mb = plain.status, plain.activations_mb
    if plain.status != "ok" or plain.accounted_peak_mb is None or plain.activations_mb is None:
        return result
    if not check_backbone(name, _backbone_args(name, size)).blocks:  # as the grid refuses it
        result.stage, result.error = "validation", "adaptive: no chain of blocks was found"
        return result
    half = plain.accounted_peak_mb - plain.activations_mb / 2
    adaptive = trial("adaptive", half)
    result.fits_half = adaptive.status == "ok"
    if adaptive.status == "over_budget":  # the least plan needs more than half: run it unbound
        adaptive = trial("adaptive", plain.accounted_peak_mb * 1.25 + 1.0)
    result.adaptive = adaptive.status
    result.adaptive_activations_mb = adaptive.activations_mb
    result.checkpointed_blocks = adaptive.checkpointed_blocks
    if adaptive.status not in ("ok", "failed") and not result.error:
        result.stage, result.error = "trial", _first_line(adaptive.error or adaptive.status)
    return result


def run_model(module: str, name: str, params: int) -> Row:
    """Every method on one model (in this process)."""
    from workers.backbones import check_backbone

    row = Row(module, name, params)
    t0 = time.perf_counter()
    size, row.size_note, reason = _input_size(name)
    if size is None:
        row.built, row.failure, row.reason = reason, "validation", reason
        row.seconds = time.perf_counter() - t0
        return row
    row.size, row.built = size, "yes"
    structure = check_backbone(name, _backbone_args(name, size))
    row.blocks, row.model_args = len(structure.blocks), REDUCED.get(name, {})
    for method in METHODS:
        args = {"convs": True} if method == "lora" and not structure.linears else {}
        result = _run_method(name, size, method, args)
        row.methods[method] = result
        if result.error and not row.reason:
            row.failure, row.reason = result.stage, f"{method}: {result.error}"
        elif not result.ok and not row.reason:
            row.failure = "trial"
            row.reason = f"{method}: none {result.none or '-'}, adaptive {result.adaptive or '-'}"
    row.seconds = time.perf_counter() - t0
    return row


def _child(module: str, name: str | None) -> int:
    """Entry of the child process: one JSON row on the last line of stdout."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    params = 0
    if name is None:
        chosen = smallest_model(module)
        if chosen is None:
            print(json.dumps(Row(module, built="no model builds without weights",
                                 failure="validation").to_dict()))  # fmt: skip
            return 0
        name, params = chosen
    else:
        import timm

        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(name).parameters())
    row = run_model(module, name, params)
    if row.model_args:  # the parameters of the model that ran
        import timm

        with torch.device("meta"):
            model = timm.create_model(name, **row.model_args)
        row.params = sum(p.numel() for p in model.parameters())
    print(json.dumps(row.to_dict()), flush=True)
    return 0


# ---------------------------------------------------------------- the run (parent process)


def _in_child(module: str, model: str | None, timeout_s: float) -> Row:
    command = [sys.executable, "-m", "benchmarks.timm_coverage", "--child", module]
    if model:
        command += ["--model", model]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(  # noqa: S603 - our own script
            command, capture_output=True, text=True, timeout=timeout_s,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Row(module, model or "", failure="timeout",
                   reason=f"no result in {timeout_s:.0f} s", seconds=timeout_s)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    try:
        return Row.from_dict(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError, TypeError):
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = f"exit {done.returncode}: {tail[-1] if tail else 'no output'}"
        return Row(module, model or "", failure="crash", reason=reason[:300],
                   seconds=time.perf_counter() - t0)  # fmt: skip


def _model_cell(row: Row) -> str:
    """The model's name, with the arguments it ran with (``deepseek_vit_412m (depth=2)``)."""
    given = ", ".join(f"{k}={v}" for k, v in row.model_args.items())
    return f"{row.model} ({given})" if given else row.model


def _cell(result: MethodResult | None) -> str:
    if result is None:
        return "-"
    if result.ok:
        return "ok"
    return "refused" if result.stage == "validation" else "failed"


def _fits(row: Row) -> str:
    known = [m.fits_half for m in row.methods.values() if m.fits_half is not None]
    return f"{sum(known)}/{len(known)}" if known else "-"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    head = ["module", "model", "params (M)", "size", "built", "blocks", *METHODS,
            "fits 1/2", "reason"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.module,
            _model_cell(r),
            f"{r.params / 1e6:.2f}" if r.params else "-",
            f"{r.size} ({r.size_note})" if r.size else "-",
            "yes" if r.built == "yes" else (f"no: {r.built}" if r.built else "-"),
            str(r.blocks) if r.blocks is not None else "-",
            *(_cell(r.methods.get(m)) for m in METHODS),
            _fits(r),
            (f"[{r.failure}] " if r.failure else "") + r.reason.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    covered = sum(r.covered for r in rows)
    share = 100.0 * covered / len(rows) if rows else 0.0
    kinds: dict[str, int] = {}
    for r in rows:
        if not r.covered:
            kinds[r.failure or "trial"] = kinds.get(r.failure or "trial", 0) + 1
    rest = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    return (
        f"{covered} of {len(rows)} architecture modules run all three methods with adaptive "
        f"checkpointing ({share:.0f} %); the others fail at: {rest}"
    )


def _progress(i: int, total: int, row: Row) -> str:
    methods = " ".join(f"{m}={_cell(row.methods.get(m))}" for m in METHODS)
    params = f"{row.params / 1e6:.2f}M" if row.params else "-"
    reason = f"  [{row.failure}] {row.reason}" if row.reason else ""
    return (
        f"[{i}/{total}] {row.module:<26} {_model_cell(row):<36} {params:>8} size={row.size or '-'} "
        f"blocks={row.blocks if row.blocks is not None else '-'} {methods} "
        f"fits={_fits(row)} {row.seconds:.0f}s{reason}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", help="comma-separated timm modules (default: all)")
    parser.add_argument("--out", type=Path, help="save the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="save the table as Markdown")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="keep the covered rows of --out (same timm, same model) and run only the others",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.model)

    import timm

    known = timm.list_modules()
    modules = args.modules.split(",") if args.modules else known
    unknown = [m for m in modules if m not in known]
    if unknown:
        print(f"unknown timm modules {unknown}; valid: {', '.join(known)}", file=sys.stderr)
        return 2
    cache = _load_cache()
    # the smallest models first: the most rows soonest (unknown sizes last)
    modules = sorted(modules, key=lambda m: (cache["models"].get(m) or [None, 1 << 62])[1])
    kept = _kept_rows(args.out, cache) if args.rerun and args.out else {}
    rows: list[Row] = []
    t0 = time.perf_counter()
    for i, module in enumerate(modules, 1):
        chosen = cache["models"].get(module)
        if module in kept:
            rows.append(kept[module])
            print(_progress(i, len(modules), kept[module]) + "  (kept)", flush=True)
            continue
        timeout = args.timeout + (0 if chosen else SELECT_TIMEOUT_S)
        row = _in_child(module, chosen[0] if chosen else None, timeout)
        if not chosen and row.model:
            cache["models"][module] = [row.model, row.params]
            RESULTS.mkdir(parents=True, exist_ok=True)
            MODELS_CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        rows.append(row)
        print(_progress(i, len(modules), row), flush=True)
        if args.out:  # after every row: an interrupted run resumes with --rerun
            _save(args.out, rows, time.perf_counter() - t0, timm.__version__)
    elapsed = time.perf_counter() - t0
    text = summary(rows)
    print(text)
    print(f"wall time {elapsed / 60:.1f} min", flush=True)
    if args.out:
        _save(args.out, rows, elapsed, timm.__version__)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            f"# timm coverage (timm {timm.__version__})\n\n{text}\n\n"
            f"Wall time {elapsed / 60:.1f} min on {_cpus()} CPU cores.\n\n{table(rows)}\n"
        )
    return 0


def _save(path: Path, rows: list[Row], elapsed: float, timm_version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"timm": timm_version, "wall_s": elapsed, "summary": summary(rows),
               "rows": [r.to_dict() for r in rows]}  # fmt: skip
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    partial.replace(path)


def _kept_rows(path: Path, cache: dict[str, Any]) -> dict[str, Row]:
    """The covered rows of an earlier run saved at ``path`` (same timm, same model)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("timm") != cache["timm"]:
        return {}
    rows = (Row.from_dict(r) for r in saved["rows"])
    return {
        r.module: r
        for r in rows
        if r.covered and r.model == (cache["models"].get(r.module) or [None])[0]
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
