"""Subscription tier names. The limits of each tier are configuration of the
policy (schemas/limits.py); the names cross process boundaries (CLI,
Redis, gateways) and so live here."""

from enum import Enum


class Tier(str, Enum):
    FREE = "FREE"
    STARTER = "STARTER"
    PROFESSIONAL = "PROFESSIONAL"
    SCALE = "SCALE"
    ENTERPRISE = "ENTERPRISE"


DEFAULT_TIER = Tier.FREE
