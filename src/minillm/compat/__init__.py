"""The first release's [B, T] rows interface: `KVCache` (a per-row view of the paged pools) and
`model(input_ids, kv_cache=..., use_flash_attention=..., flash_block_size=...)`, laid onto one packed
step of the engine's route. Off the hot path: the engine never comes here."""

from .kv_cache import CacheOverflowError, KVCache

__all__ = ["CacheOverflowError", "KVCache"]
