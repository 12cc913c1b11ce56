from .kv_cache import CacheOverflowError, KVCache

__all__ = ["CacheOverflowError", "KVCache"]
