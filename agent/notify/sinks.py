"""Where events go: a generic JSON webhook signed with HMAC-SHA256, a Slack-compatible webhook, and Apprise."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Protocol

import requests

from agent.notify.events import Event
from schemas.errors import DabctlError

SIGNATURE_HEADER = "X-Dabctl-Signature-256"  # sha256=<hex HMAC-SHA256 of the body with the sink's secret>
EVENT_HEADER = "X-Dabctl-Event"
DELIVERY_HEADER = "X-Dabctl-Delivery"  # one id per event, the same on every retry: receivers may de-duplicate


class DeliveryFailed(DabctlError):
    """A sink did not take an event (no answer, a 5xx, 408 or 429): tried again with backoff."""

    retryable = True


class DeliveryRefused(DeliveryFailed):
    """A sink refused an event for good (a 4xx other than 408 and 429): not tried again."""

    retryable = False


class Sink(Protocol):
    name: str

    def send(self, event: Event, delivery: str) -> None:
        """Deliver one event (raise DeliveryFailed when it was not taken)."""


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _post(sink: WebhookSink | SlackSink, body: bytes, headers: dict[str, str]) -> None:
    name = sink.name
    try:
        response = sink.session.post(sink.url, data=body, headers=headers, timeout=sink.timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise DeliveryFailed(f"{name}: {type(exc).__name__}") from None
    if 200 <= response.status_code < 300:
        return
    if response.status_code in (408, 429) or response.status_code >= 500:
        raise DeliveryFailed(f"{name}: HTTP {response.status_code}")
    raise DeliveryRefused(f"{name}: HTTP {response.status_code}")


class WebhookSink:
    """POST the event as JSON; with a secret, the body's HMAC-SHA256 in X-Dabctl-Signature-256."""

    def __init__(self, name: str, url: str, secret: bytes | None = None, timeout: float = 10.0) -> None:
        self.name = name
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"WebhookSink({self.name!r})"  # never the URL (it may hold a token) nor the secret

    def send(self, event: Event, delivery: str) -> None:
        body = event.model_dump_json().encode()
        headers = {"Content-Type": "application/json", EVENT_HEADER: event.event.value, DELIVERY_HEADER: delivery}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        _post(self, body, headers)


def slack_text(event: Event) -> str:
    """The event as one Slack message (mrkdwn)."""
    lines = [f"*{event.title()}*", event.message]
    if event.file:
        lines.append(f"file `{event.file}`" + (f", field `{event.field}`" if event.field else ""))
    if event.revision:
        lines.append(f"revision `{event.revision}`")
    return "\n".join(lines)


class SlackSink:
    """A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, Discord's /slack endpoint)."""

    def __init__(self, name: str, url: str, timeout: float = 10.0) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"SlackSink({self.name!r})"

    def send(self, event: Event, delivery: str) -> None:
        body = json.dumps({"text": slack_text(event)}).encode()
        _post(self, body, {"Content-Type": "application/json"})


class AppriseSink:
    """Apprise's services (e-mail, Matrix, Telegram, ntfy, Pushover, ...) from one Apprise URL."""

    def __init__(self, name: str, url: str) -> None:
        import apprise  # only an agent that configures an Apprise sink pays for importing it

        self.name = name
        self._apprise = apprise.Apprise()
        if not self._apprise.add(url):
            raise ValueError(f"{name}: Apprise does not understand this URL; see the Apprise wiki for its services")

    def __repr__(self) -> str:
        return f"AppriseSink({self.name!r})"

    def send(self, event: Event, delivery: str) -> None:
        if not self._apprise.notify(title=event.title(), body=slack_text(event).replace("*", "")):
            raise DeliveryFailed(f"{self.name}: Apprise could not deliver")


def new_delivery() -> str:
    return uuid.uuid4().hex
