"""train.sync_bn: when DDP converts BatchNorm to SyncBatchNorm (decided without starting processes)."""

from types import SimpleNamespace

import pytest
import torch

from batchkin.distributed import DistContext
from batchkin.errors import ConfigError


class NeedsSync:
    sync_batchnorm = True


def _state(mode, device="cpu", methods=None, bn=True):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4) if bn else torch.nn.Identity())
    return SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(sync_bn=mode)), device=torch.device(device),
                           model=model, hooks=SimpleNamespace(methods=methods or {}))


def test_auto_converts_on_cuda_only_for_methods_that_need_it():
    two = DistContext(rank=0, world_size=2)
    assert two.sync_bn(_state("auto", "cuda", {"moco": NeedsSync()}))
    assert not two.sync_bn(_state("auto", "cuda", {"ce": object()}))
    assert not DistContext().sync_bn(_state("auto", "cuda", {"moco": NeedsSync()}))  # one process: nothing to sync
    assert not two.sync_bn(_state("auto", "cuda", {"moco": NeedsSync()}, bn=False))  # no BatchNorm in the model


def test_auto_on_cpu_keeps_per_rank_statistics_and_says_so(capsys):
    assert not DistContext(rank=0, world_size=2).sync_bn(_state("auto", "cpu", {"moco": NeedsSync()}))
    assert "moco would synchronise BatchNorm across ranks, but SyncBatchNorm needs CUDA" in capsys.readouterr().err


def test_on_and_off():
    two = DistContext(rank=1, world_size=2)
    assert two.sync_bn(_state("on", "cuda"))
    assert not two.sync_bn(_state("off", "cuda", {"moco": NeedsSync()}))
    with pytest.raises(ConfigError, match="train.sync_bn = 'on' needs CUDA devices"):
        two.sync_bn(_state("on", "cpu"))


def test_the_ssl_bases_ask_for_synchronised_batchnorm():
    from batchkin.plugins.dino import DINO
    from batchkin.plugins.moco import MoCo

    assert MoCo.sync_batchnorm and DINO.sync_batchnorm
