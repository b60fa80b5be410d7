"""Random draws of a training step that do not depend on how the global batch is split.

Every rank seeds the same global RNG (seed_everything), so under DDP the ranks would draw the
*same* noise and timesteps for different samples: correlated noise across the global batch.
Here each row of the global batch draws from a generator keyed by (seed, step, stream, row), and
a rank draws only its own rows. Consequences:
- N ranks with batch B train exactly like one process with batch N*B (same noise per sample);
- a resumed run draws the same values at the same step as an uninterrupted one;
- the draws are independent of any other use of torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _stream_seed(seed: int, key: Sequence[int], stream: str) -> int:
    words = [int(seed) & 0xFFFFFFFF, *(int(k) for k in key), *stream.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepRandom:
    """Draws for one step on one rank of `world_size`, each rank holding `local_batch` rows."""

    def __init__(
        self,
        seed: int,
        key: Sequence[int],
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.seed, self.key = int(seed), tuple(int(k) for k in key)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)

    def generator(self, stream: str) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_stream_seed(self.seed, self.key, stream))
        return gen

    def _global_rows(self, rows: int) -> range:
        return range(self.rank * rows, (self.rank + 1) * rows)

    def _per_row(self, draw, stream: str, shape: Sequence[int], **kw) -> torch.Tensor:
        """Row j of the global batch from its own generator: torch's CPU randn fills a tensor
        in size-dependent chunks, so a slice of a bigger draw would not equal a smaller draw."""
        rows = [
            draw(
                tuple(shape[1:]),
                generator=self.generator(f"{stream}/{j}"),
                device=self.device,
                **kw,
            )
            for j in self._global_rows(int(shape[0]))
        ]
        return torch.stack(rows)

    def randn(self, stream: str, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return self._per_row(torch.randn, stream, shape, dtype=dtype)

    def rand(self, stream: str, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """Uniform on [0, 1), row by row as randn."""
        return self._per_row(torch.rand, stream, shape, dtype=dtype)

    def randint(self, stream: str, shape: Sequence[int], high: int) -> torch.Tensor:
        def draw(size, **kw):
            return torch.randint(0, high, size, **kw)

        return self._per_row(draw, stream, shape)


def grouped(draw, stream: str, shape: Sequence[int], num_first: int, **kw) -> torch.Tensor:
    """One draw per group of rows (instance rows, then prior-preservation class rows), so each
    group matches its counterpart in a single-process batch, where groups are concatenated too."""
    rows = int(shape[0])
    if num_first >= rows:
        return draw(f"{stream}/instance", shape, **kw)
    first = draw(f"{stream}/instance", (num_first, *shape[1:]), **kw)
    rest = draw(f"{stream}/class", (rows - num_first, *shape[1:]), **kw)
    return torch.cat([first, rest])


class GroupedDraws:
    """A step's draws, each made per group of rows (`grouped`): instance rows, then class rows."""

    def __init__(self, rand: StepRandom, num_first: int):
        self.step_rand, self.num_first = rand, int(num_first)

    def randn(self, stream: str, shape: Sequence[int], **kw) -> torch.Tensor:
        return grouped(self.step_rand.randn, stream, shape, self.num_first, **kw)

    def rand(self, stream: str, shape: Sequence[int], **kw) -> torch.Tensor:
        return grouped(self.step_rand.rand, stream, shape, self.num_first, **kw)

    def randint(self, stream: str, shape: Sequence[int], **kw) -> torch.Tensor:
        return grouped(self.step_rand.randint, stream, shape, self.num_first, **kw)
