"""Who is asking: a caller is scoped to one org, or to every org (operators).

Tenant isolation is enforced in the query layer (analytics/queries.py): every query
is built from a Scope, and a scoped caller's org is always a bound condition of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from quotaflow.core.tokens import ALL_ORGS, owner


class Forbidden(PermissionError):
    pass


@dataclass(frozen=True, slots=True)
class Scope:
    org_id: str | None  # None: every org

    @classmethod
    def org(cls, org_id: str) -> "Scope":
        if not org_id or org_id == ALL_ORGS:
            raise ValueError("an org scope needs an org id")
        return cls(org_id)

    @classmethod
    def operator(cls) -> "Scope":
        return cls(None)

    def org_filter(self, requested: str | None) -> str | None:
        """The org the query is restricted to: the caller's own, or for an operator
        the one asked for (None: every org). Asking for another org is refused."""
        if self.org_id is None:
            return requested
        if requested is not None and requested != self.org_id:
            raise Forbidden("this token may only read its own org")
        return self.org_id


def scope_for_token(token: str | None, tokens: dict[str, str]) -> Scope | None:
    """The scope of a bearer token, or None if it is not one of ours (compared in
    constant time: quotaflow/core/tokens.py)."""
    found = owner(token or "", tokens)
    if found is None:
        return None
    return Scope.operator() if found[1] == ALL_ORGS else Scope.org(found[1])
