from .kv_cache import CacheOverflowError, KVCache
from .paged_cache import PagedKVCache, PagedStep

__all__ = ["CacheOverflowError", "KVCache", "PagedKVCache", "PagedStep"]
