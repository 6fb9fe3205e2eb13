"""The one rule for the ids that name tenants and their parts (org, API key, service).

Every entrance checks ids with it: events, gateway headers and arguments, query
filters, the CLI. An id accepted anywhere is then accepted everywhere, and since it
cannot hold ``{``, ``}``, ``/`` or spaces, no id can alias another inside a Redis key,
a table key or a log line.
"""

from __future__ import annotations

import re
import reprlib

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
ID_MAX = 64
ID_RULE = "1-64 characters of letters, digits and _.:- starting with a letter or digit"

_ID = re.compile(ID_PATTERN)
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


def show(value: object) -> str:
    """A value for an error message: its repr, cut short (bounded whatever the input)."""
    return _repr.repr(value)


class InvalidId(ValueError):
    """An id that breaks the rule; the message names the field and the rule."""


def is_valid_id(value: object) -> bool:
    return type(value) is str and len(value) <= ID_MAX and _ID.fullmatch(value) is not None


def id_error(name: str, value: object) -> str | None:
    """The error message for an id, or None when it is valid."""
    if is_valid_id(value):
        return None
    return f"{name}: must be {ID_RULE}, got {show(value)}"


def check_id(name: str, value: object) -> str:
    """The id, or InvalidId naming the field and the rule."""
    problem = id_error(name, value)
    if problem:
        raise InvalidId(problem)
    return value  # type: ignore[return-value]
