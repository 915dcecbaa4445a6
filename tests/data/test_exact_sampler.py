"""ExactDistributedSampler: every sample on exactly one rank, no padding, unlike torch's DistributedSampler."""

import pytest
from torch.utils.data import DistributedSampler

from lit_mpq.data.base import ExactDistributedSampler


@pytest.mark.parametrize(("size", "world"), [(449, 2), (9, 2), (10, 3), (5, 8), (1, 1)])
def test_shards_cover_the_dataset_exactly_once(size, world):
    data = list(range(size))
    shards = [list(ExactDistributedSampler(data, world, rank)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(ExactDistributedSampler(data, world, r)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # torch's sampler pads: 9 samples on 2 ranks become 5 + 5 (one image counted twice).
    padded = sum(len(DistributedSampler(data, world, r, shuffle=False)) for r in range(world))
    assert padded == -(-size // world) * world >= size
