"""The output callbacks' DDP logic: every image once, in input order, whatever the number of ranks."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from capattn.callbacks import _id_order, _merge_in_input_order


def _shares(n: int, world: int, *, with_indices: bool) -> list[list[tuple[int | None, dict]]]:
    """What each rank of a DDP predict holds: its DistributedSampler's images (padded with repeats)."""
    images = [{"image_id": f"img-{i:03d}", "caption": f"caption {i}"} for i in range(n)]
    shares = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        shares.append([(i if with_indices else None, images[i]) for i in sampler])
    return shares


@pytest.mark.parametrize("with_indices", [True, False])
@pytest.mark.parametrize(("n", "world"), [(7, 2), (10, 3), (1, 4), (8, 1)])
def test_ranks_predictions_merge_into_the_input_order_each_image_once(n, world, with_indices):
    shares = _shares(n, world, with_indices=with_indices)
    assert sum(len(s) for s in shares) >= n  # the sampler padded the last round with repeats
    rows = _merge_in_input_order(shares)
    assert [r["image_id"] for r in rows] == [f"img-{i:03d}" for i in range(n)]


def test_figures_take_the_smallest_ids_numerically_when_ids_are_numbers():
    assert sorted(["10", "9", "100"], key=_id_order) == ["9", "10", "100"]
    assert sorted(["b", "10", "a"], key=_id_order) == ["10", "a", "b"]
