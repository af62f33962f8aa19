"""The deployment recipes in deploy/: they parse, agree with each other and with the
repository (image, entry point, grid, resources, token auth), the cluster-launcher YAML
passes Ray's own schema, and the SLURM script really starts one Ray head and N-1 workers
and runs the sweep against the head (SLURM, Ray and orchestrate faked by stubs on PATH).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "Dockerfile"
SBATCH = DEPLOY / "slurm" / "vramsweep.sbatch"
README = DEPLOY / "README.md"


def _docs(path: Path) -> list[dict[str, Any]]:
    """Every YAML document of ``path`` (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _lock() -> dict[str, str]:
    """requirements.lock as name -> version."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def _readme_image() -> str:
    """The image tag that deploy/README.md builds (`docker build ... -t IMAGE`)."""
    tags = set(re.findall(r"docker build\b[^\n]*?\s-t\s+(\S+)", README.read_text()))
    assert len(tags) == 1, f"deploy/README.md should build exactly one image tag, found {tags}"
    return tags.pop()


def _images(node: Any) -> list[str]:
    """Every value of an ``image`` key anywhere in a parsed manifest."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["template"]["spec"]["containers"]


def _cluster_spec() -> dict[str, Any]:
    return _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]


def _rayjob() -> dict[str, Any]:
    return _one(KUBERAY / "rayjob.yaml", "RayJob")


def _entrypoint_command(entrypoint: str) -> list[str]:
    """The `orchestrate ...` command of a shell entrypoint `cd DIR && orchestrate ...`."""
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    runs = [c for c in commands if c and c[0] == "orchestrate"]
    assert len(runs) == 1, f"entrypoint should run orchestrate once: {entrypoint!r}"
    return runs[0]


# ---------------------------------------------------------------- KubeRay


def test_kuberay_manifests_parse_with_the_right_kinds() -> None:
    kinds = {
        "raycluster.yaml": ("ray.io/v1", "RayCluster"),
        "rayjob.yaml": ("ray.io/v1", "RayJob"),
        "results-pvc.yaml": ("v1", "PersistentVolumeClaim"),
    }
    for name, (api, kind) in kinds.items():
        docs = _docs(KUBERAY / name)
        assert [(d["apiVersion"], d["kind"]) for d in docs] == [(api, kind)], name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", docs[0]["metadata"]["name"])


def test_rayjob_runs_on_the_raycluster_spec() -> None:
    assert _rayjob()["spec"]["rayClusterSpec"] == _cluster_spec()


def test_every_image_is_the_one_the_readme_builds() -> None:
    image = _readme_image()
    manifests = [_docs(KUBERAY / "raycluster.yaml"), _docs(KUBERAY / "rayjob.yaml")]
    images = [i for docs in manifests for i in _images(docs)]
    assert len(images) == 4  # head + worker, in each manifest
    assert set(images) == {image}
    launcher = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert launcher["docker"]["image"] == image
    assert f"-t {image}" in DOCKERFILE.read_text()  # the build command in its header


def test_ray_version_is_the_locked_one() -> None:
    assert _cluster_spec()["rayVersion"] == _lock()["ray"]


def test_head_has_no_gpu_and_the_worker_group_has_gpu_limits() -> None:
    spec = _cluster_spec()
    head = spec["headGroupSpec"]
    for container in _containers(head):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    ports = {p["containerPort"] for p in _containers(head)[0]["ports"]}
    assert {6379, 8265, 10001} <= ports
    groups = spec["workerGroupSpecs"]
    assert groups, "no worker group"
    for group in [head, *groups]:  # KubeRay's CRD types rayStartParams as strings
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a string"
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = _containers(group)
        limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        # Kubernetes refuses an extended resource whose request differs from its limit.
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


def test_a_gpu_worker_can_host_a_trial_of_the_rayjob_grid() -> None:
    """The same check `orchestrate run` makes before it starts (tune_driver.check_resources)."""
    command = _entrypoint_command(_rayjob()["spec"]["entrypoint"])
    grid = yaml.safe_load((REPO / command[2]).read_text())
    resources = grid.get("resources") or {}
    cpus_per_trial = resources.get("cpus_per_trial", 1)
    gpus_per_trial = resources.get("gpus_per_trial", 0)
    assert gpus_per_trial > 0, "the KubeRay job runs a GPU grid"
    fits = []
    for group in _cluster_spec()["workerGroupSpecs"]:
        limits = _containers(group)[0]["resources"]["limits"]
        fits.append(
            _cpus(limits["cpu"]) >= cpus_per_trial
            and int(limits["nvidia.com/gpu"]) >= gpus_per_trial
        )
    assert any(fits)


