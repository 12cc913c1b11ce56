from .paged_cache import PagedKVCache, PagedStep, bytes_per_block

__all__ = ["PagedKVCache", "PagedStep", "bytes_per_block"]
