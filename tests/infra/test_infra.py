"""infra/: the cluster launcher config, KubeRay manifests and the Dockerfile parse and agree with the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _score_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in sub.choices["score"]._actions for o in a.option_strings}


def _check_score_command(cmd: str) -> None:
    """`python jobs/score.py ARGS` must parse as `diffin score ARGS`, after the word
    splitting and brace expansion of `bash -c`, which is how KubeRay runs an entrypoint."""
    out = subprocess.run(["bash", "-c", f'printf "%s\\0" {cmd}'], capture_output=True, check=True)
    words = out.stdout.decode().split("\0")[:-1]
    assert words[:2] == ["python", "jobs/score.py"], words
    flags = {w.split("=")[0] for w in words[2:] if w.startswith("--")}
    assert flags <= _score_flags(), flags - _score_flags()
    build_parser().parse_args(["score", *words[2:]])
    assert (REPO / "jobs" / "score.py").exists()


def test_all_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


def test_cluster_launcher_config_matches_rays_schema():
    """What `ray up` checks first (ray/autoscaler/_private/util.py validate_config)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load("cluster.yaml"), schema)


def test_cluster_launcher_config():
    c = _load("cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in c
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    # the launcher attaches a profile to the head only: scoring workers reach S3 (review)
    assert all(t["node_config"]["IamInstanceProfile"]["Arn"] for t in gpu)
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in types.values())
    head = " ".join(c["head_start_ray_commands"])
    assert f"--port={PORTS['gcs']}" in head and f"--dashboard-port={PORTS['dashboard']}" in head
    assert f"--ray-client-server-port={PORTS['client']}" in head
    assert "--dashboard-host=127.0.0.1" in head  # nothing listens beyond loopback by default
    worker = " ".join(c["worker_start_ray_commands"])
    assert f":{PORTS['gcs']}" in worker