def test_rayjob_entrypoint_runs_a_repository_grid_on_its_own_cluster() -> None:
    spec = _rayjob()["spec"]
    command = _entrypoint_command(spec["entrypoint"])
    assert command[:2] == ["orchestrate", "run"]
    grid_path = REPO / command[2]
    assert grid_path.is_file(), f"{command[2]} is not a grid of the repository"
    assert command[command.index("--address") + 1] == "auto"
    # The entrypoint runs from the image's WORKDIR, where grid/ is copied.
    cd = [shlex.split(p) for p in spec["entrypoint"].split("&&") if p.split()[0] == "cd"]
    assert cd == [["cd", _final_stage().workdir]]
    # A relative output lands on the shared volume (/app/results -> /results), a URI anywhere.
    output = yaml.safe_load(grid_path.read_text())["output"]
    assert "://" in output or output.startswith("results/")
    assert spec["shutdownAfterJobFinishes"] is True


def test_results_volume_and_auth_token_secret() -> None:
    claim = _one(KUBERAY / "results-pvc.yaml", "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    spec = _cluster_spec()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in _containers(group)[0]["volumeMounts"]}
        assert claims[mounts["/results"]] == claim["metadata"]["name"]
        # The image's user is uid 1000; fsGroup makes the volume writable for it.
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["fsGroup"] == 1000
    auth = spec["authOptions"]
    assert auth["mode"] == "token"
    # The README creates the Secret that the manifests name, with the key KubeRay reads.
    created = re.findall(
        r"kubectl create secret generic (\S+) --from-literal=auth_token=", README.read_text()
    )
    assert created and set(created) == {auth["secretName"]}


# ---------------------------------------------------------------- Ray cluster launcher


def _launcher() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def test_cluster_launcher_yaml_validates_against_rays_schema() -> None:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _launcher()
    jsonschema.validate(config, schema)
    bad = dict(config, docker=dict(config["docker"], imagee="typo"))
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject what is wrong
        jsonschema.validate(bad, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's checks beyond the schema


def test_cluster_launcher_starts_a_head_and_workers_that_join_it_with_a_token() -> None:
    config = _launcher()
    head = " ; ".join(config["head_start_ray_commands"])
    workers = " ; ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head
    port = re.search(r"--port[= ](\d+)", head).group(1)
    assert f"ray start --address=$RAY_HEAD_IP:{port}" in workers
    assert "--head" not in workers
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    for name, node in nodes.items():
        if name != config["head_node_type"]:
            assert node["min_workers"] <= node["max_workers"] <= config["max_workers"]
            # orchestrate refuses to wait for GPUs that are not there yet: a static pool.
            assert node["min_workers"] == node["max_workers"] > 0
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword, leading --flags and the rest of the line."""

    keyword: str
    flags: dict[str, str]
    args: str


@dataclass
class Stage:
    """A FROM stage: its base image (ARG defaults substituted), name and instructions."""

    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    @property
    def workdir(self) -> str:
        return self.all("WORKDIR")[-1].args


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(text: str) -> list[Stage]:
    """A small Dockerfile parser: continuation lines, comments, global ARGs, stages."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name] = default.strip('"')
        elif keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(_substitute(parts[0], global_args), name))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append(Instruction(keyword, flags, rest))
    return stages


def _stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _final_stage() -> Stage:
    return _stages()[-1]


def test_dockerfile_parser_reads_stages_flags_and_continuations() -> None:
    stages = parse_dockerfile(
        "ARG V=1.2\nFROM img:${V}-devel AS b\nRUN a \\\n  # note\n  && b\n"
        "FROM img:$V-runtime\nCOPY --from=b --chown=u:u /x /y\n"
    )
    assert [(s.image, s.name) for s in stages] == [("img:1.2-devel", "b"), ("img:1.2-runtime", "")]
    assert stages[0].instructions[0].args == "a  && b"
    copy = stages[1].instructions[0]
    assert copy.flags == {"from": "b", "chown": "u:u"} and copy.args == "/x /y"


def test_dockerfile_builds_with_nvcc_and_runs_on_the_cuda_runtime_of_the_locked_torch() -> None:
    build, final = _stages()[0], _final_stage()
    assert len(_stages()) == 2
    pattern = r"nvidia/cuda:(\d+\.\d+)\.\d+-{}-ubuntu[\d.]+"
    devel = re.fullmatch(pattern.format("devel"), build.image)
    runtime = re.fullmatch(pattern.format("runtime"), final.image)
    assert devel and runtime, (build.image, final.image)
    # The extensions must match the CUDA that the locked torch wheel was built for.
    locked_cuda = ".".join(_lock()["nvidia-cuda-runtime"].split(".")[:2])
    assert devel[1] == runtime[1] == locked_cuda


def _run_commands(stage: Stage) -> list[str]:
    return [i.args for i in stage.all("RUN")]


def test_dockerfile_compiles_mamba_ssm_and_causal_conv1d_against_the_locked_torch() -> None:
    build = _stages()[0]
    env = " ".join(i.args for i in build.all("ENV"))
    for name in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "MAMBA_FORCE_BUILD"):
        assert re.search(rf"\b{name}=", env), f"{name} is not set in the build stage"
    runs = _run_commands(build)
    torch_step = next(i for i, r in enumerate(runs) if "pip install" in r and "torch" in r)
    assert "-c requirements.lock" in runs[torch_step]
    wheel_step = next(i for i, r in enumerate(runs) if "pip wheel" in r)
    assert torch_step < wheel_step
    assert "--no-build-isolation" in runs[wheel_step]
    assert "mamba-ssm" in runs[wheel_step] and "causal-conv1d" in runs[wheel_step]


