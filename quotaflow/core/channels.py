"""Where alerts are delivered: the channels of QUOTAFLOW_ALERT_CHANNELS, a JSON object of
channel name -> channel, checked when the settings load (quotaflow/core/settings.py).

    {"ops-mail":  {"type": "email", "to": ["ops@example.com"]},
     "acme-hook": {"type": "webhook", "org": "acme", "url": "https://acme.example/hooks",
                   "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
     "ops-slack": {"type": "slack", "url": "https://hooks.slack.com/services/T000/B000/XXXX"}}

Rules name channels (schemas/alert_rules.py), so the secrets here (webhook secrets, Slack
URLs, which are credentials, SMTP passwords in QUOTAFLOW_SMTP_URL) stay in the
configuration: never on Kafka, and registered with quotaflow/core/redact.py so that no log
line, error or metric shows them. A channel belongs to an org (``org``) or to the operators
(``"*"``, the default): an org's rules may use its own channels and the operators', a
global rule only the operators'.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

OPERATORS = "*"
CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # as schemas/alert_rules.py CHANNEL_NAME_PATTERN
_ORG = r"^(?:[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}|\*)$"  # an org id (schemas/ids.py) or the operators
_EMAIL = re.compile(r"^[^@\s<>,;\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}$")
WEBHOOK_SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64  # the Standard Webhooks spec's bounds


def _http_url(url: str, schemes: tuple[str, ...]) -> str:
    # The messages never repeat the URL: a Slack URL is a credential.
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        raise ValueError("not a URL (its port must be a number from 0 to 65535)") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be an {' or '.join(schemes)} URL with a host")
    return url


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    org: Annotated[str, Field(pattern=_ORG)] = OPERATORS
    timeout_s: float | None = Field(None, gt=0, le=120, description="per attempt; default QUOTAFLOW_ALERT_TIMEOUT_S")
    attempts: int | None = Field(None, ge=1, le=20, description="default QUOTAFLOW_ALERT_ATTEMPTS")

    def secrets(self) -> list[str]:
        return []


class EmailChannel(_Channel):
    type: Literal["email"]
    to: Annotated[tuple[str, ...], Field(min_length=1, max_length=50)]

    @field_validator("to")
    @classmethod
    def _addresses(cls, to: tuple[str, ...]) -> tuple[str, ...]:
        for n, address in enumerate(to, 1):
            if not _EMAIL.fullmatch(address):
                raise ValueError(f"address #{n} is not an email address (name@domain)")
        return to


class WebhookChannel(_Channel):
    type: Literal["webhook"]
    url: str
    secret: str

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _http_url(url, ("https", "http"))

    @field_validator("secret")
    @classmethod
    def _secret(cls, secret: str) -> str:
        problem = (f"must be {WEBHOOK_SECRET_PREFIX} followed by {SECRET_MIN_BYTES}-{SECRET_MAX_BYTES} bytes in "
                   "base64 (Standard Webhooks)")
        if not secret.startswith(WEBHOOK_SECRET_PREFIX):
            raise ValueError(problem)
        try:
            key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(problem) from None
        if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
            raise ValueError(problem)
        return secret

    def secrets(self) -> list[str]:
        return [self.secret, self.secret[len(WEBHOOK_SECRET_PREFIX):]]


class SlackChannel(_Channel):
    """A Slack incoming webhook: its URL is its credential."""

    type: Literal["slack"]
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _http_url(url, ("https", "http"))

    def secrets(self) -> list[str]:
        path = urlsplit(self.url).path
        return [self.url, path] + ([path.rsplit("/", 1)[-1]] if "/" in path.strip("/") else [])


Channel = Annotated[Union[EmailChannel, WebhookChannel, SlackChannel], Field(discriminator="type")]


def check_names(channels: dict[str, object]) -> None:
    for n, name in enumerate(channels, 1):
        if not CHANNEL_NAME.fullmatch(name):
            raise ValueError(f"channel #{n}: a channel name is 1-64 lower-case letters, digits and _.- starting "
                             "with a letter or digit")
