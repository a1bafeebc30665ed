"""Multi-process training on PyTorch's own runtime (``torchrun``): gloo on CPU, nccl on CUDA.

``torchrun --nproc-per-node N -m batchkin train CONFIG`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :class:`DistContext` reads them, starts the
process group and wraps the model in DistributedDataParallel. Rank 0 alone
writes the run folder and prints progress.
"""

from __future__ import annotations

import atexit
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
            atexit.register(_release_process_group)
        return cls(rank, world, local)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, state) -> None:
        """Wrap ``state.model`` in DistributedDataParallel when running on several processes.

        BatchNorm layers become SyncBatchNorm (statistics over the global batch) when
        ``train.sync_bn`` is ``on``, or ``auto`` and an enabled method declares
        ``sync_batchnorm = True`` (the SSL bases: their projector statistics must span
        every rank's keys). PyTorch's SyncBatchNorm runs on CUDA only: ``on`` is refused
        on CPU, and ``auto`` keeps per-rank statistics there with a note.
        """
        if not self.enabled:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.sync_bn(state):
            state.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.model)

        ids = [state.device.index] if state.device.type == "cuda" else None
        state.model = DDP(state.model, device_ids=ids)

    def sync_bn(self, state) -> bool:
        """Whether to convert BatchNorm to SyncBatchNorm for this run (see :meth:`wrap`)."""
        from .errors import ConfigError

        mode = state.config.train.sync_bn
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in state.model.modules())
        if mode == "off" or not self.enabled or not has_bn:
            return False
        cuda = state.device.type == "cuda"
        if mode == "on":
            if not cuda:
                raise ConfigError("train.sync_bn = 'on' needs CUDA devices: PyTorch's SyncBatchNorm does not run on "
                                  "CPU (gloo); use 'auto' or 'off'")
            return True
        wanting = [n for n, m in state.hooks.methods.items() if getattr(m, "sync_batchnorm", False)]
        if wanting and not cuda and self.rank == 0:
            import sys

            print(f"batchkin: note: {', '.join(wanting)} would synchronise BatchNorm across ranks, but SyncBatchNorm "
                  "needs CUDA; BatchNorm statistics stay per rank on CPU", file=sys.stderr, flush=True)
        return bool(wanting) and cuda


def _release_process_group() -> None:
    """Destroy the process group this module started, while the interpreter is still whole
    (at exit, and before :func:`end_rank_process` exits). This alone does not keep a finished
    rank from aborting at interpreter finalisation; :func:`end_rank_process` does."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def end_rank_process(code: int) -> None:
    """End a torchrun rank's process with ``code`` once its command has returned.

    Everything the run writes is closed and flushed by then. The process group is
    destroyed, then the process exits without interpreter finalisation: gloo's and the
    autograd engine's C++ threads can still be joinable when static objects are torn down,
    which aborts a rank that succeeded (SIGABRT, "terminate called without an active
    exception") and makes torchrun report the whole run as failed. A rank that fails exits
    the usual way: the slower exit gives the other ranks time to print their own error line
    before torchrun stops them.
    """
    import sys

    _release_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)
