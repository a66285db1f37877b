"""Agent configuration: default < file < DABCTL_* environment < flags; every error is one line naming its source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from schemas.config import AgentConfig

NO_FLAGS: dict[str, Any] = {}


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    cfg = load_config(None, NO_FLAGS, environ={})
    assert cfg == AgentConfig.model_validate({})
    assert (cfg.source, cfg.state_dir, cfg.node_name, cfg.docker_host, cfg.parallelism, cfg.allow_empty) == (
        None,
        "/var/lib/dabctl",
        None,
        None,
        8,
        False,
    )
    assert cfg.state_path == Path("/var/lib/dabctl")


def test_unrelated_environment_is_ignored() -> None:
    cfg = load_config(None, NO_FLAGS, environ={"HOME": "/root", "DOCKER_HOST": "unix:///x", "DABCTLX": "1"})
    assert cfg == AgentConfig.model_validate({})


def test_file_values(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        "source: /srv/stacks\nstate_dir: /tmp/dab\nnode_name: n1\nparallelism: 4\nallow_empty: true\n",
    )
    cfg = load_config(path, NO_FLAGS, environ={})
    assert (cfg.source, cfg.state_dir, cfg.node_name, cfg.parallelism, cfg.allow_empty) == (
        "/srv/stacks",
        "/tmp/dab",
        "n1",
        4,
        True,
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(config_file(tmp_path, text), NO_FLAGS, environ={}) == AgentConfig.model_validate({})


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = config_file(tmp_path, "node_name: from-file\n")
    cfg = load_config(None, NO_FLAGS, environ={"DABCTL_CONFIG": str(path)})
    assert cfg.node_name == "from-file"


@pytest.mark.parametrize(
    ("file_text", "environ", "flags", "expected"),
    [
        pytest.param("state_dir: /file\n", {}, {}, "/file", id="file"),
        pytest.param("state_dir: /file\n", {"DABCTL_STATE_DIR": "/env"}, {}, "/env", id="env-over-file"),
        pytest.param("", {"DABCTL_STATE_DIR": "/env"}, {}, "/env", id="env-over-default"),
        pytest.param(
            "state_dir: /file\n", {"DABCTL_STATE_DIR": "/env"}, {"state_dir": "/flag"}, "/flag", id="flag-over-env"
        ),
        pytest.param("state_dir: /file\n", {}, {"state_dir": "/flag"}, "/flag", id="flag-over-file"),
        pytest.param("state_dir: /file\n", {"DABCTL_STATE_DIR": "/env"}, {"state_dir": None}, "/env", id="unset-flag"),
    ],
)
def test_precedence(
    tmp_path: Path, file_text: str, environ: dict[str, str], flags: dict[str, Any], expected: str
) -> None:
    cfg = load_config(config_file(tmp_path, file_text), flags, environ=environ)
    assert cfg.state_dir == expected


@pytest.mark.parametrize(
    ("environ", "field", "value"),
    [
        ({"DABCTL_PARALLELISM": "4"}, "parallelism", 4),
        ({"DABCTL_ALLOW_EMPTY": "true"}, "allow_empty", True),
        ({"DABCTL_SOURCE": "/srv/stacks"}, "source", "/srv/stacks"),
        ({"DABCTL_DOCKER_HOST": "unix:///run/docker.sock"}, "docker_host", "unix:///run/docker.sock"),
        ({"DABCTL_NODE_NAME": "node-a"}, "node_name", "node-a"),
    ],
)
def test_environment_values(environ: dict[str, str], field: str, value: Any) -> None:
    assert getattr(load_config(None, NO_FLAGS, environ=environ), field) == value


@pytest.mark.parametrize(
    ("environ", "field", "value"),
    [
        pytest.param({"DABCTL_NODE_NAME": "1"}, "node_name", "1", id="numeric-node-name"),
        pytest.param({"DABCTL_NODE_NAME": "0042"}, "node_name", "0042", id="zero-padded-node-name"),
        pytest.param({"DABCTL_STATE_DIR": "~"}, "state_dir", "~", id="tilde-state-dir"),
    ],
)
def test_environment_text_settings_stay_text(environ: dict[str, str], field: str, value: str) -> None:
    # An environment variable is a string; a text setting must not turn into a YAML int, null or bool.
    assert getattr(load_config(None, NO_FLAGS, environ=environ), field) == value


def test_unknown_key_in_file_names_file_and_field(tmp_path: Path) -> None:
    path = config_file(tmp_path, "state_dir: /x\nparalelism: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_FLAGS, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: paralelism: ")
    assert "remove it" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_removed_cluster_insecure_is_refused_with_a_pointer_to_cluster_init(tmp_path: Path, value: str) -> None:
    path = config_file(tmp_path, f"state_dir: /x\ncluster_insecure: {value}\n")
    for where, call in (
        (f"{path}: cluster_insecure: ", lambda: load_config(path, NO_FLAGS, environ={})),
        (
            "environment variable DABCTL_CLUSTER_INSECURE: ",
            lambda: load_config(None, NO_FLAGS, environ={"DABCTL_CLUSTER_INSECURE": value}),
        ),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert message.startswith(where), message
        assert "removed" in message and "`dabctl cluster init`" in message, message
        assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("state_dir: [unclosed\n", "invalid YAML"),
        ("state_dir: /x\n  bad: indentation\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("just a string\n", "expected a mapping"),
        ("parallelism: many\n", "parallelism"),
        ("parallelism: 0\n", "parallelism"),
        ("state_dir: 5\n", "state_dir"),
        ("state_dir: !!python/object:os.system {}\n", "invalid YAML"),
    ],
)
def test_bad_file_is_one_line_naming_it(tmp_path: Path, text: str, fragment: str) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_FLAGS, environ={})
    message = str(info.value)
    assert re.match(re.escape(str(path)) + r"(:\d+){0,2}: ", message), message  # file[:line[:col]]: ...
    assert fragment in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml", NO_FLAGS, environ={})


@pytest.mark.parametrize("name", ["DABCTL_STATEDIR", "DABCTL_FOO", "DABCTL_"])
def test_unknown_environment_variable(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, NO_FLAGS, environ={name: "x"})
    message = str(info.value)
    assert name in message
    assert "DABCTL_STATE_DIR" in message  # the valid ones are listed
    assert "\n" not in message


def test_invalid_environment_value_names_the_variable(tmp_path: Path) -> None:
    # The file is fine; the error is in the environment, and the message must send the operator there.
    path = config_file(tmp_path, "state_dir: /x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_FLAGS, environ={"DABCTL_PARALLELISM": "0"})
    assert "DABCTL_PARALLELISM" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("32767-30000", "'32767-30000' is not a range of ports: write low-high with 1 <= low <= high <= 65535"),
        ("0-10", "'0-10' is not a range of ports"),
        ("30000-70000", "'30000-70000' is not a range of ports"),
        ("30000", "String should match pattern"),
    ],
)
def test_a_bad_published_port_range_is_one_line_naming_the_setting(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, environ={"DABCTL_PUBLISHED_PORT_RANGE": raw})
    assert "published_port_range" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_published_port_range_and_balancer_have_defaults_and_overrides() -> None:
    cfg = load_config(None, {}, environ={})
    assert (cfg.loadbalancer, cfg.port_range) == ("auto", (30000, 32767))
    cfg = load_config(None, {}, environ={"DABCTL_LOADBALANCER": "none", "DABCTL_PUBLISHED_PORT_RANGE": "8000-8099"})
    assert (cfg.loadbalancer, cfg.port_range) == ("none", (8000, 8099))
