"""Host memory: extent allocation and the page-aligned (optionally pinned) arena."""

from kvstore.memory.allocator import ExtentAllocator
from kvstore.memory.arena import Allocation, Arena, aligned_buffer

__all__ = ["Allocation", "Arena", "ExtentAllocator", "aligned_buffer"]
