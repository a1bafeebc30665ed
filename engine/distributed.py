"""Multi-process training on PyTorch's own runtime (``torchrun``): gloo on CPU, nccl on CUDA.

``torchrun --nproc-per-node N -m batchkin train CONFIG`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :class:`DistContext` reads them, starts the
process group and wraps the model in DistributedDataParallel. Rank 0 alone
writes the run folder and prints progress.
"""

from __future__ import annotations

import datetime
import os

import torch


class DistContext:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            timeout = datetime.timedelta(seconds=float(os.environ.get("BATCHKIN_DIST_TIMEOUT", "300")))
            dist.init_process_group(backend, timeout=timeout)
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, state) -> None:
        """Wrap ``state.model`` in DistributedDataParallel when running on several processes."""
        if not self.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [state.device.index] if state.device.type == "cuda" else None
        state.model = DDP(state.model, device_ids=ids)
