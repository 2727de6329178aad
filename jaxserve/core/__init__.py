"""The engine core: pure Python, never imports jax.

Requests come in, `SchedulerOutput`s go out: the block pool and prefix cache
(`block_pool`, `block_hash`), block tables (`kv_cache_manager`), the continuous-batching
scheduler (`scheduler`, `request_queue`, `scheduler_output`) and the bucket ladders
(`buckets`). Everything here is testable without devices.
"""
