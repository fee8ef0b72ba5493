"""Queue ids drawn by the processes of one relay at the same moment never meet."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailqueue.ids import SLOT_BITS, QueueIds, is_queue_id


def _same_rng() -> random.Random:
    # Forked processes start from one generator state: the worst case for random starts.
    return random.Random(42)


@given(
    slots=st.lists(st.integers(0, (1 << SLOT_BITS) - 1), min_size=2, max_size=4, unique=True),
    per_slot=st.integers(1, 700),
)
def test_slots_keep_ids_apart_in_one_millisecond(slots: list[int], per_slot: int) -> None:
    now = 1_800_000_000.1234
    seen: set[str] = set()
    for slot in slots:
        ids = QueueIds(_same_rng())
        ids.use_slot(slot)
        drawn = [ids.next(now) for _ in range(per_slot)]  # more than one ms holds: spills over
        assert all(is_queue_id(i) for i in drawn)
        assert drawn == sorted(drawn)
        assert len(set(drawn)) == per_slot
        assert not seen & set(drawn)
        seen |= set(drawn)


def test_without_slots_the_same_generator_state_collides() -> None:
    """What slots are for: two forked writers without one draw the same ids."""
    a, b = QueueIds(_same_rng()), QueueIds(_same_rng())
    now = 1_800_000_000.5
    assert a.next(now) == b.next(now)


def test_a_slot_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="slot"):
        QueueIds(_same_rng()).use_slot(1 << SLOT_BITS)


def test_ids_after_taking_a_slot_sort_after_earlier_ones() -> None:
    ids = QueueIds(_same_rng())
    now = 1_800_000_000.5
    before = ids.next(now)
    ids.use_slot(3)
    assert ids.next(now) > before