def test_dockerfile_installs_the_locked_set_with_the_gpu_extra() -> None:
    final, build = _final_stage(), _stages()[0]
    steps = final.instructions
    lock_copy = next(
        i for i, s in enumerate(steps) if s.keyword == "COPY" and "requirements.lock" in s.args
    )
    installs = [i for i, s in enumerate(steps) if s.keyword == "RUN" and "pip install" in s.args]
    assert installs and lock_copy < installs[0]
    for i in installs:
        assert "-c requirements.lock" in steps[i].args
    assert any(".[gpu]" in shlex.split(steps[i].args) for i in installs)
    # A build argument before them would re-run the installs whenever it changes (GIT_SHA).
    assert not [s.args for s in steps[: installs[-1]] if s.keyword == "ARG"]
    # The compiled wheels come from the build stage (copied or bind-mounted).
    from_build = [s for s in steps if s.flags.get("from") == build.name] + [
        s for s in steps if f"from={build.name}," in s.flags.get("mount", "")
    ]
    assert from_build and all("/wheels" in (s.args + s.flags.get("mount", "")) for s in from_build)


def test_dockerfile_copies_only_existing_files_the_build_context_keeps() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].strip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # an allow-list: .venv and results/ never reach the daemon
    for stage in _stages():
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in shlex.split(copy.args)[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source.split("/")[0] in kept, f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_runs_orchestrate_as_a_non_root_user_from_the_grid_folder() -> None:
    final = _final_stage()
    user = final.all("USER")[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert any(re.search(rf"useradd\b.*\b{user}\b", r) for r in _run_commands(final))
    # No ENTRYPOINT: the cluster launcher starts `docker run IMAGE bash`, KubeRay its own
    # command; either would become arguments of an ENTRYPOINT.
    assert not final.all("ENTRYPOINT")
    cmd = json.loads(final.all("CMD")[-1].args)
    assert cmd[0] == "orchestrate"
    assert (REPO / cmd[-1]).is_file()  # the grid it runs, relative to WORKDIR /app
    assert any(c.args.split() == ["grid", "./grid"] for c in final.all("COPY"))
    assert any(f"ln -s /results {final.workdir}/results" in r for r in _run_commands(final))


# ---------------------------------------------------------------- SLURM


STUB_COMMON = """
import json, os, sys

def log(**entry):
    entry.update(pid=os.getpid(), node=os.environ.get("STUB_NODE", ""),
                 auth_mode=os.environ.get("RAY_AUTH_MODE"),
                 token=os.environ.get("RAY_AUTH_TOKEN"))
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")
"""

STUBS = {
    # srun [options] COMMAND...: runs COMMAND "on" the node given by -w
    "srun": """
args = sys.argv[1:]
log(cmd="srun", argv=args)
node = ""
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag == "-w":
        node = args.pop(0)
os.environ["STUB_NODE"] = node
os.execvp(args[0], args)
""",
    "scontrol": """
log(cmd="scontrol", argv=sys.argv[1:])
assert sys.argv[1:] == ["show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], sys.argv
print("\\n".join(os.environ["STUB_NODES"].split(",")))
""",
    # node nK has the addresses fe80::K (IPv6 first, as on many clusters) and 127.0.0.K
    "hostname": """
k = os.environ["STUB_NODE"].lstrip("n")
print(f"fe80::{k} 127.0.0.{k}")
""",
    # `ray start --head` listens on its --port (the GCS); every `--block` start stays up
    # until it is stopped, letting go of the script's output pipes.
    "ray": """
fails = os.environ.get("STUB_HEAD_FAILS") == "1" and "--head" in sys.argv
log(cmd="ray", argv=sys.argv[1:], failed=fails)
if fails:
    sys.exit(1)
if "--block" in sys.argv:
    import signal, socket
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if "--head" in sys.argv:
        opts = dict(a[2:].split("=", 1) for a in sys.argv if a.startswith("--") and "=" in a)
        gcs = socket.create_server((opts["node-ip-address"], int(opts["port"])))
    signal.pause()
""",
    "orchestrate": """
grid = sys.argv[2]
log(cmd="orchestrate", argv=sys.argv[1:], cwd=os.getcwd(), grid_text=open(grid).read())
sys.exit(int(os.environ.get("STUB_ORCHESTRATE_RC", "0")))
""",
}

# The `ray` Python module the script's wait loop imports: a node is alive once its
# `ray start` stub has run; connecting fails until the head has started.
FAKE_RAY_MODULE = """
import json, os

_connected = False

def _starts():
    with open(os.environ["STUB_LOG"]) as f:
        entries = [json.loads(line) for line in f]
    return [
        e for e in entries if e["cmd"] == "ray" and e["argv"][0] == "start" and not e["failed"]
    ]

def is_initialized():
    return _connected

def init(address=None, **kwargs):
    global _connected
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps({"cmd": "ray.init", "address": address}) + "\\n")
    if not any("--head" in e["argv"] for e in _starts()):
        raise ConnectionError("no GCS at " + str(address))
    _connected = True

def nodes():
    return [{"Alive": True} for _ in _starts()]

def shutdown():
    global _connected
    _connected = False
"""


@dataclass
class SlurmRun:
    """The outcome of one stubbed run of the sbatch script."""

    proc: subprocess.CompletedProcess[str]
    log: list[dict[str, Any]]
    home: Path
    port: int  # the head's GCS port (RAY_PORT)

    @property
    def head_address(self) -> str:
        return f"127.0.0.1:{self.port}"  # node n1's IPv4 address, not its IPv6 one

    def calls(self, cmd: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["cmd"] == cmd]

    def ray_starts(self) -> list[dict[str, Any]]:
        return [e for e in self.calls("ray") if e["argv"][0] == "start"]


@pytest.fixture
def run_sbatch(tmp_path: Path) -> Iterator[Callable[..., SlurmRun]]:
    """Run the sbatch script on N fake nodes; returns a function (nodes, **env) -> SlurmRun."""
    stubs, fake_py, home, submit = (tmp_path / d for d in ("bin", "py", "home", "submit"))
    for d in (stubs, fake_py / "ray", home, submit / "grid"):
        d.mkdir(parents=True)
    for name, body in STUBS.items():
        path = stubs / name
        path.write_text(f"#!{sys.executable} -S\n{STUB_COMMON}\n{body}")  # -S: fast start
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    python3 = stubs / "python3"  # the real interpreter, seeing the fake ray module
    python3.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python3.chmod(0o755)
    (fake_py / "ray" / "__init__.py").write_text(FAKE_RAY_MODULE)
    (submit / "grid" / "paper.yaml").write_text((REPO / "grid" / "paper.yaml").read_text())

    def run(nodes: int, **extra: str) -> SlurmRun:
        log = tmp_path / "calls.jsonl"
        log.write_text("")
        names = [f"n{k}" for k in range(1, nodes + 1)]
        with socket.socket() as probe:  # a free port for the head stub to listen on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {
            "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(home),
            "TMPDIR": str(tmp_path),
            "PYTHONPATH": str(fake_py),
            "STUB_LOG": str(log),
            "STUB_NODES": ",".join(names),
            "SLURM_SUBMIT_DIR": str(submit),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": f"n[1-{nodes}]",
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_CPUS_PER_TASK": "8",
            "SLURM_GPUS_PER_TASK": "a100:2",
            "RAY_PORT": str(port),
            "WAIT_TIMEOUT_S": "20",
            **extra,
        }
        proc = subprocess.run(
            ["bash", str(SBATCH)], env=env, cwd=submit, capture_output=True, text=True, timeout=60
        )
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        started.extend(e["pid"] for e in entries if e["cmd"] == "ray")
        return SlurmRun(proc, entries, home, port)

    started: list[int] = []
    yield run
    for pid in started:  # a script whose cleanup failed leaves its `sleep` stubs behind
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sbatch_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("nodes", [1, 3])
def test_sbatch_starts_one_head_and_n_minus_1_workers_then_runs_the_grid(
    run_sbatch: Callable[..., SlurmRun], nodes: int
) -> None:
    run = run_sbatch(nodes)
    assert run.proc.returncode == 0, run.proc.stderr
    head_address = run.head_address

    starts = run.ray_starts()
    heads = [s for s in starts if "--head" in s["argv"]]
    workers = [s for s in starts if "--head" not in s["argv"]]
    assert len(heads) == 1 and heads[0]["node"] == "n1"
    assert {"--node-ip-address=127.0.0.1", f"--port={run.port}"} <= set(heads[0]["argv"])
    # one worker on every other node (started in the background: any order)
    assert sorted(w["node"] for w in workers) == [f"n{k}" for k in range(2, nodes + 1)]
    for w in workers:
        assert f"--address={head_address}" in w["argv"]
    for s in starts:  # the node's resources from the SLURM variables ("a100:2" -> 2)
        assert {"--num-cpus=8", "--num-gpus=2", "--block"} <= set(s["argv"])
    assert run.log.index(heads[0]) < min((run.log.index(w) for w in workers), default=1 << 30)

    (sweep,) = run.calls("orchestrate")
    assert sweep["argv"] == ["run", "grid/paper.yaml", "--address", head_address]
    assert run.log.index(sweep) > max(run.log.index(s) for s in starts)  # all nodes joined
    assert Path(sweep["cwd"]).name == "submit"
    assert {e["address"] for e in run.calls("ray.init")} == {head_address}

    # One token for every node and the driver, in token mode, saved for the dashboard.
    tokens = {(e["auth_mode"], e["token"]) for e in [*starts, sweep]}
    assert len(tokens) == 1
    ((mode, token),) = tokens
    assert mode == "token" and re.fullmatch(r"[0-9a-f]{64}", token)
    token_file = run.home / ".ray" / "vramsweep-4242.token"
    assert token_file.read_text() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    # Every `ray start --block` step is stopped when the job script ends.
    assert not [s["pid"] for s in starts if _alive(s["pid"])]


def test_sbatch_output_replaces_the_grids_output_in_a_copy(
    run_sbatch: Callable[..., SlurmRun],
) -> None:
    output = "/shared/vram sweep/paper"
    run = run_sbatch(2, OUTPUT=output)
    assert run.proc.returncode == 0, run.proc.stderr
    (sweep,) = run.calls("orchestrate")
    grid_file = sweep["argv"][1]
    assert grid_file != "grid/paper.yaml"
    seen = yaml.safe_load(sweep["grid_text"])
    original = yaml.safe_load((REPO / "grid" / "paper.yaml").read_text())
    assert seen == {**original, "output": output}
    assert not Path(grid_file).exists()  # the copy is removed at the end


def test_sbatch_returns_the_sweeps_failure_and_still_stops_ray(
    run_sbatch: Callable[..., SlurmRun],
) -> None:
    run = run_sbatch(2, STUB_ORCHESTRATE_RC="1")
    assert run.proc.returncode == 1
    assert len(run.ray_starts()) == 2
    assert not [s["pid"] for s in run.ray_starts() if _alive(s["pid"])]


def test_sbatch_does_not_run_the_sweep_when_the_head_never_comes_up(
    run_sbatch: Callable[..., SlurmRun],
) -> None:
    run = run_sbatch(2, STUB_HEAD_FAILS="1", WAIT_TIMEOUT_S="1")
    assert run.proc.returncode != 0
    assert f"no Ray head listening at {run.head_address}" in run.proc.stderr
    assert not run.calls("orchestrate")
    assert len(run.ray_starts()) == 1  # no worker was started either


def test_sbatch_refuses_a_missing_grid_before_touching_slurm(
    run_sbatch: Callable[..., SlurmRun],
) -> None:
    run = run_sbatch(2, GRID="grid/missing.yaml")
    assert run.proc.returncode == 2
    assert "grid/missing.yaml" in run.proc.stderr
    assert not run.calls("srun") and not run.calls("scontrol")


# ---------------------------------------------------------------- README


def test_readme_covers_every_recipe_and_the_operations() -> None:
    text = README.read_text()
    for path in (
        "deploy/Dockerfile",
        "deploy/kuberay/raycluster.yaml",
        "deploy/kuberay/rayjob.yaml",
        "deploy/kuberay/results-pvc.yaml",
        "deploy/cluster.yaml",
        "deploy/slurm/vramsweep.sbatch",
    ):
        assert path in text, f"deploy/README.md does not mention {path}"
        assert (REPO / path).is_file()
    for topic in ("8265", "ray get-auth-token", "--resume", "gpus_per_trial", "/results"):
        assert topic in text, f"deploy/README.md does not cover {topic}"
