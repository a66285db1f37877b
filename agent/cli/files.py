"""Commands on files alone: `validate`, `schema`, `bundle` (Compose conversion). Nothing is contacted."""

from __future__ import annotations

import json
from pathlib import Path

import click

from agent.cli.options import UserError, load
from agent.config import policy_of
from bundles import InvalidBundles, load_paths
from bundles.policy import enforce
from schemas.bundle import Bundle
from schemas.config import AgentConfig


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def validate(paths: tuple[Path, ...], config_path: Path | None) -> None:
    """Check bundle files or directories; print every problem, one line each.

    Exit 0 when all are valid, 1 otherwise. Nothing is contacted or changed.
    """
    cfg = load(config_path)
    try:
        state = enforce(load_paths(list(paths)), policy_of(cfg))
    except InvalidBundles as exc:
        for e in exc.errors:
            click.echo(str(e), err=True)
        raise UserError(f"{len(exc.errors)} problem(s) found") from None
    for name, stack in sorted(state.stacks.items()):
        services = len(stack.bundle.services)
        click.echo(f"ok  {stack.file}: stack {name}, {services} service(s)")


@click.command()
@click.argument("kind", type=click.Choice(["bundle", "config"]), default="bundle")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def schema(kind: str, config_path: Path | None) -> None:
    """Print the JSON Schema of a bundle file (default) or of the agent config."""
    model = Bundle if kind == "bundle" else AgentConfig
    click.echo(json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True))


@click.command()
@click.argument("compose_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bundle here (default: standard output).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="Agent config YAML.")
def bundle(compose_file: Path, out: Path | None, config_path: Path | None) -> None:
    """Convert a Compose file to a bundle; report every Compose key it could not carry."""
    from bundles.compose import convert_compose

    load(config_path)
    try:
        text = compose_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{compose_file}: cannot read: {exc}") from None
    try:
        conv = convert_compose(text, str(compose_file))
    except InvalidBundles as exc:
        for e in exc.errors:
            click.echo(str(e), err=True)
        raise UserError(f"{compose_file}: cannot convert") from None
    for line in conv.dropped:
        click.echo(f"warning: {line}", err=True)
    doc = json.dumps(conv.bundle.model_dump(mode="json", exclude_defaults=True), indent=2) + "\n"
    if out is None:
        click.echo(doc, nl=False)
    else:
        out.write_text(doc, encoding="utf-8")
        click.echo(f"wrote {out} ({len(conv.bundle.services)} services)", err=True)
