"""Paths to route templates: the configured templates first (QUOTAFLOW_SHIP_ROUTES, first
match wins), else the path with its id-like segments replaced by {id}, as the gateway
does (schemas/endpoints.py). Either way what comes out is an endpoint the event schema
takes: a raw id never becomes an endpoint."""

from __future__ import annotations

import re
from typing import Iterable

from quotaflow.schemas.endpoints import fit_endpoint
from quotaflow.schemas.event_fields import FIELDS

_ENDPOINT_FIELD = next(f for f in FIELDS if f.name == "endpoint")
_PARAM = re.compile(r"\{[^{}/]*\}")
CACHE_ENTRIES = 65536  # paths seen, with their endpoints; cleared when full (raw ids make paths many)


class RouteMap:
    def __init__(self, templates: Iterable[str] = ()):
        self.templates = tuple(templates)
        alternatives = []
        for i, template in enumerate(self.templates):
            problem = _ENDPOINT_FIELD.error(template)
            if problem is not None:
                # the rule, not the value (a setting's value is never repeated)
                raise ValueError(f"#{i + 1}: {problem.removeprefix('endpoint: ').rsplit(', got ', 1)[0]}")
            alternatives.append(f"(?P<r{i}>{_regex(template)})")
        # One pass over a path whatever the number of templates; lastgroup names the first
        # alternative that matched (the leftmost wins, as in the list).
        self._match = re.compile("|".join(alternatives)).fullmatch if alternatives else None
        self._cache: dict[str, tuple[str, bool]] = {}

    def endpoint(self, path: str) -> tuple[str, bool]:
        """(endpoint, normalised): the template the path matches (not normalised), else
        the path fitted to the schema (normalised when that changed it)."""
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        answer = self._resolve(path)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[path] = answer
        return answer

    def _resolve(self, path: str) -> tuple[str, bool]:
        if self._match is not None:
            m = self._match(path)
            if m is not None:
                return self.templates[int(m.lastgroup[1:])], False
        fitted = fit_endpoint(path)
        return fitted, fitted != path


def _regex(template: str) -> str:
    """A template as a regular expression: each {name} one whole path segment."""
    out, at = [], 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[at:m.start()]))
        out.append("[^/]+")
        at = m.end()
    out.append(re.escape(template[at:]))
    return "".join(out)
