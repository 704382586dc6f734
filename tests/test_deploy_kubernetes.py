"""``deploy/kubernetes/``: every manifest against the Kubernetes API schema, without a cluster.

``kubernetes-validate`` bundles the OpenAPI schemas of each Kubernetes release;
strict validation also refuses fields the schema does not know (a misspelt
``nodeSelecter`` or a probe field at the wrong level). What no schema sees is
checked here by hand: the kustomization lists every file, swapd's config in
the ConfigMap loads, and the DaemonSet's probes, port and host paths agree
with that config. Not checked: anything a cluster decides (admission, that the
images, the Secrets or the GPU device plugin exist, that the host paths do).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from swapd.config import load_config

FOLDER = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# The oldest release still common on k3s and in labs, and the newest the package knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in the folder, with the file it comes from."""
    found = []
    for path in sorted(FOLDER.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str, name: str) -> dict[str, Any]:
    """The object of this kind and name."""
    (found,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("file", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_manifest_is_valid_against_the_api_schema(
    file: str, doc: dict[str, Any], version: str
) -> None:
    """Strict: unknown fields, wrong types and missing required fields all fail."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{file}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_kustomization_lists_every_manifest() -> None:
    """``kubectl apply -k`` applies exactly the files in the folder; none is forgotten."""
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    kinds = {d["kind"] for _, d in manifests()}
    assert {"DaemonSet", "ConfigMap", "Deployment", "Service"} <= kinds


def test_the_swapd_config_in_the_configmap_loads(tmp_path: Path) -> None:
    """swapd.yaml and every preset pass swapd's own config loader, as the pod would read them."""
    config_map, presets = one("ConfigMap", "swapd-config"), one("ConfigMap", "swapd-presets")
    text = config_map["data"]["swapd.yaml"].replace("/etc/swapd/presets", str(tmp_path / "p"))
    (tmp_path / "p").mkdir()
    (tmp_path / "models").mkdir()
    for name, body in presets["data"].items():
        preset = yaml.safe_load(body)
        (tmp_path / preset["model"].replace("/models/", "models/", 1)).touch()
        (tmp_path / "p" / name).write_text(body.replace("/models/", f"{tmp_path}/models/"))
    (tmp_path / "swapd.yaml").write_text(text.replace("/etc/swapd/keys", str(tmp_path)))
    for keys in ("api.keys", "admin.keys"):
        (tmp_path / keys).write_text("an-example-key-0123456789\n")
    config = load_config(tmp_path / "swapd.yaml")
    assert sorted(p.name for p in config.presets) == sorted(n[:-5] for n in presets["data"])
    assert config.port == 8080


def test_the_daemonset_serves_the_configmap_on_gpu_nodes() -> None:
    """GPU nodes only, a GPU resource, /health probes on swapd's port, its dirs on the node."""
    config = yaml.safe_load(one("ConfigMap", "swapd-config")["data"]["swapd.yaml"])
    pod = one("DaemonSet", "swapd")["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert pod["hostNetwork"] is True
    (container,) = pod["containers"]
    assert {"nvidia.com/gpu", "amd.com/gpu"} & set(container["resources"]["limits"])
    # One copy per GPU count, each on its own nodes: two on a node would share hostPort.
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus is None or pod["nodeSelector"]["nvidia.com/gpu.count"] == str(gpus)
    port = int(config["listen"].rpartition(":")[2])
    assert container["ports"][0]["containerPort"] == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for key in ("state_dir", "cache_dir"):
        assert "hostPath" in volumes[mounts[config[key]]], key
    presets = one("ConfigMap", "swapd-presets")["data"].values()
    model_dirs = {str(Path(yaml.safe_load(p)["model"]).parent) for p in presets}
    assert all("hostPath" in volumes[mounts[d]] for d in model_dirs)
    assert volumes[mounts["/etc/swapd/presets"]]["configMap"]["name"] == "swapd-presets"
    # The forks of a backend are reaped by the pod's pause container, not left as zombies.
    assert pod["shareProcessNamespace"] is True
    # The config is read from a mounted folder (a subPath mount never sees a change), and
    # the CLI inside the pod finds it too.
    assert not [m for m in container["volumeMounts"] if "subPath" in m]
    config_path = container["command"][container["command"].index("--config") + 1]
    assert volumes[mounts[str(Path(config_path).parent)]]["configMap"]["name"] == "swapd-config"
    assert {"name": "SWAPD_CONFIG", "value": config_path} in container["env"]


def test_litellm_sits_in_front_behind_a_service() -> None:
    """The Service selects the LiteLLM pods and reaches the port LiteLLM listens on."""
    deployment, service = one("Deployment", "litellm"), one("Service", "litellm")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    listened = args[args.index("--port") + 1]
    assert [p["containerPort"] for p in container["ports"]] == [int(listened)]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_the_docs_ask_the_nodes_where_a_swapd_pod_runs() -> None:
    """LiteLLM's config is made from the nodes that run swapd, not from every GPU node.

    The docs listed ``nvidia.com/gpu.present`` nodes, while the DaemonSet selects one GPU
    count too: a GPU node of another count has no swapd, and failed the whole run.
    """
    docs = (FOLDER.parent.parent / "docs" / "scale-out.md").read_text()
    found = re.search(r"NODES=\$\(kubectl -n (\S+) get pods -l (\S+)=(\S+) ", docs)
    assert found, "the docs do not list the swapd pods"
    daemonset = one("DaemonSet", "swapd")
    assert found[1] == one("Namespace", "swapd")["metadata"]["name"]
    assert daemonset["spec"]["template"]["metadata"]["labels"][found[2]] == found[3]
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"] is True  # hostIP: the node's


def test_the_docs_ship_litellms_config_only_when_it_was_made() -> None:
    """A node that does not answer stops the steps before the ConfigMap is replaced.

    The docs wrote the config with ``> config.yaml``: the shell emptied the file before
    ``swapd litellm-config`` failed, and the next step shipped the empty file to LiteLLM.
    """
    docs = (FOLDER.parent.parent / "docs" / "scale-out.md").read_text()
    steps = docs[docs.index("NODES=$(") : docs.index("rollout restart deployment/litellm")]
    made = next(line for line in steps.splitlines() if "swapd litellm-config" in line)
    assert "-o config.yaml" in made
    assert ">" not in made
    assert steps.count("&&") == 2  # the config made, then applied, then LiteLLM restarted
