"""The container deployment, checked without Docker: docker-compose.yml against the compose spec,
every command it runs against the CLI, isolation of the banks, secrets, configs and the Dockerfile."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from fedfraud.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
ONE_SHOT = {"airflow-init"}  # runs to completion; the only service without a healthcheck
GENERATED = ("./work/stack/certs/", "./work/stack/data/")  # bind sources `make stack` creates
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|FERNET|TOKEN|JWT|(^|_)KEY$", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)((?::?[-?+])[^}]*)?\}")
SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def banks(services) -> dict[str, dict]:
    """Bank node services by the bank they run for (the config they mount names it)."""
    found = {}
    for name, service in services.items():
        if (service.get("build") or {}).get("target") == "bank-node":
            config = yaml.safe_load(_bind_source(service, "/etc/fedfraud/node.yaml").read_text())
            found[config["bank"]] = {"service": name, **service}
    assert found, "no bank node service"
    return found


@pytest.fixture(scope="module")
def aggregator_config(services) -> dict:
    return yaml.safe_load(_bind_source(services["aggregator"], "/etc/fedfraud/aggregator.yaml").read_text())


def _mounts(service: dict) -> list[dict]:
    """Short and long volume syntax as {type, source, target, read_only}."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            mounts.append({"type": kind, "source": source, "target": target,
                           "read_only": bool(mode) and "ro" in mode[0].split(",")})
        else:
            mounts.append({"type": volume["type"], "source": volume.get("source"), "target": volume["target"],
                           "read_only": volume.get("read_only") in (True, "true")})
    return mounts


def _mount(service: dict, target: str) -> dict:
    found = [m for m in _mounts(service) if m["target"] == target]
    assert len(found) == 1, f"expected one mount at {target}, got {found}"
    return found[0]


def _bind_source(service: dict, target: str) -> Path:
    mount = _mount(service, target)
    assert mount["type"] == "bind", mount
    return ROOT / mount["source"]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _run_lines(service: dict) -> list[list[str] | str]:
    """What the service runs: entrypoint, command and healthcheck test (lists stay argv, strings are shell)."""
    lines: list[list[str] | str] = []
    for key in ("entrypoint", "command"):
        if service.get(key):
            lines.append(service[key])
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, str):
        lines.append(test)
    elif test and test[0] == "CMD":
        lines.append(list(test[1:]))
    elif test and test[0] == "CMD-SHELL":
        lines.append(" ".join(test[1:]))
    return lines


def _shell_calls(script: str, program: str) -> list[list[str]]:
    calls = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words):
            if word == program or word.endswith("/" + program):
                args = []
                for arg in words[i + 1:]:
                    if arg in SHELL_OPERATORS:
                        break
                    args.append(arg)
                calls.append(args)
    return calls


def _calls(line: list[str] | str, program: str = "fedfraud") -> list[list[str]]:
    """Every invocation of ``program`` in an argv list or shell string: its arguments."""
    if isinstance(line, str):
        return _shell_calls(line, program)
    calls = [list(line[1:])] if line and (line[0] == program or line[0].endswith("/" + program)) else []
    for word in line[1:]:
        if program in word and any(c.isspace() for c in word):  # a script given to sh -c / bash -c
            calls += _shell_calls(word, program)
    return calls


def _dockerfile(service: dict) -> Path:
    build = service["build"]
    context = ROOT / build.get("context", ".")
    return context / build.get("dockerfile", "Dockerfile")


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in _dockerfile_instructions(path):
        if keyword == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
            stages[current] = [(keyword, rest)]
        elif current is not None:
            stages[current].append((keyword, rest))
    return stages


def _env_example() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            entries[key.strip()] = value.strip()
    return entries


