"""Foundation-model baselines on tiny random models written in the real on-disk formats.

Every model is loaded through the same code as a real checkpoint (a local folder as
the model id). The checks are independent computations: image-text similarity for
zero-shot, scikit-learn for the probe and k-NN, a full forward per class and
``generate`` for the VLMs, brute-force dominance for the Pareto front.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.grid import GridError, parse_grid
from orchestrator.records import RecordStore
from orchestrator.spec import TrainConfig, TrialSpec
from tests.conftest import TINY_GRID
from workers.baselines import BASELINES, BaselineContext, dinov2, prompts, tiny, vlm, zeroshot
from workers.cost import call_macs
from workers.data import ImageData, load_dataset
from workers.registry import RegistryError
from workers.trial import run_trial

SYNTH = {"num_classes": 4, "images_per_class": 24, "image_size": 16}
QUESTION = "What is in this image? Answer with its name."
# distinct first words, so that a first-token pre-filter has something to choose
ANIMALS = ("apple", "bus", "cat tree", "dog", "eel", "fox", "maple tree", "owl")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    words = [QUESTION, *ANIMALS, *(f"class {k}" for k in range(8))]
    return {
        "clip": tiny.write_open_clip(root / "clip"),
        "dino": tiny.write_dinov2(root / "dino"),
        "paligemma": tiny.write_vlm(root / "paligemma", "paligemma", words),
        "smolvlm": tiny.write_vlm(root / "smolvlm", "smolvlm", words),
    }


def _ctx(batch_size: int = 16) -> BaselineContext:
    return BaselineContext(
        dataset="synthetic",
        device=torch.device("cpu"),
        batch_size=batch_size,
        precision="fp32",
        autocast=torch.autocast("cpu", enabled=False),
        seed=0,
    )


def _spec(baseline: str, model: Path, args: dict[str, Any], **data_args: Any) -> TrialSpec:
    return TrialSpec(
        kind="baseline",
        backbone=f"local-dir:{model}",
        method="",
        dataset="synthetic",
        dataset_args=SYNTH | data_args,
        baseline=baseline,
        baseline_args=args,
        train=TrainConfig(eval_batch_size=16),
    )


def _blobs(n: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian clusters around random unit directions."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)))
    y = torch.arange(n) % classes
    return centres[y] * 4 + 0.5 * torch.randn(n, dim, generator=gen), y


# ---------------------------------------------------------------- loading and validation


def test_local_folders_load_their_saved_weights(models: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    clip = zeroshot.load(f"local-dir:{models['clip']}", torch.device("cpu"))[0]
    dino = dinov2.load(f"local-dir:{models['dino']}", 0)
    for model, file in [
        (clip, models["clip"] / "open_clip_model.safetensors"),
        (dino, models["dino"] / "model.safetensors"),
    ]:
        saved, state = load_file(str(file)), model.state_dict()
        assert set(saved) <= set(state)
        assert all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("baseline", ["zeroshot", "dinov2_linear", "dinov2_knn", "vlm_prompt"])
def test_a_missing_local_model_fails_validation_naming_it(baseline: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    where = re.escape(f"backbone '{missing}': no folder {missing}")
    with pytest.raises(RegistryError, match=where):
        BASELINES.resolve_args(baseline, {"backbone": str(missing)})
    grid = dict(TINY_GRID, baselines=[{"name": baseline, "backbone": f"local-dir:{missing}"}])
    with pytest.raises(GridError, match=r"baselines\[0\].*no folder"):
        parse_grid(grid, "tiny.yaml")


def test_a_folder_of_another_format_fails_validation(models: dict[str, Path]) -> None:
    with pytest.raises(
        RegistryError, match="none of .*open_clip_config.json.*not saved by open_clip"
    ):
        BASELINES.check_model("zeroshot", str(models["dino"]))
    with pytest.raises(RegistryError, match="name its model"):
        BASELINES.resolve_args("dinov2_knn", {"k": 3})


def test_hub_ids_need_the_cache_only_when_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Online, a hub id is left for the trial to download; offline, it must be in the
    cache (here an empty one, then one holding the repo's config)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    repo = "vramsweep-tests/tiny-vlm"
    BASELINES.check_model("vlm_prompt", repo)
    BASELINES.check_model("dinov2_knn", "vit_small_patch14_dinov2.lvd142m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RegistryError, match="not in the local Hugging Face cache.*hf download"):
        BASELINES.check_model("vlm_prompt", repo)
    with pytest.raises(RegistryError, match="timm/vit_small_patch14_dinov2.lvd142m"):
        BASELINES.check_model("dinov2_knn", "vit_small_patch14_dinov2.lvd142m")
    cached = tmp_path / "models--vramsweep-tests--tiny-vlm"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("abc123")
    (cached / "snapshots" / "abc123").mkdir(parents=True)
    (cached / "snapshots" / "abc123" / "config.json").write_text("{}")
    BASELINES.check_model("vlm_prompt", repo)


@pytest.mark.parametrize(
    ("baseline", "model", "message"),
    [
        ("zeroshot", "ViT-B-32/no_such_tag", "laion2b_s34b_b79k"),
        ("zeroshot", "ViT-Q-99/openai", "no architecture 'ViT-Q-99'"),
        ("dinov2_knn", "vit_nonexistent_dinov2", "timm has no model"),
        ("dinov2_knn", "vit_small_patch14_dinov2.no_tag", "lvd142m"),
        ("vlm_prompt", "paligemma", "ORG/NAME"),
    ],
)
def test_unknown_model_ids_fail_with_the_valid_ones(
    baseline: str, model: str, message: str
) -> None:
    with pytest.raises(RegistryError, match=message):
        BASELINES.check_model(baseline, model)


@pytest.mark.parametrize(
    ("baseline", "args", "message"),
    [
        ("dinov2_knn", {"k": 0}, "k must be >= 1"),
        ("dinov2_knn", {"temperature": 0}, "temperature must be > 0"),
        ("dinov2_linear", {"c_values": [1.0, -1.0]}, "c_values"),
        ("dinov2_linear", {"features": "mean"}, "features must be one of"),
        ("zeroshot", {"templates": "fancy"}, "templates must be"),
        ("vlm_prompt", {"score": "max"}, "score must be one of"),
        ("vlm_prompt", {"candidate_batch": 0}, "candidate_batch must be >= 1"),
    ],
)
def test_bad_arguments_are_named(baseline: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        BASELINES.make_config(baseline, args)


def test_grid_expansion_moves_the_model_id_to_the_spec(models: dict[str, Path]) -> None:
    from orchestrator.expansion import expand

    model = f"local-dir:{models['dino']}"
    grid = dict(TINY_GRID, baselines=[{"name": "dinov2_knn", "backbone": model, "k": 5}])
    baselines = [s for s in expand(parse_grid(grid)) if s.kind == "baseline"]
    assert [(s.baseline, s.backbone) for s in baselines] == [("dinov2_knn", model)]
    assert baselines[0].baseline_args == {
        "image_size": 224,
        "features": "cls",
        "k": 5,
        "temperature": 0.07,
    }


# ---------------------------------------------------------------- zero-shot


def test_zeroshot_classifies_by_image_text_similarity(models: dict[str, Path]) -> None:
    """The test's own similarity ranking, used as labels: rank 1 -> top-1 hit,
    rank 5 -> top-5 hit only, rank 6 -> neither."""
    import open_clip

    data = load_dataset("synthetic", {"num_classes": 8, "images_per_class": 5, "image_size": 16})
    name = f"local-dir:{models['clip']}"
    model = open_clip.create_model(name).eval()
    tokenize = open_clip.get_tokenizer(name)
    templates = open_clip.zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES  # synthetic's set
    with torch.no_grad():
        text = torch.stack(
            [
                F.normalize(
                    F.normalize(
                        model.encode_text(tokenize([t(c) for t in templates])), dim=-1
                    ).mean(0),
                    dim=0,
                )
                for c in data.classes
            ]
        )
        pixels = (data.test_x.float() / 255 - 0.5) / 0.25  # the folder's mean and std
        image = F.normalize(model.encode_image(pixels), dim=-1)
    ranking = (image @ text.T).argsort(dim=1, descending=True)
    for rank, expected in [(0, (1.0, 1.0)), (4, (0.0, 1.0)), (5, (0.0, 0.0))]:
        relabelled = dataclasses.replace(data, test_y=ranking[:, rank])
        result = BASELINES.build("zeroshot", {}, name, relabelled, _ctx(batch_size=7))
        assert (result.accuracy, result.top5_accuracy) == expected
    assert result.params_trainable == 0
    assert result.params_total == sum(p.numel() for p in model.parameters())
    assert result.macs > 0 and result.train_time_s > 0 and result.eval_time_s > 0


def test_template_sets() -> None:
    import open_clip

    assert prompts.templates("cifar100")[0]("maple tree") == "a photo of a maple tree."
    assert prompts.templates("dtd")[0]("banded") == "a photo of a banded texture."
    assert prompts.templates("svhn") == prompts.templates("default")
    simple = open_clip.zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES
    assert prompts.templates("default") == tuple(simple)
    assert len(prompts.templates("imagenet")) == 80


# ---------------------------------------------------------------- DINOv2 probes


def test_linear_probe_matches_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(240, classes=3, dim=8, seed=0)
    xt, yt = _blobs(120, classes=3, dim=8, seed=1)
    weight, bias = dinov2.fit_logistic(x, y, 3, c=0.5, max_iter=500)
    reference = LogisticRegression(C=0.5, tol=1e-8, max_iter=1000).fit(x.numpy(), y.numpy())
    assert np.allclose(weight.numpy(), reference.coef_, atol=2e-4)
    assert np.allclose(bias.numpy(), reference.intercept_, atol=2e-4)
    predicted = (xt @ weight.T + bias).argmax(1).numpy()
    assert (predicted == reference.predict(xt.numpy())).all()
    assert (predicted == yt.numpy()).mean() >= 0.98


def test_linear_probe_keeps_the_best_c_on_validation() -> None:
    x, y = _blobs(90, classes=3, dim=8, seed=2)
    xv, yv = _blobs(300, classes=3, dim=8, seed=3)
    x = x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))  # noisy
    config = dinov2.LinearProbeConfig(c_values=(1e-4, 0.05, 100.0), max_iter=100)
    c, accuracy, (weight, bias) = dinov2.select_c((x, y), (xv, yv), 3, config)
    each = {}
    for value in config.c_values:
        w, b = dinov2.fit_logistic(x, y, 3, value, config.max_iter)
        each[value] = float(((xv @ w.T + b).argmax(1) == yv).float().mean())
    assert accuracy == max(each.values()) and each[c] == accuracy
    assert accuracy >= 0.9


def test_knn_matches_scikit_learn() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    x, y = _blobs(300, classes=5, dim=16, seed=5)
    xq, yq = _blobs(200, classes=5, dim=16, seed=6)
    votes = dinov2.knn_votes(x, y, xq, 5, k=10, temperature=0.07)
    reference = KNeighborsClassifier(
        n_neighbors=10,
        metric="cosine",
        algorithm="brute",
        weights=lambda d: np.exp((1 - d) / 0.07),  # cosine distance = 1 - similarity
    ).fit(x.numpy(), y.numpy())
    assert (votes.argmax(1).numpy() == reference.predict(xq.numpy())).all()
    assert np.allclose(
        (votes / votes.sum(1, keepdim=True)).numpy(), reference.predict_proba(xq.numpy()), atol=1e-5
    )
    assert (votes.argmax(1) == yq).float().mean() >= 0.98


@pytest.mark.parametrize(
    ("baseline", "args"),
    [
        ("dinov2_linear", {"image_size": 0, "features": "cls_avg"}),  # native 28 px
        ("dinov2_knn", {"image_size": 42, "k": 5}),  # position embeddings resampled
    ],
)
def test_dinov2_trials_are_measured_records(
    baseline: str, args: dict[str, Any], models: dict[str, Path], synthetic_data: ImageData
) -> None:
    spec = _spec(baseline, models["dino"], args, val_fraction=0.25)
    rec = run_trial(spec, data=synthetic_data)
    assert rec.status == "ok", rec.error
    size = args["image_size"] or 28
    model = dinov2.load(spec.backbone, args["image_size"])
    backbone = sum(p.numel() for p in model.parameters())
    assert rec.macs == call_macs(lambda: model.forward_features(torch.zeros(1, 3, size, size)))
    probe = (2 * 32 + 1) * 4 if baseline == "dinov2_linear" else 0  # [cls, mean] 2 x 32, 4 classes
    assert (rec.params_total, rec.params_trainable) == (backbone + probe, probe)
    assert 0 <= rec.accuracy <= rec.top5_accuracy <= 1 and rec.val_accuracy is not None
    assert rec.train_time_s > 0 and rec.eval_time_s > 0 and rec.macs > 0
    assert rec.peak_mem_mb == pytest.approx(rec.accounted_peak_mb)
    assert rec.accounted_peak_mb > rec.params_mb + rec.batch_mb  # + the features
    assert rec.energy_source != "unavailable" and rec.energy_j > 0


def test_a_baseline_over_its_budget_is_recorded(
    models: dict[str, Path], synthetic_data: ImageData
) -> None:
    spec = dataclasses.replace(
        _spec("dinov2_knn", models["dino"], {"image_size": 0}), budget_mb=0.1
    )
    rec = run_trial(spec, data=synthetic_data)
    assert rec.status == "over_budget" and rec.peak_mem_mb > 0.1


# ---------------------------------------------------------------- prompted VLMs


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    """Each tiny VLM and its processor, loaded once (``vlm.load``, as a trial does)."""
    return {f: vlm.load(f"local-dir:{models[f]}", _ctx()) for f in ("paligemma", "smolvlm")}


def _prompter(
    loaded: dict[str, tuple[Any, Any]], family: str, classes: tuple[str, ...], **config: Any
) -> vlm.Prompter:
    model, processor = loaded[family]
    cfg = vlm.VlmPromptConfig(**config)
    return vlm.Prompter(model, processor, classes, QUESTION, cfg, (3, 16, 16))


@pytest.mark.parametrize("score", ["sum", "mean"])
@pytest.mark.parametrize("family", ["paligemma", "smolvlm"])
def test_cached_ranking_equals_a_forward_per_class(
    loaded: dict[str, tuple[Any, Any]], synthetic_data: ImageData, family: str, score: str
) -> None:
    prompter = _prompter(loaded, family, ANIMALS[:4], score=score, candidate_batch=5)
    images = list(synthetic_data.test_x[:3])
    prefix = prompter.prefix(images)
    cached = prompter.scores(prefix, prompter.shortlist(prefix))
    assert torch.allclose(cached, prompter.naive_scores(images), atol=1e-5)
    assert len(set(cached[0].tolist())) == 4  # the model tells the classes apart


@pytest.mark.parametrize("family", ["paligemma", "smolvlm"])
def test_prefilter_scores_only_the_likeliest_first_tokens(
    loaded: dict[str, tuple[Any, Any]], synthetic_data: ImageData, family: str
) -> None:
    prompter = _prompter(loaded, family, ANIMALS, prefilter_k=3)
    images = list(synthetic_data.test_x[:4])
    inputs = prompter.inputs(images)
    with torch.no_grad():
        last = prompter.model(**inputs).logits[:, -1].log_softmax(-1)
    first = prompter.tokenizer([" " + a for a in ANIMALS], add_special_tokens=False)
    first_lp = last[:, [ids[0] for ids in first["input_ids"]]]
    expected = first_lp.topk(3, dim=1).indices.sort(dim=1).values

    prefix = prompter.prefix(images)
    scores = prompter.scores(prefix, prompter.shortlist(prefix))
    kept = torch.isfinite(scores)
    assert kept.sum(1).tolist() == [3] * 4
    assert torch.equal(kept.nonzero()[:, 1].view(4, 3), expected)
    assert torch.allclose(scores[kept], prompter.naive_scores(images)[kept], atol=1e-5)


@pytest.mark.parametrize("family", ["paligemma", "smolvlm"])
def test_greedy_answers_equal_generate(
    loaded: dict[str, tuple[Any, Any]], synthetic_data: ImageData, family: str
) -> None:
    prompter = _prompter(loaded, family, ANIMALS, generation_tokens=4)
    images = list(synthetic_data.test_x[:3])
    answers = prompter.generate(prompter.prefix(images))
    inputs = prompter.inputs(images)
    with torch.no_grad():
        out = prompter.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    reference = prompter.tokenizer.batch_decode(
        out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert answers == [r.strip() for r in reference]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Maple tree.", 6),  # case, punctuation
        ("the owl", 7),  # article
        ("It is a cat tree!", 2),  # contained, whole words
        ("a maple tree and an owl", 6),  # the longest contained name wins
        ("dog fox", -1),  # two names of the same length: ambiguous
        ("dogfish", -1),  # not a whole word
        ("", -1),
    ],
)
def test_free_answers_are_normalised_and_matched(answer: str, expected: int) -> None:
    assert vlm.match(answer, [vlm.normalise(a) for a in ANIMALS]) == expected


@pytest.mark.parametrize("family", ["paligemma", "smolvlm"])
def test_vlm_baseline_accuracy_is_the_ranking_and_the_answers(
    models: dict[str, Path],
    loaded: dict[str, tuple[Any, Any]],
    synthetic_data: ImageData,
    family: str,
) -> None:
    data = dataclasses.replace(synthetic_data, classes=ANIMALS[:4])
    model_id = f"local-dir:{models[family]}"
    args = {"question": QUESTION, "generation_tokens": 3, "image_batch": 5}
    prompter = _prompter(loaded, family, data.classes, generation_tokens=3)
    images = list(data.test_x)
    best = prompter.naive_scores(images).argmax(1)
    answers = prompter.generate(prompter.prefix(images))
    matched = [vlm.match(a, prompter.names) for a in answers]
    relabelled = dataclasses.replace(data, test_y=best)
    result = BASELINES.build("vlm_prompt", args, model_id, relabelled, _ctx())
    assert result.accuracy == 1.0
    hits = sum(m == b for m, b in zip(matched, best.tolist(), strict=True))
    assert result.generation_accuracy == hits / len(best)
    assert result.params_trainable == 0 and result.train_time_s == 0.0
    assert result.work_bytes > 0 and result.batch_bytes > 0 and result.macs > 0


# ---------------------------------------------------------------- records and Pareto


def test_baseline_records_join_the_pareto_analysis(
    models: dict[str, Path], synthetic_data: ImageData, tmp_path: Path
) -> None:
    from orchestrator.pareto import _non_dominated_brute
    from orchestrator.report import analyse

    quick = TrainConfig(epochs=1, batch_size=16, max_steps=2, eval_batch_size=16)
    finetune = TrialSpec(backbone="vit_test", dataset="synthetic", dataset_args=SYNTH, train=quick)
    specs = [
        finetune,
        _spec("dinov2_knn", models["dino"], {"image_size": 0, "k": 5}),
        _spec("zeroshot", models["clip"], {}),
        _spec("vlm_prompt", models["smolvlm"], {"question": QUESTION, "generation_tokens": 2}),
    ]
    store = RecordStore(tmp_path / "out")
    for spec in specs:
        rec = run_trial(spec, data=synthetic_data)
        assert rec.status == "ok", rec.error
        # only the prompted VLM answers in free text
        assert (rec.generation_accuracy is not None) == (spec.baseline == "vlm_prompt")
        store.write(rec)
    analysis = analyse(store.collect())
    configs = analysis.configs.set_index("baseline")
    assert set(configs.index) == {"", "dinov2_knn", "zeroshot", "vlm_prompt"}
    assert "dinov2_knn" in configs.loc["dinov2_knn", "config"]
    front = analysis.fronts["accuracy_memory"]["synthetic"]
    assert len(front.table) == 4  # every configuration is a candidate
    values = front.table[["accuracy", "peak_mem_mb"]].to_numpy(dtype=float)
    expected = _non_dominated_brute(values, ["max", "min"])
    assert front.table["pareto"].tolist() == expected.tolist()
    assert not math.isnan(front.hypervolume)
