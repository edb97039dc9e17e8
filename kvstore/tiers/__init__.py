"""Storage tiers behind one interface, and the manager that moves chunks between them."""

from kvstore.tiers.base import Entry, Tier, TierCapabilities
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.manager import TierManager

__all__ = ["DiskTier", "DramTier", "Entry", "Tier", "TierCapabilities", "TierManager"]
