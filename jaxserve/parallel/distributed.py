"""Multi-host start-up: join the `jax.distributed` job before anything touches devices.

Every process runs the same engine on the same inputs (offline `generate`): the mesh spans
all processes' devices (`jax.devices()`), inputs are replicated, and each process reads the
same replicated sampled tokens. Call `initialize_distributed` first, then build `LLM`.
"""

from __future__ import annotations


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> bool:
    """Joins the job at `coordinator` ("host:port") as `process_id` of `num_processes`.

    Returns False (and does nothing) when `coordinator` is None; ValueError for a partial or
    out-of-range set. On CPU the cross-process collectives go through gloo.
    """
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes / --process-id need --distributed-coordinator")
        return False
    if num_processes is None or process_id is None:
        raise ValueError("--distributed-coordinator needs --num-processes and --process-id")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id} "
                         f"(--num-processes {num_processes})")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
