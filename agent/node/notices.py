"""What the agent tells its notification sinks: sinks from the config, and an observation of the agent per pass."""

from __future__ import annotations

from collections.abc import Mapping

from agent.config import ConfigError
from agent.notify.dispatch import Route
from agent.notify.events import EventKind, Failure, Observed, RolloutSeen
from agent.notify.sinks import AppriseSink, SlackSink, WebhookSink
from agent.sources.source import read_secret
from agent.state.records import Records
from bundles import DesiredState
from schemas.config import NotifySink


def routes(sinks: list[NotifySink]) -> list[Route]:
    """The config's sinks, ready to send; ConfigError (one line naming the sink) when one cannot be built."""
    out = []
    for i, cfg in enumerate(sinks):
        name = cfg.name or f"notify[{i}] ({cfg.kind})"
        url = cfg.url or read_secret(cfg.url_file, cfg.url_env)
        if not url:
            raise ConfigError(f"{name}: the URL is empty: set url, url_file or url_env")
        sink: WebhookSink | SlackSink | AppriseSink
        if cfg.kind == "webhook":
            secret = read_secret(cfg.secret_file, cfg.secret_env)
            if (cfg.secret_file or cfg.secret_env) and not secret:
                raise ConfigError(f"{name}: the signing secret is empty: write one or remove secret_file/secret_env")
            sink = WebhookSink(name, url, secret.encode() if secret else None)
        elif cfg.kind == "slack":
            sink = SlackSink(name, url)
        else:
            try:
                sink = AppriseSink(name, url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        out.append(Route(sink, frozenset(EventKind(e) for e in cfg.events)))
    return out


def observe(
    records: Records,
    errors: Mapping[str, str],
    details: Mapping[str, tuple[str, str]],
    desired: DesiredState | None,
) -> Observed:
    """Rollouts and pins from the state, failures from the agent (`details`: stack -> file, field)."""
    failures = {}
    for stack, message in errors.items():
        file, fld = details.get(stack, (None, None))
        failures[stack] = Failure(message, file or None, fld or None)
    return Observed(
        rollouts={key: RolloutSeen(r.target, r.state, r.rollback, r.reason) for key, r in records.rollouts().items()},
        failures=failures,
        pins={stack: p.revision for stack, p in records.pins().items()},
        revisions={name: s.revision for name, s in desired.stacks.items()} if desired else {},
    )
