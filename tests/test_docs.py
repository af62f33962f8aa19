"""The worked plug-in of docs/extending.md runs as written: its backbone, method, dataset
and energy meter validate in a grid and train in a trial (in subprocesses, so that its
registrations stay out of this test session's registries)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
ORCHESTRATE = str(Path(sys.executable).parent / "orchestrate")


def _block(language: str, first_line: str) -> str:
    """The fenced ``language`` block of the doc whose text starts with ``first_line``."""
    for body in re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"docs/extending.md has no {language} block starting {first_line!r}")


def _plugin(tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "my_lab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "vramsweep_ext.py").write_text(_block("python", "# my_lab/vramsweep_ext.py"))
    return dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


def test_the_documented_plugin_validates_in_the_documented_grid(tmp_path: Path) -> None:
    env = _plugin(tmp_path)
    grid = yaml.safe_load(_block("yaml", "plugins: [my_lab.vramsweep_ext]"))
    grid.update(name="doc", output=str(tmp_path / "out"), budget_mb=512, seeds=[0])
    grid["checkpointing"] = ["none", "adaptive"]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    done = subprocess.run(
        [ORCHESTRATE, "validate", str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "2 trials" in done.stdout and "labnet" in done.stdout and "norm_tune" in done.stdout
    assert not (tmp_path / "out").exists()  # validation writes nothing


TRIAL = """
import json
import my_lab.vramsweep_ext
from orchestrator.spec import TrainConfig, TrialSpec
from workers.energy import EnergyConfig
from workers.trial import run_trial

spec = TrialSpec(backbone="labnet", backbone_args={"model_args": {"width": 16}},
                 method="norm_tune", checkpointing="adaptive", dataset="checkers",
                 dataset_args={"image_size": 32, "images": 64}, budget_mb=512,
                 train=TrainConfig(epochs=1, batch_size=16, max_steps=3))
record = run_trial(spec, num_threads=1, energy=EnergyConfig(meter="wall_clock"))
print(json.dumps({k: getattr(record, k) for k in
      ("status", "error", "energy_source", "energy_j", "total_blocks", "params_trainable")}))
"""


def test_the_documented_plugin_trains_with_its_own_meter(tmp_path: Path) -> None:
    env = _plugin(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", TRIAL], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "ok", record["error"]
    assert record["energy_source"] == "wall_clock" and record["energy_j"] > 0
    assert record["total_blocks"] == 4  # labnet's blocks.0-3, found by structure
    # the four blocks' BatchNorm weights and biases (16 each) and the head (16 x 2 + 2)
    assert record["params_trainable"] == 4 * 2 * 16 + 16 * 2 + 2