def _is_group(command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _resolve(words: list[str]):
    """The click command that ``fedfraud WORDS`` runs; asserts every option exists and required ones are given.

    Duck-typed: typer ships its own copy of click, so its groups are not ``click.Group`` instances."""
    command = typer.main.get_command(app)
    shown, rest = ["fedfraud"], list(words)
    while _is_group(command):
        assert rest, f"`{' '.join(shown)}` is a group, not a command"
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`{' '.join(shown)} {rest[0]}`: no such command"
        command, shown, rest = sub, shown + [rest.pop(0)], rest
    options = {p.name: p for p in command.params if p.param_type_name == "option"}
    by_flag = {flag: p for p in options.values() for flag in (*p.opts, *p.secondary_opts)}
    given = set()
    i = 0
    while i < len(rest):
        word = rest[i]
        if word.startswith("-"):
            flag, has_value, _ = word.partition("=")
            assert flag in by_flag, f"`{' '.join(shown)}` has no option {flag} (has: {sorted(by_flag)})"
            param = by_flag[flag]
            given.add(param.name)
            if not param.is_flag and not has_value:
                assert i + 1 < len(rest) and not rest[i + 1].startswith("-"), f"{flag} needs a value"
                i += 1
        i += 1
    for param in command.params:
        if param.required:
            assert param.name in given, f"`{' '.join(shown)}` needs {'/'.join(param.opts)}"
    return command


# ---- the compose file is valid, and the check can fail -----------------------------------------------

def _check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_validates_against_the_compose_spec():
    result = _check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", ["ports_not_a_list", "unknown_top_level_key"])
def test_schema_check_rejects_an_invalid_compose_file(tmp_path, breakage):
    document = yaml.safe_load(COMPOSE.read_text())
    if breakage == "ports_not_a_list":
        document["services"]["aggregator"]["ports"] = "nonsense-type"
    else:
        document["servics"] = {"typo": {"image": "postgres:16"}}
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(document, sort_keys=False))
    result = _check_compose_schema(broken)
    assert result.returncode != 0, result.stdout


def test_no_version_key(compose):
    assert "version" not in compose


# ---- every command a container runs exists in the CLI ------------------------------------------------

def test_every_fedfraud_command_exists_with_its_options(services):
    seen = set()
    for name, service in services.items():
        for line in _run_lines(service):
            for words in _calls(line):
                try:
                    seen.add(_resolve(words).name)
                except AssertionError as exc:
                    raise AssertionError(f"service {name}: {exc}") from exc
    assert {"serve", "run", "health"} <= seen, seen


def test_the_dockerfiles_default_commands_exist_in_the_cli(services):
    dockerfiles = {_dockerfile(service) for service in services.values() if "build" in service}
    calls = []
    for path in dockerfiles:
        for keyword, rest in _dockerfile_instructions(path):
            if keyword in ("CMD", "ENTRYPOINT") and rest.startswith("["):
                calls += _calls(json.loads(rest))
            elif keyword == "HEALTHCHECK" and " CMD " in f" {rest} ":
                exec_form = rest.split("CMD", 1)[1].strip()
                calls += _calls(json.loads(exec_form) if exec_form.startswith("[") else exec_form)
    assert len(calls) >= 4, calls  # serve + health of the aggregator, run + health of the node
    for words in calls:
        _resolve(words)


def test_the_resolver_catches_unknown_commands_and_options():
    with pytest.raises(AssertionError):
        _resolve(["node", "serve", "--config", "x.yaml"])
    with pytest.raises(AssertionError):
        _resolve(["node", "run", "--configuration", "x.yaml"])
    with pytest.raises(AssertionError):
        _resolve(["node", "run"])  # --config is required
    with pytest.raises(AssertionError):
        _resolve(["aggregator"])


# ---- health, isolation of the banks, files ---------------------------------------------------------------

