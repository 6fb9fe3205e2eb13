"""What the processor counts: subjects, each an API key or an org (all its keys), and
the key of each subject's counts in the processor's table (window_counts.SubjectState).

(Not to be confused with the analytics API's scopes, which say which tenant a caller
may read.) The table keys are stored in the table's changelog: they cannot change
without a migration of it.
"""

from __future__ import annotations

KEY_SUBJECT = "k/"  # prefix of the table keys of API keys
ORG_SUBJECT = "o/"  # prefix of the table keys of orgs


def key_subject(org_id: str, api_key_id: str) -> str:
    """Table key of a key's counts: keys of different orgs may share an id. Ids cannot
    hold '/' (schemas/ids.py), so the two parts never run into each other."""
    return f"{KEY_SUBJECT}{org_id}/{api_key_id}"


def org_subject(org_id: str) -> str:
    """Table key of an org's counts."""
    return ORG_SUBJECT + org_id


def is_key_subject(table_key: str) -> bool:
    return table_key.startswith(KEY_SUBJECT)
