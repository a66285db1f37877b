"""The CLI's contract without an engine: help, exit codes (0, 1, and 2 only for plan's pending changes), validate, schema, bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DABCTL = str(Path(sys.executable).parent / "dabctl")
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "validate",
    "schema",
    "bundle",
    "plan",
    "reconcile",
    "ps",
    "history",
    "rollback",
    "status",
    "logs",
    "suspend",
    "resume",
    "agent",
]

pytestmark = pytest.mark.timeout(60)


def dabctl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DABCTL_")}
    return subprocess.run([DABCTL, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_explains_every_command(command: list[str]) -> None:
    result = dabctl(*command, "--help")
    assert result.returncode == 0
    assert "Usage: dabctl" in result.stdout
    if command:
        assert "--config" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--no-such-flag"],
        ["no-such-command"],
        ["validate"],  # missing argument
        ["plan", "--output", "yaml"],  # bad choice
        ["reconcile", "--source", "x"],  # --once is required
    ],
)
def test_usage_errors_exit_1_not_2(args: list[str]) -> None:
    result = dabctl(*args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_node_commands_explain_themselves_and_exit_1_on_usage_errors() -> None:
    helped = dabctl("node", "--help")
    assert helped.returncode == 0 and all(f"  {sub} " in helped.stdout for sub in ("ls", "inspect", "update", "rm"))
    bad = dabctl("node", "update", "n1", "--availability", "bogus")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "bogus" in bad.stderr


def test_validate_samples_exit_0() -> None:
    result = dabctl("validate", "samples/stacks", "samples/public")
    assert result.returncode == 0, result.stderr
    assert "stack web-shop" in result.stdout and "stack voting-app" in result.stdout


BROKEN = {
    "misspelt.dab": (
        '{"Services": {"web": {"Imag": "x"}}}',
        "misspelt.dab: Services.web.Imag: unknown field; did you mean 'Image'?",
    ),
    "wrongtype.dab": (
        '{"Services": {"web": {"Image": "x", "Deploy": {"Replicas": "3"}}}}',
        "wrongtype.dab: Services.web.Deploy.Replicas: expected an integer, got string '3'",
    ),
    "port.dab": (
        '{"Services": {"web": {"Image": "x", "Ports": [{"Port": 70000}]}}}',
        "port.dab: Services.web.Ports[0].Port: 70000 is not a valid port; use a port from 1 to 65535",
    ),
    "syntax.dab": ('{"Services": {\n  "web": {"Image": "x",}}}', "syntax.dab:2:24: invalid JSON"),
}


def test_validate_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    for name, (text, _) in BROKEN.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "port.yaml").write_text("Services: {web: {Image: x}}\n")  # duplicate stack "port"
    result = dabctl("validate", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    for _, expected in BROKEN.values():
        assert any(expected in line for line in lines), (expected, lines)
    assert any("stack 'port' is also defined by" in line for line in lines)
    assert len(lines) == len(BROKEN) + 2  # one per problem, plus the count


def test_schema_matches_committed_copy() -> None:
    result = dabctl("schema", "bundle")
    assert result.returncode == 0
    committed = json.loads((ROOT / "schemas" / "bundle.schema.json").read_text())
    assert json.loads(result.stdout) == committed, "run: dabctl schema bundle > schemas/bundle.schema.json"


def test_bad_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("state_dir: /tmp/x\nparalelism: 3\n")
    result = dabctl("plan", "--config", str(cfg), "--source", "samples/stacks")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {cfg}: paralelism: Extra inputs are not permitted; remove it"


def test_bundle_converts_the_sample_compose_file(tmp_path: Path) -> None:
    out = tmp_path / "app.dab"
    result = dabctl("bundle", "samples/compose/docker-compose.yml", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr  # keys it could not carry are named, not dropped silently
    assert dabctl("validate", str(out)).returncode == 0


def test_validate_with_the_config_lists_every_refusal_before_an_upgrade(tmp_path: Path) -> None:
    def bind(source: str, **extra: object) -> dict[str, object]:
        return {"Type": "bind", "Source": source, "Target": "/m", **extra}

    hostile = {
        "containerd": [bind("/var/run/docker/containerd/containerd.sock")],
        "rundocker": [bind("/run/docker")],
        "etc": [bind("/etc")],
        "varlib": [bind("/var/lib/docker")],
        "state": [bind(str(tmp_path / "state"))],
        "conf": [bind(str(tmp_path / "conf" / "agent.yaml"))],
        "engine": [bind("/srv/engine.sock")],
        "prefix": [bind("/srv/data/../../etc/passwd")],
        "rw": [bind("/srv/certs")],
    }
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for name, mounts in hostile.items():
        doc = {"Services": {"s": {"Image": "x", "Mounts": mounts}}}
        (bundles / f"{name}.dab").write_text(json.dumps(doc))
    allowed = [
        bind("/var/run/docker.sock"),
        bind("/srv/data/x", Target="/n"),
        bind("/srv/certs/a", ReadOnly=True, Target="/o"),
    ]
    doc = {"Services": {"s": {"Image": "x", "Mounts": allowed}}}
    (bundles / "allowed.dab").write_text(json.dumps(doc))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "agent.yaml").write_text(
        f"state_dir: {tmp_path / 'state'}\ndocker_host: unix:///srv/engine.sock\n"
        "allow_bind_mounts: [/var/run/docker.sock, /srv, {path: /srv/certs, read_only: true}]\n"
    )
    result = dabctl("validate", "--config", str(conf / "agent.yaml"), str(bundles))
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: {len(hostile)} problem(s) found", lines
    rules = {
        "containerd": "no-docker-socket",
        "rundocker": "no-docker-socket",
        "etc": "no-host-system",
        "varlib": "no-docker-socket",
        "state": "no-dabctl-state",
        "conf": "no-dabctl-state",
        "engine": "no-docker-socket",
        "prefix": "no-host-system",
        "rw": "read-only-bind-mount",
    }
    for name, rule in rules.items():
        [line] = [line for line in lines if line.startswith(f"{bundles / name}.dab: ")]
        assert f"policy rule '{rule}'" in line, line
    assert not any("allowed.dab" in line for line in lines)
