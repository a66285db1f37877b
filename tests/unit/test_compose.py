"""Compose -> bundle conversion: each mapping, each dropped key, each error, and the sample file."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from bundles.compose import Conversion, convert_compose
from bundles.errors import InvalidBundles
from schemas.bundle import Bundle

FILE = "docker-compose.yml"
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "compose" / "docker-compose.yml"


def convert(text: str) -> Conversion:
    return convert_compose(textwrap.dedent(text), FILE)


def web(body: str, rest: str = "") -> Conversion:
    """Convert a file whose only service, web, has `body` (plus image: app:1 unless it names an image)."""
    body = textwrap.dedent(body).rstrip("\n") + "\n"
    if "image:" not in body:
        body = "image: app:1\n" + body
    return convert("services:\n  web:\n" + textwrap.indent(body, "    ") + textwrap.dedent(rest))


def web_fields(body: str, rest: str = "") -> dict[str, Any]:
    """The converted web service as it would be written to a bundle, without its image."""
    doc = web(body, rest).bundle.services["web"].model_dump(mode="json", exclude_defaults=True)
    doc.pop("Image")
    return doc


def errors(text: str) -> list[str]:
    with pytest.raises(InvalidBundles) as exc:
        convert(text)
    return [str(e) for e in exc.value.errors]


MAPPINGS = [
    # --- environment
    ("env list", 'environment: ["A=1", "B=x y", "C"]', {"Env": ["A=1", "B=x y", "C"]}),
    (
        "env map scalars",
        "environment: {A: 1, B: true, C: x, D: 1.5, E: false}",
        {"Env": ["A=1", "B=true", "C=x", "D=1.5", "E=false"]},
    ),
    ("env map null is a bare name", "environment: {B: null, C: ''}", {"Env": ["B", "C="]}),
    ("env yes stays text (YAML 1.2, as Compose reads it)", "environment: {DEBUG: yes}", {"Env": ["DEBUG=yes"]}),
    ("env $$ is a literal $", 'environment: ["PRICE=$$5"]', {"Env": ["PRICE=$5"]}),
    # --- labels
    ("labels list", 'labels: ["a.b=c", "flag"]', {"Labels": {"a.b": "c", "flag": ""}}),
    (
        "labels map",
        "labels: {a.b: c, n: 3, t: true, e: null}",
        {"Labels": {"a.b": "c", "n": "3", "t": "true", "e": ""}},
    ),
    # --- entrypoint -> Command, command -> Args
    (
        "entrypoint string is shell-split",
        "entrypoint: /bin/sh -c 'echo \"hi there\"'",
        {"Command": ["/bin/sh", "-c", 'echo "hi there"']},
    ),
    ("entrypoint list", 'entrypoint: ["/bin/serve", "--fast"]', {"Command": ["/bin/serve", "--fast"]}),
    (
        "command string is shell-split",
        "command: redis-server --save '' --port 6380",
        {"Args": ["redis-server", "--save", "", "--port", "6380"]},
    ),
    ("command list", 'command: ["sleep", "30"]', {"Args": ["sleep", "30"]}),
    ("empty entrypoint clears the image's", 'entrypoint: ""', {"Command": []}),
    # --- ports
    ("port container only", 'ports: ["80"]', {"Ports": [{"Port": 80}]}),
    ("port as a number", "ports: [80]", {"Ports": [{"Port": 80}]}),
    ("port published", 'ports: ["8080:80"]', {"Ports": [{"Port": 80, "PublishedPort": 8080}]}),
    ("port unquoted 22:22 is not base 60", "ports:\n  - 2222:22", {"Ports": [{"Port": 22, "PublishedPort": 2222}]}),
    ("port host IP", 'ports: ["127.0.0.1:8080:80"]', {"Ports": [{"Port": 80, "PublishedPort": 8080}]}),
    ("port IPv6 host IP", 'ports: ["[::1]:8080:80"]', {"Ports": [{"Port": 80, "PublishedPort": 8080}]}),
    ("port host IP without published", 'ports: ["127.0.0.1::80"]', {"Ports": [{"Port": 80}]}),
    (
        "port udp",
        'ports: ["53:53/udp", "80/udp"]',
        {"Ports": [{"Protocol": "udp", "Port": 53, "PublishedPort": 53}, {"Protocol": "udp", "Port": 80}]},
    ),
    (
        "port ranges are expanded",
        'ports: ["8080-8081:80-81"]',
        {"Ports": [{"Port": 80, "PublishedPort": 8080}, {"Port": 81, "PublishedPort": 8081}]},
    ),
    ("container range only", 'ports: ["80-81"]', {"Ports": [{"Port": 80}, {"Port": 81}]}),
    (
        "port long form",
        "ports: [{target: 80, published: 8080, protocol: udp}, {target: 443}]",
        {"Ports": [{"Protocol": "udp", "Port": 80, "PublishedPort": 8080}, {"Port": 443}]},
    ),
    (
        "port long form published as text range",
        'ports: [{target: "80-81", published: "8080-8081"}]',
        {"Ports": [{"Port": 80, "PublishedPort": 8080}, {"Port": 81, "PublishedPort": 8081}]},
    ),
    # --- volumes and tmpfs -> Mounts
    ("named volume", 'volumes: ["data:/data"]', {"Mounts": [{"Type": "volume", "Source": "data", "Target": "/data"}]}),
    (
        "named volume read-only",
        'volumes: ["data:/data:ro"]',
        {"Mounts": [{"Type": "volume", "Source": "data", "Target": "/data", "ReadOnly": True}]},
    ),
    ("anonymous volume", 'volumes: ["/cache"]', {"Mounts": [{"Type": "volume", "Target": "/cache"}]}),
    (
        "anonymous volume with mode",
        'volumes: ["/cache:ro"]',
        {"Mounts": [{"Type": "volume", "Target": "/cache", "ReadOnly": True}]},
    ),
    (
        "absolute bind",
        'volumes: ["/srv/conf:/etc/app:rw"]',
        {"Mounts": [{"Type": "bind", "Source": "/srv/conf", "Target": "/etc/app"}]},
    ),
    (
        "relative bind is not carried",
        'volumes: ["./conf:/etc/app", "data:/data"]',
        {"Mounts": [{"Type": "volume", "Source": "data", "Target": "/data"}]},
    ),
    (
        "volume long form",
        "volumes: [{type: volume, source: data, target: /data, read_only: true}]",
        {"Mounts": [{"Type": "volume", "Source": "data", "Target": "/data", "ReadOnly": True}]},
    ),
    (
        "bind long form",
        "volumes: [{type: bind, source: /srv, target: /srv, bind: {propagation: rslave}}]",
        {"Mounts": [{"Type": "bind", "Source": "/srv", "Target": "/srv"}]},
    ),
    (
        "tmpfs long form",
        "volumes: [{type: tmpfs, target: /run, tmpfs: {size: 1000}}]",
        {"Mounts": [{"Type": "tmpfs", "Target": "/run"}]},
    ),
    ("tmpfs string", "tmpfs: /run", {"Mounts": [{"Type": "tmpfs", "Target": "/run"}]}),
    (
        "tmpfs list with options",
        'tmpfs: ["/run:size=64m", "/tmp"]',
        {"Mounts": [{"Type": "tmpfs", "Target": "/run"}, {"Type": "tmpfs", "Target": "/tmp"}]},
    ),
    # --- healthcheck
    (
        "healthcheck string runs in a shell",
        "healthcheck: {test: curl -f http://localhost/}",
        {"Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/"]}},
    ),
    (
        "healthcheck list as is",
        'healthcheck: {test: ["CMD", "pg_isready"], retries: 3}',
        {"Healthcheck": {"Test": ["CMD", "pg_isready"], "Retries": 3}},
    ),
    (
        "healthcheck durations Go-style",
        "healthcheck: {test: [CMD-SHELL, 'true'], interval: 1m30s, timeout: 500ms, start_period: 1h}",
        {
            "Healthcheck": {
                "Test": ["CMD-SHELL", "true"],
                "Interval": "1m30s",
                "Timeout": "500ms",
                "StartPeriod": "1h0m0s",
            }
        },
    ),
    ("healthcheck disabled", "healthcheck: {disable: true}", {"Healthcheck": {"Test": ["NONE"]}}),
    ("healthcheck NONE", 'healthcheck: {test: ["NONE"]}', {"Healthcheck": {"Test": ["NONE"]}}),
    # --- plain fields
    ("working_dir and user", "working_dir: /app\nuser: '1000:1000'", {"WorkingDir": "/app", "User": "1000:1000"}),
    (
        "stop settings",
        "stop_grace_period: 1m30s\nstop_signal: SIGINT",
        {"StopGracePeriod": "1m30s", "StopSignal": "SIGINT"},
    ),
    ("pull_policy missing", "pull_policy: missing", {"PullPolicy": "if-not-present"}),
    ("pull_policy if_not_present", "pull_policy: if_not_present", {"PullPolicy": "if-not-present"}),
    ("pull_policy always", "pull_policy: always", {"PullPolicy": "always"}),
    ("pull_policy never", "pull_policy: never", {"PullPolicy": "never"}),
    # --- deploy
    ("deploy replicas", "deploy: {replicas: 3}", {"Deploy": {"Replicas": 3}}),
    ("deploy global", "deploy: {mode: global}", {"Deploy": {"Mode": "global"}}),
    (
        "deploy update_config",
        "deploy: {update_config: {parallelism: 2, delay: 10s, failure_action: rollback, monitor: 30s,"
        " max_failure_ratio: 0.25, order: start-first}}",
        {
            "Deploy": {
                "UpdateConfig": {
                    "Parallelism": 2,
                    "Delay": "10s",
                    "FailureAction": "rollback",
                    "Monitor": "30s",
                    "MaxFailureRatio": 0.25,
                    "Order": "start-first",
                }
            }
        },
    ),
    (
        "deploy rollback_config",
        "deploy: {rollback_config: {parallelism: 0, failure_action: continue}}",
        {"Deploy": {"RollbackConfig": {"Parallelism": 0, "FailureAction": "continue"}}},
    ),
    (
        "deploy restart_policy",
        "deploy: {restart_policy: {condition: on-failure, delay: 2s, max_attempts: 3, window: 2m}}",
        {"Deploy": {"RestartPolicy": {"Condition": "on-failure", "Delay": "2s", "MaxAttempts": 3, "Window": "2m0s"}}},
    ),
    (
        "deploy placement",
        'deploy: {placement: {constraints: ["node.role == worker"], max_replicas_per_node: 1}}',
        {"Deploy": {"Placement": {"Constraints": ["node.role == worker"], "MaxReplicasPerNode": 1}}},
    ),
    (
        "deploy resources, cpus as a number",
        "deploy: {resources: {limits: {cpus: 0.5, memory: 512M}, reservations: {cpus: '0.25', memory: 64M}}}",
        {
            "Deploy": {
                "Resources": {
                    "Limits": {"Cpus": "0.5", "Memory": "512M"},
                    "Reservations": {"Cpus": "0.25", "Memory": "64M"},
                }
            }
        },
    ),
    (
        "deploy resources, whole cpus and bytes",
        "deploy: {resources: {limits: {cpus: 2, memory: 67108864}}}",
        {"Deploy": {"Resources": {"Limits": {"Cpus": "2", "Memory": "67108864"}}}},
    ),
    # --- single-host spellings of deploy settings
    ("restart no", 'restart: "no"', {"Deploy": {"RestartPolicy": {"Condition": "none"}}}),
    ("restart no unquoted (YAML 1.2)", "restart: no", {"Deploy": {"RestartPolicy": {"Condition": "none"}}}),
    ("restart always is Swarm's default", "restart: always", {}),
    ("restart unless-stopped", "restart: unless-stopped", {}),
    ("restart on-failure", "restart: on-failure", {"Deploy": {"RestartPolicy": {"Condition": "on-failure"}}}),
    (
        "restart on-failure:3",
        "restart: on-failure:3",
        {"Deploy": {"RestartPolicy": {"Condition": "on-failure", "MaxAttempts": 3}}},
    ),
    ("scale", "scale: 4", {"Deploy": {"Replicas": 4}}),
    (
        "cpus and mem_*",
        "cpus: 1.5\nmem_limit: 1g\nmem_reservation: 256m",
        {"Deploy": {"Resources": {"Limits": {"Cpus": "1.5", "Memory": "1g"}, "Reservations": {"Memory": "256m"}}}},
    ),
    (
        "cpus merges with deploy resources written after it",
        "cpus: 1\ndeploy: {resources: {reservations: {memory: 64M}}}",
        {"Deploy": {"Resources": {"Limits": {"Cpus": "1"}, "Reservations": {"Memory": "64M"}}}},
    ),
    # --- networks
    ("networks list", "networks: [front, back]", {"Networks": ["front", "back"]}),
    ("networks map", "networks: {front: null, back: {aliases: [db]}}", {"Networks": ["front", "back"]}),
    ("merge keys", "<<: {environment: [A=1], user: nobody}\nuser: root", {"Env": ["A=1"], "User": "root"}),
]


@pytest.mark.parametrize(("body", "expected"), [pytest.param(b, e, id=i) for i, b, e in MAPPINGS])
def test_service_mapping(body: str, expected: dict[str, Any]) -> None:
    assert web_fields(body) == expected


def test_a_named_volume_is_the_stacks_and_an_external_one_keeps_its_name() -> None:
    conv = web('volumes: ["data:/data"]', "volumes:\n  data:\n    name: shop-data\n")
    assert conv.bundle.services["web"].model_dump(mode="json", exclude_defaults=True)["Mounts"] == [
        {"Type": "volume", "Source": "data", "Target": "/data"}
    ]
    assert conv.bundle.volumes is None
    conv = web('volumes: ["data:/data"]', "volumes:\n  data:\n    external: true\n    name: shop-data\n")
    assert conv.bundle.services["web"].model_dump(mode="json", exclude_defaults=True)["Mounts"] == [
        {"Type": "volume", "Source": "shop-data", "Target": "/data"}
    ]
    assert conv.bundle.model_dump(mode="json", exclude_defaults=True)["Volumes"] == {"shop-data": {"External": True}}
    assert conv.dropped == []


TOP_NETWORKS = [
    ("defaults", "front: {}", {"front": {}}),
    ("null", "front:", {"front": {}}),
    (
        "driver, internal, labels",
        "front: {driver: macvlan, internal: true, labels: [a=b]}",
        {"front": {"Driver": "macvlan", "Internal": True, "Labels": {"a": "b"}}},
    ),
    ("labels map", "front: {labels: {a: b}}", {"front": {"Labels": {"a": "b"}}}),
    ("external", "front: {external: true}", {"front": {"External": True}}),
    ("external with a name", "front: {external: true, name: edge}", {"edge": {"External": True}}),
    ("external with the old name form", "front: {external: {name: edge}}", {"edge": {"External": True}}),
    ("overlay becomes the default driver", "front: {driver: overlay}", {"front": {}}),
]


@pytest.mark.parametrize(("spec", "expected"), [pytest.param(s, e, id=i) for i, s, e in TOP_NETWORKS])
def test_top_level_networks(spec: str, expected: dict[str, Any]) -> None:
    conv = web("networks: [front]", "networks:\n" + textwrap.indent(spec, "  ") + "\n")
    networks = {k: v.model_dump(mode="json", exclude_defaults=True) for k, v in (conv.bundle.networks or {}).items()}
    assert networks == expected
    assert conv.bundle.services["web"].networks == list(expected)


DROPPED = [
    # (web's body, the rest of the file, a line expected among the dropped lines)
    (
        "build: .",
        "",
        "services.web.build: not carried (bundles deploy prebuilt images; build and push it, then set image)",
    ),
    (
        "depends_on: [db]",
        "",
        "services.web.depends_on: not carried (dabctl starts services independently; make each service retry what it "
        "depends on)",
    ),
    (
        "env_file: .env",
        "",
        "services.web.env_file: not carried (dabctl reads only the bundle; copy the variables into environment)",
    ),
    ("cap_add: [NET_ADMIN]", "", "services.web.cap_add: not carried (bundles grant containers no extra privileges)"),
    ("init: true", "", "services.web.init: not carried (the bundle format has no equivalent)"),
    (
        "environment: {TOKEN: null}",
        "",
        "services.web.environment.TOKEN: value not carried (Compose takes TOKEN from the environment it runs in; set it "
        "here, or the container gets none)",
    ),
    (
        'ports: ["127.0.0.1:8080:80"]',
        "",
        "services.web.ports[0]: host IP 127.0.0.1 not carried (the port is published on every address of every node; "
        "to keep it private, remove the published port and reach it over a stack network)",
    ),
    (
        "ports: [{target: 80, published: 80, mode: host}]",
        "",
        "services.web.ports[0].mode: mode host not carried (dabctl publishes ports on every node through its routing "
        "mesh)",
    ),
    (
        'volumes: ["./conf:/etc/app"]',
        "",
        "services.web.volumes[0]: not carried (host path ./conf is relative to where Compose runs, which dabctl cannot "
        "resolve on each node; use an absolute host path)",
    ),
    ('volumes: ["/srv:/srv:z"]', "", "services.web.volumes[0]: option z not carried (bundles set no SELinux labels)"),
    (
        'tmpfs: ["/run:size=64m"]',
        "",
        "services.web.tmpfs[0]: options size=64m not carried (the bundle's tmpfs mount has no options)",
    ),
    (
        "networks: {back: {aliases: [db]}}",
        "",
        "services.web.networks.back.aliases: not carried (other services reach it by its service name only)",
    ),
    (
        "healthcheck: {interval: 5s}",
        "",
        "services.web.healthcheck: not carried (it sets no test, and a bundle's healthcheck replaces the image's whole; "
        "add test)",
    ),
    (
        "healthcheck: {test: 'true', start_interval: 1s}",
        "",
        "services.web.healthcheck.start_interval: not carried (the bundle format has no equivalent)",
    ),
    (
        "pull_policy: build",
        "",
        "services.web.pull_policy: not carried (bundles deploy prebuilt images; build and push it, then set image; "
        "dabctl pulls it when missing)",
    ),
    (
        "restart: always\ndeploy: {restart_policy: {condition: none}}",
        "",
        "services.web.restart: not carried (deploy.restart_policy is set and takes precedence)",
    ),
    (
        "scale: 2\ndeploy: {replicas: 3}",
        "",
        "services.web.scale: not carried (deploy.replicas is set and takes precedence)",
    ),
    (
        "deploy: {labels: {a: b}}",
        "",
        "services.web.deploy.labels: not carried (dabctl services have no service-level labels; move them to labels to "
        "put them on the containers)",
    ),
    (
        "deploy: {placement: {preferences: [{spread: node.labels.zone}]}}",
        "",
        "services.web.deploy.placement.preferences: not carried (dabctl's scheduler takes constraints only)",
    ),
    (
        "deploy: {resources: {limits: {pids: 100}}}",
        "",
        "services.web.deploy.resources.limits.pids: not carried (the bundle format has no equivalent)",
    ),
    (
        "image: app:${TAG:-1}",
        "",
        "services.web.image: contains ${TAG:-1} interpolation, which dabctl does not perform (resolve it first, e.g. "
        "with `docker compose config`)",
    ),
    (
        "",
        "networks:\n  default:\n    driver: overlay\n",
        "networks.default.driver: driver overlay not carried (overlay needs Swarm mode; dabctl connects the nodes' bridge "
        "networks itself)",
    ),
    (
        "",
        "networks:\n  default:\n    name: shop\n",
        "networks.default.name: not carried (dabctl names stack networks <stack>_<network>)",
    ),
    (
        "",
        "volumes:\n  data:\n    driver: nfs\n",
        "volumes.data.driver: not carried (Docker creates named volumes with the local driver; create it on each node "
        "first)",
    ),
    (
        "",
        "volumes:\n  data:\n    name: shop-data\n",
        "volumes.data.name: not carried (dabctl names stack volumes <stack>_<volume>; for a volume outside the stack, "
        "add external: true)",
    ),
    (
        "",
        "secrets:\n  token:\n    file: ./token\n",
        "secrets: not carried (bundles have no secrets; bind-mount the file from the host instead)",
    ),
]


@pytest.mark.parametrize(("body", "rest", "line"), DROPPED, ids=[d[2].split(":")[0] for d in DROPPED])
def test_dropped_keys_are_reported(body: str, rest: str, line: str) -> None:
    assert line in web(body, rest).dropped


@pytest.mark.parametrize(
    "key",
    [
        "build",
        "depends_on",
        "container_name",
        "links",
        "secrets",
        "configs",
        "extra_hosts",
        "cap_add",
        "privileged",
        "logging",
        "expose",
        "network_mode",
        "profiles",
        "ulimits",
        "sysctls",
        "hostname",
        "read_only",
        "shm_size",
    ],
)
def test_every_unsupported_service_key_gets_one_line(key: str) -> None:
    lines = [line for line in web(f"{key}: x").dropped if line.startswith(f"services.web.{key}")]
    assert len(lines) == 1 and lines[0].startswith(f"services.web.{key}: not carried ("), lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: '3.8'\nname: shop\nservices:\n  web:\n    image: app:1\n", []),
        ("x-common: {a: 1}\nservices:\n  web:\n    image: app:1\n    x-note: ${NOT_INTERPOLATED}\n", []),
        ("services:\n  web:\n    image: app:1\n    restart: on-failure\n    deploy: {x-tuning: 1}\n", []),
        ("services:\n  web:\n    image: app:1\nvolumes:\n  data:\n  logs: {}\n", []),
        # A key that is not carried is reported once, not again for the interpolation in its value.
        ("services:\n  web:\n    image: app:1\n    build: ${CONTEXT}\n", [DROPPED[0][2]]),
    ],
    ids=["version and name", "x- extensions", "restart is carried", "plain volumes", "one line per dropped key"],
)
def test_only_what_is_lost_is_reported(text: str, expected: list[str]) -> None:
    assert convert(text).dropped == expected


ERRORS = [
    # (file text, the field named, a piece of the message or fix)
    ("services:\n  web:\n    build: .\n", "services.web", "has build but no image; add image:"),
    ("services:\n  web:\n    command: sleep 1\n", "services.web", "has no image; add image: the image to run"),
    ("services:\n  my.web:\n    image: app:1\n", "services.my.web", "invalid service name 'my.web' for a bundle"),
    (
        "services:\n  web:\n    image: app:1\n    networks: [front.end]\n",
        "services.web.networks[0]",
        "invalid network name 'front.end'",
    ),
    (
        "services:\n  web:\n    image: app:1\n    ports: ['8080-8082:80-81']\n",
        "services.web.ports[0]",
        "do not pair with container ports",
    ),
    ("services:\n  web:\n    image: app:1\n    ports: ['http']\n", "services.web.ports[0]", "invalid port"),
    ("services:\n  web:\n    image: app:1\n    ports: ['70000:80']\n", "services.web.ports[0]", "not a valid port"),
    ("services:\n  web:\n    image: app:1\n    command: echo 'unclosed\n", "services.web.command", "close the quote"),
    ("services:\n  web:\n    image: app:1\n    restart: sometimes\n", "services.web.restart", "not a restart policy"),
    ("services:\n  web:\n    image: app:1\n    pull_policy: often\n", "services.web.pull_policy", "not a pull policy"),
    (
        "services:\n  web:\n    image: app:1\n    healthcheck: {test: 'true', interval: soon}\n",
        "services.web.healthcheck.interval",
        "invalid duration 'soon'",
    ),
    (
        "services:\n  web:\n    image: app:1\n    deploy: {resources: {limits: {memory: 1k}}}\n",
        "services.web.deploy.resources.limits.memory",
        "at least 6M",
    ),
    ("services:\n  web:\n    image: app:1\n    mem_limit: 1.5g\n", "services.web.mem_limit", "invalid memory size"),
    (
        "services:\n  web:\n    image: app:1\n    deploy: {mode: global, replicas: 2}\n",
        "services.web.deploy",
        "Replicas applies to replicated services only",
    ),
    (
        "services:\n  web:\n    image: app:1\n    deploy: {replicas: '${N}'}\n",
        "services.web.deploy.replicas",
        "resolve it first, e.g. with `docker compose config`",
    ),
    (
        "services:\n  web:\n    image: app:1\n    volumes: ['data:relative']\n",
        "services.web.volumes[0]",
        "must be an absolute path",
    ),
    (
        "services:\n  web:\n    image: app:1\n    volumes: [{source: data, target: /data}]\n",
        "services.web.volumes[0]",
        "add type:",
    ),
    ("services:\n  web:\n    image: app:1\n    environment: [1]\n", "services.web.environment[0]", "expected a string"),
    ("services:\n  web:\n    image: app:1\n    deploy: 3\n", "services.web.deploy", "expected a mapping"),
    (
        "services:\n  a:\n    image: app:1\n    ports: ['80:80']\n  b:\n    image: app:1\n    ports: ['80:8080']\n",
        "",
        "PublishedPort 80/tcp is used by both 'a' and 'b'",
    ),
    ("services: {}\n", "services", "no services"),
    ("networks: {}\n", "services", "no services"),
    ("- just\n- a list\n", "", "expected a mapping"),
]


@pytest.mark.parametrize(("text", "field", "part"), ERRORS, ids=[f"{e[1] or 'file'}: {e[2]}" for e in ERRORS])
def test_errors_name_the_compose_field(text: str, field: str, part: str) -> None:
    lines = errors(text)
    prefix = f"{FILE}: {field}: " if field else f"{FILE}: "
    assert any(line.startswith(prefix) and part in line for line in lines), lines


@pytest.mark.parametrize(
    ("text", "where", "part"),
    [
        ("services:\n  web:\n    image: [app\n", f"{FILE}:4:1:", "invalid YAML"),
        ("services:\n  web:\n    image: a\n    image: b\n", f"{FILE}:4:5:", "key 'image' appears twice"),
        ("services:\n  web: !!python/object:os.system {}\n", f"{FILE}:2:8:", "no tags"),
        ("services: {}\n---\nservices: {}\n", f"{FILE}:", "2 YAML documents"),
        ("# nothing\n", f"{FILE}:", "the file is empty"),
    ],
    ids=["syntax", "duplicate key", "tag", "two documents", "empty"],
)
def test_yaml_errors_give_the_line(text: str, where: str, part: str) -> None:
    [line] = errors(text)
    assert line.startswith(where) and part in line, line


def test_sample_converts() -> None:
    conv = convert_compose(SAMPLE.read_text(), str(SAMPLE))
    assert sorted(conv.bundle.services) == ["redis", "web", "worker"]
    assert conv.dropped == [
        "services.web.build: not carried (bundles deploy prebuilt images; build and push it, then set image)",
        "services.web.depends_on: not carried (dabctl starts services independently; make each service retry what it "
        "depends on)",
        "services.worker.depends_on: not carried (dabctl starts services independently; make each service retry what "
        "it depends on)",
    ]
    web_service = conv.bundle.services["web"]
    assert web_service.deploy.replica_count == 2
    assert web_service.ports is not None and web_service.ports[0].published_port == 8080
    assert conv.bundle.networks is not None and conv.bundle.networks["back"].internal


RICH = """\
services:
  api:
    image: registry.example.com/api:2.1
    entrypoint: ["/bin/api"]
    command: --listen :8080
    environment: {A: 1, B: null}
    labels: [team=shop]
    ports: ["8080:8080", "9090/udp"]
    working_dir: /srv
    user: nobody
    networks: {front: null}
    volumes: ["data:/data:ro", "/etc/ssl:/etc/ssl", {type: tmpfs, target: /run}]
    healthcheck: {test: ["CMD", "/bin/api", "ping"], interval: 1m30s, timeout: 5s, retries: 2, start_period: 0s}
    stop_grace_period: 30s
    stop_signal: SIGQUIT
    pull_policy: always
    deploy:
      mode: global
      update_config: {parallelism: 0, delay: 1s, failure_action: continue, monitor: 1m, max_failure_ratio: 0.5}
      rollback_config: {order: start-first}
      restart_policy: {condition: any, delay: 10s, window: 1m}
      placement: {constraints: [node.labels.edge == true], max_replicas_per_node: 1}
      resources: {limits: {cpus: 0.75, memory: 1G}, reservations: {cpus: 0.1, memory: 128M}}
networks:
  front: {labels: {tier: edge}}
  outside: {external: true}
"""


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE.read_text(),
        RICH,
    ],
    ids=["sample", "many fields"],
)
def test_round_trip(text: str) -> None:
    conv = convert_compose(text, FILE)
    assert Bundle.model_validate_json(conv.bundle.model_dump_json(exclude_defaults=True)) == conv.bundle