def _pod_ports(template: dict) -> dict[str, int]:
    (container,) = template["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests(name):
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert doc["kind"] in ("RayCluster", "RayJob")
    head = spec["headGroupSpec"]
    ports = _pod_ports(head["template"])
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    assert head["rayStartParams"]["dashboard-port"] == str(PORTS["dashboard"])
    # Review: the Jobs API and GCS took unauthenticated code from any pod, and no pod had
    # S3 credentials; the service account is where IRSA / Pod Identity attach them.
    assert spec["authOptions"] == {"mode": "token"}, name
    for group in [head, *spec["workerGroupSpecs"]]:
        assert group["template"]["spec"]["serviceAccountName"] == "diffin", name
        env = group["template"]["spec"]["containers"][0].get("env", [])
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & {e["name"] for e in env}
    for group in spec["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
        if int(group["rayStartParams"]["num-gpus"]):  # tainted GPU nodes (review: rayjob's)
            tolerated = group["template"]["spec"].get("tolerations", [])
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                tolerated
            ), name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if doc["kind"] == "RayJob":
        _check_score_command(doc["spec"]["entrypoint"])
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == "/opt/diffin"  # the image's WORKDIR
    import ray

    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert spec.get("rayVersion", doc["spec"].get("rayVersion", "")).startswith(major_minor)


def test_dockerfile_installs_the_package_with_pinned_torch():
    text = (INFRA / "Dockerfile").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2
    for pin in pins:
        assert pin in text, pin
    assert re.search(r"^RUN pip install (-c constraints\.txt )?\.", text, re.M)
    # Ray pinned to the version every KubeRay manifest declares (was: unpinned, review)
    (ray_pin,) = re.findall(r'"ray\[default\]==([^"]+)"', text)
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        doc = _load(name)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec.get("rayVersion", doc["spec"].get("rayVersion")) == ray_pin, name
    # and the package itself, so a driver speaks the cluster's Ray (review)
    assert f"ray[default]=={ray_pin}" in deps
    assert re.search(r"^WORKDIR /opt/diffin$", text, re.M)
    # Ray refuses a node whose Python differs in the patch release: the base is pinned
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-", text, re.M)
    # KubeRay's default probes run wget; the cluster launcher needs rsync, ssh and boto3
    for tool in ("wget", "rsync", "openssh-client"):
        assert re.search(rf"apt-get install[^\n]*(\n\s+[^\n]*)*\b{tool}\b", text), tool
    assert "boto3" in text
    # S3 manifests' train_data is `pipe:aws s3 cp ...`: open_clip_train in the image runs it
    assert re.search(r'^RUN pip install (-c constraints\.txt )?\.[^\n]*"awscli', text, re.M)
    assert re.search(r"^FROM ", text, re.M)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == set(PORTS.values())
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        for s in src.split():
            assert (REPO / s).exists(), s


def test_operations_guide_documents_the_ports():
    text = (REPO / "docs" / "operations.md").read_text()
    for port in PORTS.values():
        assert str(port) in text
    for flag in ("--max-attempts", "--address"):
        assert flag in text and flag in _score_flags()


def test_a_plain_install_carries_the_small_model_configs(tmp_path):
    """Before: the wheel (`pip install .`, the cluster image) had no JSON configs, so
    diffin-tiny and diffin-small were unknown models outside a checkout."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # the table form of `license` stops building after 2027-02-18 (setuptools' warning)
    assert "project.license" not in out.stderr, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("diffin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.name for p in (REPO / "pipeline" / "model" / "configs").glob("*.json")}
    assert configs and {f"pipeline/model/configs/{c}" for c in configs} <= names


def test_nothing_pins_the_job_driver_to_one_thread():
    """Walkthrough: OMP_NUM_THREADS=1, meant for the scoring actors (Ray sets it in each to
    its CPUs anyway), reached the job's driver too, where `diffin train` and the directions
    stage ran on one thread."""
    runtime = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    job = yaml.safe_load(_load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for where, env in (("runtime_env.yaml", runtime), ("rayjob.yaml", job)):
        assert not {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} & set(env.get("env_vars", {})), where
    # The KubeRay head may say how many threads its pod has (torch would count the node's
    # cores, not the pod's CPU limit: review), but no fewer.
    cluster = _load("kuberay/raycluster.yaml")["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            threads = {e["name"]: e.get("value") for e in c.get("env", [])}.get("OMP_NUM_THREADS")
            assert threads is None or threads == c["resources"]["limits"]["cpu"], c["name"]
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert not re.search(r"^ENV[^#]*(\n\s+[^#\n]*)*OMP_NUM_THREADS", dockerfile, re.M)
    assert "OMP_NUM_THREADS" not in (REPO / "infra" / "cluster.yaml").read_text()


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and ";" not in line and " " not in line, line
        pins[canonicalize_name(name)] = version
    return pins


# torch's CUDA libraries follow the build the index gives (CPU, cu128, ...): not locked
TORCH_BUILD = re.compile(r"^(nvidia-|cuda-|triton$)")


def test_constraints_lock_everything_the_package_needs_at_the_tested_versions():
    """Review: only torch and Ray were pinned, so an image built on another day (or CI on a
    fresh clone) resolved other versions of the other 150 packages than `make test` passed
    with. Every package diffin[dev] needs, transitively, is in constraints.txt at the version
    installed here (CI installs with it: a stale lock fails here; `make lock`)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]
    seen: set = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen or TORCH_BUILD.match(name):
            continue
        seen.add((name, frozenset(req.extras)))
        assert name in pins, f"{name} is not in constraints.txt: run `make lock`"
        installed = metadata.version(req.name).split("+")[0]  # torch's +cpu / +cu128
        assert installed == pins[name], f"{name} {installed} installed, {pins[name]} locked"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
        for text in metadata.requires(req.name) or []:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    assert len({n for n, _ in seen}) > 50  # the closure, not the direct dependencies alone
    assert not [n for n in pins if TORCH_BUILD.match(n)]
    # and both installs use it
    make = (REPO / "Makefile").read_text()
    assert re.search(r"pip install -q -c constraints\.txt -e '\.\[dev\]'", make)
    docker = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install -c constraints\.txt \.", docker, re.M)
    assert re.search(r"^COPY [^\n]*\bconstraints\.txt\b", docker, re.M)
