"""Training data loaders whose order survives a kill: a resumed run sees exactly the batches an
uninterrupted run would have seen, mid-epoch, at an epoch boundary, and when a finished run is
extended with a larger max_steps.

Three parts make that so:
- the order is a function of (seed, epoch) alone: an `EpochSampler` (DistributedSampler's
  permutation of seed + epoch, which Lightning's fit loop advances with `set_epoch`), never the
  global RNG, whose state a resume does not restore;
- samplers hand datasets *draws*, not indices: draw d of a dataset of n items is item d % n, and
  d = epoch * n + position, so a dataset keys its random choices (caption dropout, flips, crops,
  renders) by the draw with `draw_rng`, the same in a resumed run and in every epoch anew;
- the loader is torchdata's `StatefulDataLoader`, whose state (batches handed out this epoch)
  Lightning stores in every checkpoint and restores on resume, so the epoch continues where it
  stopped instead of starting over.

Every datamodule builds its training loader with `resumable_loader`; loaders shard by rank
themselves, so the trainer runs with `use_distributed_sampler=false`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


def rank_and_world_size() -> tuple[int, int]:
    """This process's place among the training ranks (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def draw_rng(seed: int, draw: int) -> random.Random:
    """The random choices of one draw (see the module docstring)."""
    return random.Random(f"{int(seed)}/{int(draw)}")


class EpochSampler(DistributedSampler):
    """This rank's draws for an epoch: positions permuted by seed + epoch (or in order), split
    across ranks as DistributedSampler does, and yielded as draws epoch * len(dataset) + i."""

    def __init__(self, dataset: Sized, shuffle: bool, seed: int):
        rank, world_size = rank_and_world_size()
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * len(self.dataset)
        return (offset + i for i in super().__iter__())


class EpochBatches(Sampler[list[int]]):
    """A batch sampler of in-epoch indices (aspect-ratio buckets) turned into one of draws.
    Lightning calls `set_epoch` on `batch_sampler.sampler`, which is this object."""

    def __init__(self, batch_sampler, size: int):
        self.batch_sampler, self.size, self.epoch = batch_sampler, int(size), 0

    @property
    def sampler(self) -> EpochBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.epoch * self.size
        return ([offset + i for i in batch] for batch in self.batch_sampler)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(StatefulDataLoader):
    """A StatefulDataLoader whose state also holds its sampler's epoch.

    Lightning restores a loader's state and creates its iterator before it calls `set_epoch` for
    the resumed epoch, so the epoch has to come back with the state: without it, a run resumed in
    epoch e would finish e with epoch 0's permutation. A state taken after the last batch of an
    epoch ("every batch handed out") starts the next epoch afresh: Lightning counts that epoch as
    finished and trains on the iterator it already made."""

    _EPOCH_KEY = "t2ilab_epoch"

    def _order_sampler(self):
        return self.batch_sampler if self.sampler_is_batched else self.sampler

    @property
    def sampler_is_batched(self) -> bool:
        return hasattr(self.batch_sampler, "set_epoch")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[self._EPOCH_KEY] = int(getattr(self._order_sampler(), "epoch", 0))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch = int(state_dict.get(self._EPOCH_KEY, 0))
        sampler = self._order_sampler()
        if state_dict.get("_num_yielded", 0) >= len(self):
            sampler.set_epoch(epoch + 1)
            return
        sampler.set_epoch(epoch)
        super().load_state_dict(state_dict)


def resumable_loader(
    dataset: Dataset,
    *,
    collate_fn: Callable,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    batch_sampler: Sampler | None = None,
) -> ResumableDataLoader:
    """The training loader of every datamodule. A `batch_sampler` (aspect-ratio buckets) must
    be a function of its epoch (`set_epoch`) and shard by rank; its indices become draws."""
    common = dict(
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
    )
    if batch_sampler is not None:
        draws = EpochBatches(batch_sampler, len(dataset))
        return ResumableDataLoader(dataset, batch_sampler=draws, **common)
    sampler = EpochSampler(dataset, shuffle, seed)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common
    )