def test_every_long_running_service_has_a_healthcheck(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") in ("no", None), name
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no healthcheck"
        assert healthcheck["test"] != ["NONE"], name


def test_services_wait_for_the_one_shot_init(services):
    for name, service in services.items():
        if name.startswith("airflow-") and name not in ONE_SHOT:
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name


def test_banks_publish_no_port_and_keep_their_own_data_work_and_certificate(services, banks):
    seen: dict[str, set] = {"data": set(), "work": set(), "certs": set(), "config": set()}
    for bank, service in banks.items():
        name = service["service"]
        assert not service.get("ports") and not service.get("expose"), f"{name} publishes a port"
        assert service.get("network_mode") is None, f"{name} must not share another network namespace"
        data, work = _mount(service, "/data/raw"), _mount(service, "/var/lib/fedfraud")
        certs, config = _mount(service, "/certs"), _mount(service, "/etc/fedfraud/node.yaml")
        assert data["type"] == "bind" and data["read_only"] and data["source"] == f"./work/stack/data/{bank}", data
        assert work["type"] == "volume", work
        assert certs["type"] == "bind" and certs["read_only"] and certs["source"] == f"./work/stack/certs/{bank}"
        assert config["read_only"], config
        for kind, mount in (("data", data), ("work", work), ("certs", certs), ("config", config)):
            assert mount["source"] not in seen[kind], f"{name} shares its {kind} mount {mount['source']}"
            seen[kind].add(mount["source"])
    # ...and no other service mounts a bank's data, work volume or certificate
    private = seen["data"] | seen["work"] | seen["certs"]
    for name, service in services.items():
        if name not in {s["service"] for s in banks.values()}:
            shared = private & {m["source"] for m in _mounts(service)}
            assert not shared, f"{name} mounts a bank's private {shared}"


def test_banks_reach_only_the_aggregator(services, banks):
    bank_networks = {net for service in banks.values() for net in service["networks"]}
    for name, service in services.items():
        if name != "aggregator" and name not in {s["service"] for s in banks.values()}:
            assert not bank_networks & set(service.get("networks", ["default"])), f"{name} is on a bank network"
    assert bank_networks <= set(services["aggregator"]["networks"])


def test_certificates_are_mounted_per_participant_and_never_the_ca(services):
    for name, service in services.items():
        for mount in _mounts(service):
            source = mount["source"] or ""
            if "certs" in source:
                assert re.fullmatch(r"\./work/stack/certs/(aggregator|airflow|bank\w+)", source), (name, source)
                assert mount["read_only"] and mount["target"] == "/certs", (name, mount)


def test_every_referenced_file_exists(services):
    for name, service in services.items():
        if "build" in service:
            dockerfile = _dockerfile(service)
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            stages = _stages(dockerfile)
            target = service["build"].get("target")
            assert target is None or target in stages, f"{name}: no stage {target} in {dockerfile}"
        for mount in _mounts(service):
            if mount["type"] != "bind":
                continue
            if mount["source"].startswith(GENERATED):
                continue  # certificates and data: written by `make stack`
            assert (ROOT / mount["source"]).exists(), f"{name}: {mount['source']} missing"


def test_named_volumes_and_networks_are_declared(compose, services):
    for name, service in services.items():
        for mount in _mounts(service):
            if mount["type"] == "volume":
                assert mount["source"] in compose["volumes"], f"{name}: volume {mount['source']} not declared"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: network {network} not declared"


def test_dockerfile_installs_the_lock_runs_as_non_root_and_copies_what_exists(services):
    dockerfile = _dockerfile(services["aggregator"])
    text = dockerfile.read_text()
    assert "python:3.11-slim-bookworm" in text
    assert "uv==0.13.9" in text and "--no-deps ." in text
    # the lock, cut per image by docker/lock_subset.py, installed with its hashes
    assert re.search(r"lock_subset\.py airflow > (\S+)\s.*uv pip sync .*--require-hashes \1", text, re.DOTALL)
    stages = _stages(dockerfile)
    for target in ("bank-node", "aggregator", "airflow"):
        users = [rest for keyword, rest in stages[target] if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{target} runs as root"
    for target in ("bank-node", "airflow"):  # Spark needs Java: directly or through the `java` stage
        chain, stage = [], target
        while stage in stages:
            chain.append(stage)
            stage = stages[stage][0][1].split()[0]
        instructions = " ".join(rest for s in chain for _, rest in stages[s])
        assert "openjdk-17-jre-headless" in instructions and "JAVA_HOME=" in instructions, target
    for keyword, rest in _dockerfile_instructions(dockerfile):
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _ = [w for w in rest.split() if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not _docker_ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def _docker_ignored(name: str) -> bool:
    """Whether .dockerignore excludes ``name`` (a top-level entry or a path; last matching pattern wins).

    A pattern without "/" is matched against the top-level entry, one with "/" against the whole path."""
    ignored = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatchcase(name if "/" in pattern else name.split("/")[0], pattern):
            ignored = not negate
    return ignored


def test_build_context_leaves_out_certificates_secrets_and_the_venv():
    for name in ("work", ".env", ".venv", ".git", "tests", "docker/stack_test.py", "work/stack/certs/ca/ca.key"):
        assert _docker_ignored(name), name


# ---- secrets ---------------------------------------------------------------------------------------------

def test_no_secret_literal_in_the_compose_file(services):
    credentials = re.findall(r"://[^\s:/@'\"]+:(\$\{[^}]*\}|[^\s@/'\"]*)@", COMPOSE.read_text())
    assert len(credentials) >= 3, credentials  # Airflow's, MLflow's and the aggregator's database URLs
    for password in credentials:
        assert INTERPOLATION.fullmatch(password), f"password literal in a URL: {password}"
    for name, service in services.items():
        values = {**_environment(service), **{f"build arg {k}": str(v) for k, v in
                                               ((service.get("build") or {}).get("args") or {}).items()}}
        for key, value in values.items():
            if SECRET_NAME.search(key) and not value.startswith("/"):  # a path to a key file is no secret
                assert INTERPOLATION.fullmatch(value), f"{name}: {key} is not taken from .env"


def test_secrets_from_env_are_required(compose):
    for match in INTERPOLATION.finditer(COMPOSE.read_text()):
        variable, modifier = match.group(1), match.group(2) or ""
        if SECRET_NAME.search(variable):
            assert modifier.startswith(":?"), f"${{{variable}}} must fail when unset: use ${{{variable}:?...}}"


def test_every_variable_is_listed_in_env_example_and_nothing_else():
    text = COMPOSE.read_text().replace("$$", "")  # $$ escapes a literal $ for the container
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    bare = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", INTERPOLATION.sub("", text)))
    assert not bare, f"use ${{VAR}}: {bare}"
    listed = _env_example()
    assert used <= set(listed), f"not in .env.example: {used - set(listed)}"
    assert set(listed) <= used, f".env.example lists unused {set(listed) - used}"
    for key, value in listed.items():
        if SECRET_NAME.search(key):
            assert value in ("", "change-me"), f".env.example holds a real-looking value for {key}"


# ---- Airflow ---------------------------------------------------------------------------------------------

def test_airflow_uses_the_local_executor_and_shares_its_secrets(services, aggregator_config):
    airflow = {name: _environment(s) for name, s in services.items() if name.startswith("airflow-")}
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer"} <= set(airflow)
    shared = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
              "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL")
    for name, env in airflow.items():
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False", name
        for key in shared:
            assert env[key] == airflow["airflow-scheduler"][key], f"{name}: {key} differs"
        url = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert url.hostname in services and url.path == "/execution/", url
        assert env["FEDFRAUD_MODE"] == "networked"
        assert set(json.loads(env["FEDFRAUD_BANKS"])) == set(aggregator_config["banks"])
        assert urlsplit(env["FEDFRAUD_AGGREGATOR_URL"]).hostname == "aggregator"
        certs = _mount(services[name], "/certs")
        assert certs["source"] == "./work/stack/certs/airflow" and certs["read_only"]
        for key in ("FEDFRAUD_TLS_CA", "FEDFRAUD_TLS_CERT", "FEDFRAUD_TLS_KEY"):
            assert env[key].startswith("/certs/"), key


# Airflow 3 opens an async engine on its metadata database at start-up; on Postgres it derives
# postgresql+asyncpg:// and fails with "No module named 'asyncpg'" (checked against a real Postgres).
def test_the_lock_has_the_postgres_drivers_airflow_needs():
    names = {line.split("==")[0].lower() for line in (ROOT / "requirements.lock").read_text().splitlines()
             if "==" in line and not line.startswith((" ", "#"))}
    assert {"psycopg2-binary", "asyncpg"} <= names


# ---- configs and participants agree -------------------------------------------------------------------

def test_node_configs_name_their_bank_and_match_the_mounts(banks, aggregator_config, services):
    port = aggregator_config["port"]
    for bank, service in banks.items():
        config = yaml.safe_load(_bind_source(service, "/etc/fedfraud/node.yaml").read_text())
        assert config["bank"] == bank
        assert Path(_mount(service, "/etc/fedfraud/node.yaml")["source"]).stem == bank
        assert config["data"] == "/data/raw" and config["work_dir"] == "/var/lib/fedfraud"
        assert all(path.startswith("/certs/") for path in config["tls"].values()), config["tls"]
        url = urlsplit(config["aggregator_url"])
        assert url.scheme == "https" and url.hostname == "aggregator" and url.port == port
        assert "aggregator" in service["depends_on"]


def test_every_bank_of_the_aggregator_has_a_node_service_and_config(banks, aggregator_config, services):
    assert set(aggregator_config["banks"]) == set(banks)
    for bank in aggregator_config["banks"]:
        assert (ROOT / "docker" / "config" / f"{bank}.yaml").is_file(), bank
    service = services["aggregator"]
    assert aggregator_config["work_dir"] == "/var/lib/fedfraud"
    assert _mount(service, aggregator_config["work_dir"])["type"] == "volume"
    assert all(path.startswith("/certs/") for path in aggregator_config["tls"].values())
    assert aggregator_config["operators"] == ["airflow"]
    assert aggregator_config["federated_host"] == "aggregator"
    assert any(str(p).endswith(f":{aggregator_config['port']}") for p in service["ports"]), service["ports"]


def test_make_stack_provisions_the_participants_of_the_compose_file(aggregator_config):
    makefile = (ROOT / "Makefile").read_text()
    recipe = "".join(makefile.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0] for target in ("stack-files", "stack"))
    assert re.search(r"\nstack: stack-files\n", makefile) and re.search(r"\nstack-test: stack-files\n", makefile)
    participants = re.search(r"--participants\s+(\S+)", recipe).group(1).split(",")
    operators = re.search(r"--operators\s+(\S+)", recipe).group(1).split(",")
    assert participants == ["aggregator", *aggregator_config["banks"]]
    assert operators == aggregator_config["operators"]
    assert "docker compose up -d --build" in recipe
    for bank in aggregator_config["banks"]:
        assert f"work/stack/data/{bank}" in recipe, bank


def _with_tls_files_in(config_path: Path, folder: Path) -> Path:
    """A copy of a service config whose tls paths point at (empty) files in ``folder``: the loaders check they exist."""
    raw = yaml.safe_load(config_path.read_text())
    for key, path in raw["tls"].items():
        (folder / Path(path).name).touch()
        raw["tls"][key] = str(folder / Path(path).name)
    copy = folder / config_path.name
    copy.write_text(yaml.safe_dump(raw))
    return copy


def test_configs_load_with_the_services_own_loaders(tmp_path, services, banks, monkeypatch):
    from aggregator.service.config import ServiceConfig
    from bank_node.agent import AgentConfig

    monkeypatch.delenv("FEDFRAUD_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _bind_source(services["aggregator"], "/etc/fedfraud/aggregator.yaml")
    aggregator = ServiceConfig.load(_with_tls_files_in(path, tmp_path))
    assert aggregator.host == "0.0.0.0", "inside a container the service must listen beyond loopback"
    assert set(aggregator.banks) == set(banks) and aggregator.federated_host == "aggregator"
    for bank, service in banks.items():
        agent = AgentConfig.load(_with_tls_files_in(_bind_source(service, "/etc/fedfraud/node.yaml"), tmp_path))
        assert agent.bank == bank


def test_the_bank_only_snippet_in_the_docs_is_valid(tmp_path):
    docs = (ROOT / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", docs, flags=re.DOTALL)
    assert blocks, "docs/deployment.md shows no compose snippet for a bank"
    for i, block in enumerate(blocks):
        snippet = tmp_path / f"snippet{i}.yml"
        snippet.write_text(block)
        result = _check_compose_schema(snippet)
        assert result.returncode == 0, result.stdout + result.stderr
        for service in yaml.safe_load(block)["services"].values():
            assert not service.get("ports"), "a bank's node publishes no port"
            for line in _run_lines(service):
                for words in _calls(line):
                    _resolve(words)
