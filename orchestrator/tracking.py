"""The grid's ``tracking:`` section: experiment trackers fed by Ray Tune's own logger
callbacks (``orchestrator.tune_driver`` builds them).

Each tracker receives every trial's per-epoch results and its last result's figures
(``orchestrator.tune_metrics``), with the trial's readable label as the run name. Each
is an optional extra of the package (``pip install 'vramsweep[mlflow]'``); a grid that
names one whose package is missing fails validation.

Example (YAML)::

    tracking:
      tensorboard: {}                          # OUTPUT/_tune/<run>/<trial>/events.out.*
      mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment: smoke}
      wandb: {project: vramsweep, mode: auto}  # offline when there is no network
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"  # reached (or WANDB_BASE_URL's host) for wandb mode auto
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class TensorBoard:
    """Event files beside each trial's Tune results: ``tensorboard --logdir OUTPUT/_tune``."""


@dataclass(frozen=True)
class MLflow:
    """An MLflow run per trial: its parameters, per-epoch metrics and final figures."""

    # "" = sqlite:///OUTPUT/mlflow.db; a `file:` folder or a server URL also work offline
    tracking_uri: str = ""
    experiment: str = ""  # "" = the grid's name

    def __post_init__(self) -> None:
        if not isinstance(self.tracking_uri, str) or not isinstance(self.experiment, str):
            raise ValueError("tracking_uri and experiment must be strings")


WANDB_MODES = ("auto", "online", "offline")


@dataclass(frozen=True)
class WandB:
    """A Weights & Biases run per trial; offline, a run folder ``DIR/wandb/offline-run-*``
    that ``wandb sync`` uploads later."""

    project: str = ""  # "" = the grid's name
    # auto: online when an API key is set and the W&B server answers, else offline
    mode: str = "auto"
    dir: str = ""  # "" = the output folder (runs under OUTPUT/wandb/)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"mode must be one of {list(WANDB_MODES)}, got {self.mode!r}")
        if not isinstance(self.project, str) or not isinstance(self.dir, str):
            raise ValueError("project and dir must be strings")


@dataclass(frozen=True)
class Tracker:
    """A registered tracker: its section's fields, the module it needs and the extra of
    this package that installs it."""

    config: type
    module: str
    extra: str

    def missing(self) -> str:
        """Why the tracker cannot run here ("" when it can)."""
        if importlib.util.find_spec(self.module) is None:
            return f"needs {self.module}: pip install 'vramsweep[{self.extra}]'"
        return ""


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker(TensorBoard, "tensorboardX", "tensorboard"),
    "mlflow": Tracker(MLflow, "mlflow", "mlflow"),
    "wandb": Tracker(WandB, "wandb", "wandb"),
}


def mlflow_uri(config: MLflow, output_folder: str) -> str:
    """The tracking URI: the grid's, else a SQLite file in the (local) output folder."""
    if config.tracking_uri:
        return config.tracking_uri
    if "://" in output_folder:
        raise ValueError(
            f"tracking.mlflow.tracking_uri is needed: the output {output_folder} is no "
            "local folder for the default sqlite:///OUTPUT/mlflow.db"
        )
    return f"sqlite:///{Path(output_folder).resolve() / 'mlflow.db'}"


def mlflow_environment(uri: str) -> dict[str, str]:
    """Environment MLflow needs for ``uri``: MLflow 3 refuses a ``file:`` store unless
    told it is wanted (it is kept for reading, and for offline use without SQLite)."""
    scheme = urlparse(uri).scheme
    return {"MLFLOW_ALLOW_FILE_STORE": "true"} if scheme in ("", "file") else {}


def wandb_mode(config: WandB, reachable: bool | None = None) -> str:
    """online or offline. ``auto`` is online only when an API key is configured and the
    W&B server accepts a connection (``reachable``: the probe's answer, for tests)."""
    if config.mode != "auto":
        return config.mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline"
    if not _wandb_key_configured():
        return "offline"
    if reachable is None:
        reachable = _server_answers()
    return "online" if reachable else "offline"


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _server_answers() -> bool:
    url = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}")
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or WANDB_HOST, port), PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
