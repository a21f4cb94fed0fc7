"""deploy/ checked offline: each kustomize overlay rendered (kubectl kustomize) and its core kinds validated against
the Kubernetes schemas (kubernetes-validate), the KubeRay kinds checked for the fields KubeRay requires and the
fleet expects; the Compose file parsed by a Compose-specification parser; the shell scripts parsed by bash; the
run config the cluster mounts validated as the stack validates it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from protocol.config import load_config

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "k8s" / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.37.0"


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays (bash deploy/test-tools.sh installs it)"
    res = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def check_ray_cluster(rc: dict) -> None:
    spec = rc["spec"]
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], "a head container"
    assert "learner_host" in head["rayStartParams"]["resources"], "the learner's node offers learner_host"
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1", "the dashboard on loopback"
    assert spec["authOptions"]["mode"] == "token", "Ray's token authentication on"
    assert spec["workerGroupSpecs"], "a group of GPU hosts"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "carla_host" in group["rayStartParams"]["resources"]
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
        pod = group["template"]["spec"]
        names = {c["name"]: c for c in pod["containers"]}
        assert {"ray-worker", "carla"} <= set(names), "CARLA as a sibling container of the host's worker"
        assert pod["shareProcessNamespace"] is True, "the supervisor sees its CARLA server's process"
        assert "SYS_PTRACE" in names["ray-worker"]["securityContext"]["capabilities"]["add"]
        assert names["carla"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        for c in pod["containers"]:
            assert c["image"] and c["name"]
        keys = next(v for v in pod["volumes"] if v["name"] == "keys")
        assert keys["secret"]["secretName"] == "rlstack-keys", "the CurveZMQ keys as a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "ConfigMap"} <= set(kinds), sorted(kinds)
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises on any field the schema does not know
    check_ray_cluster(kinds["RayCluster"])
    job = kinds["RayJob"]["spec"]
    assert "supervisor up --engine ray" in job["entrypoint"]
    assert job["clusterSelector"]["ray.io/cluster"] == kinds["RayCluster"]["metadata"]["name"]
    # the config the pods mount is a valid run config of the fleet, its simulators the pods' sibling containers
    cfg_text = kinds["ConfigMap"]["data"]["fleet.yaml"]
    path = ROOT / "deploy" / "k8s" / "base" / "fleet.yaml"
    assert cfg_text == path.read_text()
    cfg = load_config(path)
    assert cfg.run.engine == "ray" and cfg.simulators.mode == "pod" and cfg.cluster.host_key
    mounts = {m["mountPath"] for c in kinds["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]}
    assert {"/etc/rlstack/keys", "/etc/rlstack/config", cfg.run.runs_dir} <= mounts


def test_the_validators_refuse_what_is_wrong():
    """The checks above can fail: a misspelt field, a worker group without its pod."""
    import kubernetes_validate
    from compose_spec import PyCompose

    pvc = next(d for d in render(OVERLAYS[0]) if d["kind"] == "PersistentVolumeClaim")
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    rc = next(d for d in render(OVERLAYS[0]) if d["kind"] == "RayCluster")
    del rc["spec"]["workerGroupSpecs"][0]["template"]
    with pytest.raises(KeyError):
        check_ray_cluster(rc)
    with pytest.raises(ValueError, match="healthcheck"):
        PyCompose.from_yaml("services:\n  x:\n    image: y\n    healthcheck:\n      interval: soon\n")


def test_the_compose_file_follows_the_compose_specification():
    from compose_spec import PyCompose

    text = (DEPLOY / "compose.yaml").read_text()
    compose = PyCompose.from_yaml(text)  # raises ValueError naming the field that is wrong
    assert compose.service_names() == ["stack"]
    stack = yaml.safe_load(text)["services"]["stack"]
    assert stack["healthcheck"]["test"][1:3] == ["supervisor", "status"], "health is a real status request"
    assert stack["build"]["dockerfile"] == "deploy/docker/Dockerfile" and (ROOT / stack["build"]["dockerfile"]).exists()
    assert stack["user"] != "0" and "SYS_PTRACE" in stack["cap_add"]


def test_the_dockerfile_has_both_targets_non_root_with_a_status_healthcheck():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages = [line.split()[-1] for line in text.splitlines() if line.startswith("FROM ")]
    assert stages == ["base", "worker", "learner"]
    base = text.split("AS base\n", 1)[1].split("\nFROM ", 1)[0]
    assert "HEALTHCHECK" in base and '"supervisor", "status"' in base, "both images inherit the status health check"
    for stage in ("worker", "learner"):
        body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER rlstack" in body and "CMD [" in body, stage
        assert 'ARG WHEELS=""' in body, f"{stage}: a build argument is seen only in the stages that declare it"
    assert "torch==2.13.0" in text.split("AS learner\n", 1)[1], "the learner's torch pinned"
    assert "torch" not in text.split("AS worker\n", 1)[1].split("\nFROM ", 1)[0], "a worker needs no torch"


def test_the_scripts_parse_and_the_unit_names_them():
    for script in (DEPLOY / "ray").glob("*.sh"):
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (script.name, res.stderr)
    res = subprocess.run(["bash", str(DEPLOY / "ray" / "start-worker.sh")], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr, "a missing head address is said in one line"
    unit = (DEPLOY / "ray" / "rlstack-raylet.service").read_text()
    assert "Restart=always" in unit and "start-worker.sh" in unit
    head = (DEPLOY / "ray" / "start-head.sh").read_text()
    assert "RAY_AUTH_MODE=token" in head and '"learner_host": 1' in head and "127.0.0.1" in head
    assert '"carla_host": 1' in (DEPLOY / "ray" / "start-worker.sh").read_text()
    readme = (DEPLOY / "README.md").read_text()
    for path in ("docker/Dockerfile", "compose.yaml", "ray/", "k8s/"):
        assert path in readme, f"deploy/README.md says what CI proves of {path}"
