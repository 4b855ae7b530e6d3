"""The training order of a run: drawn from ``(seed, epoch)`` alone, and resumable mid-epoch.

``EpochShuffle`` is the permutation; ``ClassMixShuffle`` an order whose batches each hold a few classes (batches
that are not i.i.d.); ``ResumableLoader`` is the DataLoader over either whose position in the epoch goes into
every checkpoint, so a run resumed mid-epoch serves the batches the stopped one had not served yet, in the same
order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffle(Sampler[int]):
    """Indices ``0 .. size - 1``, shuffled by a permutation that depends on ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` before every training epoch. ``skip(n)`` makes the next iteration
    start at the ``n``-th index of the epoch's order (the loader uses it to resume mid-epoch);
    ``len`` stays the whole epoch's, so Lightning's count of batches per epoch does not change.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, count: int) -> None:
        self._skip = count

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's own random stream. Seed and epoch are mixed by numpy's SeedSequence: seed 1 epoch 0 and
        seed 0 epoch 1 differ."""
        words = np.random.SeedSequence(self.seed % 2**63, spawn_key=(epoch,)).generate_state(2, np.uint32)
        return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=self.generator(epoch))

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.order(self.epoch)[skip:].tolist())

    def __len__(self) -> int:
        return self.size


class ClassMixShuffle(EpochShuffle):
    """An order of every index once per epoch in which each run of ``batch_size`` indices (a batch) holds the
    images of ``classes_per_batch`` classes, in equal parts: batches that are not i.i.d., as when a loader is
    sorted by label or a pipeline groups images by source (the case Ioffe 2017 built Batch Renorm for).

    Each batch's classes are drawn at random in proportion to the images each has left, so every pair of
    classes meets and the classes run out at about the same time; the batches are then shuffled, and the
    short one (``size % batch_size`` images) comes last. Where a chosen class runs short, its batch takes
    the rest from the other chosen ones, then from the classes with the most left, so a few batches of an
    epoch (where the classes run out) hold unequal parts or more classes; ``mixed(epoch)`` counts them. Drawn
    from ``(seed, epoch)`` alone, as ``EpochShuffle``'s order. One process: under DDP, Lightning's distributed
    sampler deals each rank every n-th index of this order, and the class mix of a batch is lost.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, classes_per_batch: int, seed: int) -> None:
        classes = int(labels.unique().numel())
        if not 1 <= classes_per_batch <= classes:
            raise ValueError(f"classes_per_batch must be between 1 and the {classes} classes of the data, "
                             f"got {classes_per_batch}")
        if batch_size % classes_per_batch:
            raise ValueError(f"batch_size {batch_size} does not split into {classes_per_batch} equal parts: choose "
                             f"a batch size that classes_per_batch divides")
        super().__init__(len(labels), seed)
        self.labels, self.batch_size, self.classes_per_batch = labels.cpu(), batch_size, classes_per_batch

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's batches of indices, in order."""
        generator = self.generator(epoch)
        pools = [members[torch.randperm(len(members), generator=generator)].tolist()
                 for members in (torch.nonzero(self.labels == c).flatten() for c in self.labels.unique())]
        share, batches, left = self.batch_size // self.classes_per_batch, [], len(self.labels)
        while left:
            counts = torch.tensor([float(len(pool)) for pool in pools])
            chosen = torch.multinomial(counts, min(self.classes_per_batch, int((counts > 0).sum())),
                                       generator=generator).tolist()
            ranked = chosen + sorted(set(range(len(pools))) - set(chosen), key=lambda c: -len(pools[c]))
            want, batch = min(self.batch_size, left), []
            for c in ranked[: self.classes_per_batch]:
                batch += pools[c][:share]
                del pools[c][:share]
            for c in ranked:  # where the chosen classes had less than their share: from the most plentiful
                taken = pools[c][: want - len(batch)]
                batch += taken
                del pools[c][: len(taken)]
            left -= len(batch)
            batches.append(torch.tensor(batch)[torch.randperm(len(batch), generator=generator)])
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short

    def mixed(self, epoch: int) -> int:
        """How many whole batches of the epoch are not ``classes_per_batch`` classes in equal parts."""
        share = self.batch_size // self.classes_per_batch
        whole = (b for b in self.batches(epoch) if len(b) == self.batch_size)
        largest = (sorted(torch.bincount(self.labels[b]).tolist())[-self.classes_per_batch:] for b in whole)
        return sum(parts != [share] * self.classes_per_batch for parts in largest)

    def order(self, epoch: int) -> torch.Tensor:
        return torch.cat(self.batches(epoch))


class ResumableLoader(DataLoader):
    """A DataLoader over ``EpochShuffle`` whose position in the epoch is saved in checkpoints.

    ``state_dict()`` is ``{"seed", "epoch", "batches"}``: the batches of this epoch the loader has
    handed out. Lightning 2.x saves it in every checkpoint (``FitLoop.on_save_checkpoint`` stores the
    ``state_dict`` of each train loader that has ``state_dict``/``load_state_dict``) and, when a fit
    resumes mid-epoch, calls ``load_state_dict`` before creating the epoch's iterator; the next
    iteration then skips those batches, by starting the sampler past their indices (nothing is
    loaded twice). Lightning fetches no batch ahead from a loader whose length it knows, so the count
    equals the batches training has taken. Its own ``torch.Generator`` seeds worker processes, so
    iterating draws nothing from the global RNG either.

    ``classes_per_batch`` orders the epoch by ``ClassMixShuffle`` (the dataset's ``targets`` are the classes).
    Given a ``sampler`` (Lightning rebuilds the loader with a ``DistributedSampler`` around ours for
    multi-process training), it is a plain DataLoader: a resumed epoch starts over.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, sampler: Sampler | None = None,
        classes_per_batch: int | None = None, **kwargs
    ) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        self.resumable = sampler is None
        if sampler is None and classes_per_batch is not None:
            sampler = ClassMixShuffle(dataset.targets, batch_size, classes_per_batch, seed)
        elif sampler is None:
            sampler = EpochShuffle(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._skip = 0
        self._epoch, self._served = 0, 0  # the epoch being served and how many batches of it went out

    def __iter__(self) -> Iterator:
        # The skip is taken now, not when the first batch is asked for: Lightning may create an
        # iterator it never draws from (resuming at an epoch's end), and the next epoch's must not skip.
        skip, self._skip = self._skip, 0
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator:
        if not self.resumable:
            yield from super().__iter__()
            return
        # Runs from the first next(), after Lightning's set_epoch for this epoch.
        self._epoch, self._served = self.sampler.epoch, skip
        self.sampler.skip(skip * self.batch_size)
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        if self.sampler.epoch != self._epoch:  # a new epoch is set but none of its batches went out yet
            return {"seed": self.sampler.seed, "epoch": self.sampler.epoch, "batches": 0}
        return {"seed": self.sampler.seed, "epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable or not state:
            return
        self.sampler.seed = state["seed"]
        self.sampler.set_epoch(state["epoch"])
        self._epoch, self._served = state["epoch"], state["batches"]
        self._skip = state["batches"]
