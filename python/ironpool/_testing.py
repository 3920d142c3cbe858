"""What ironpool's tests read to prove that nothing leaked: this process's
shared-memory counters. Not part of the API; kept out of ``ironpool``."""

from ._core import live_mappings, open_segments
from ._shared_memory import stats as shared_memory_stats

__all__ = ["live_mappings", "open_segments", "shared_memory_stats"]
