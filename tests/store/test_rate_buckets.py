"""Token buckets in the store (what gateway replicas share), on both backends."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from store import RateBucketStore, open_database

NO_REFILL = 1e-9  # tokens per second: nothing refills within a test


def test_a_new_bucket_is_full_and_a_refused_take_takes_nothing(store_url: str) -> None:
    """capacity requests pass, the next is refused, and the tokens left say so."""
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)
        takes = [buckets.take("v1:key_a", capacity=3, rate_per_s=NO_REFILL) for _ in range(5)]
        other = buckets.take("v1:key_b", capacity=3, rate_per_s=NO_REFILL)
    finally:
        database.close()
    assert [take.allowed for take in takes] == [True, True, True, False, False]
    assert [round(take.tokens, 6) for take in takes] == [2.0, 1.0, 0.0, 0.0, 0.0]
    assert other.allowed and round(other.tokens, 6) == 2.0


def test_a_lease_takes_up_to_what_is_there_and_a_give_back_refills_up_to_capacity(
    store_url: str,
) -> None:
    """want takes several whole tokens at once (never more than are there); give_back
    returns unspent ones, never past capacity."""
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)
        first = buckets.take("v1:key_a", capacity=5, rate_per_s=NO_REFILL, want=3)
        second = buckets.take("v1:key_a", capacity=5, rate_per_s=NO_REFILL, want=3)
        empty = buckets.take("v1:key_a", capacity=5, rate_per_s=NO_REFILL, want=3)
        returned = buckets.take("v1:key_a", capacity=5, rate_per_s=NO_REFILL, give_back=2)
        capped = buckets.take("v1:key_a", capacity=5, rate_per_s=NO_REFILL, give_back=50)
    finally:
        database.close()
    assert [(t.taken, round(t.tokens, 6)) for t in (first, second, empty)] == [
        (3, 2.0),
        (2, 0.0),
        (0, 0.0),
    ]
    assert (returned.taken, round(returned.tokens, 6)) == (1, 1.0)
    assert (capped.taken, round(capped.tokens, 6)) == (1, 4.0)


def test_a_bucket_refills_by_the_database_clock(store_url: str) -> None:
    """An empty bucket refused now allows again once one token's time has passed."""
    rate_per_s = 20.0
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)
        first = buckets.take("v1:key_a", capacity=1, rate_per_s=rate_per_s)
        second = buckets.take("v1:key_a", capacity=1, rate_per_s=rate_per_s)
        time.sleep(1.5 / rate_per_s)
        third = buckets.take("v1:key_a", capacity=1, rate_per_s=rate_per_s)
    finally:
        database.close()
    assert (first.allowed, second.allowed, third.allowed) == (True, False, True)
    assert 0.0 <= third.tokens < 1.0


def test_concurrent_takes_never_hand_out_more_than_the_bucket_holds(store_url: str) -> None:
    """Eight connections racing for one bucket get exactly its capacity between them."""
    capacity, racers, tries = 5, 8, 20
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)

        def race(_: int) -> int:
            takes = [
                buckets.take("v1:hot", capacity=capacity, rate_per_s=NO_REFILL)
                for _ in range(tries)
            ]
            return sum(take.allowed for take in takes)

        with ThreadPoolExecutor(racers) as pool:
            allowed = sum(pool.map(race, range(racers)))
    finally:
        database.close()
    assert allowed == capacity


def test_prune_deletes_only_buckets_that_are_full_again(store_url: str) -> None:
    """A full bucket is as good as none: pruned; one still refilling is kept."""
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)
        buckets.take("auth:203.0.113.9", capacity=2, rate_per_s=NO_REFILL)
        buckets.take("auth:198.51.100.7", capacity=2, rate_per_s=1000.0)
        time.sleep(0.01)
        pruned = buckets.prune()
        left = database.call(
            lambda c: c.execute("SELECT bucket FROM rate_buckets ORDER BY bucket").fetchall()
        )
    finally:
        database.close()
    assert pruned == 1
    assert [row[0] for row in left] == ["auth:203.0.113.9"]


def test_a_bucket_needs_room_for_one_token(store_url: str) -> None:
    """A capacity below one token, or no refill at all, is a caller's bug, not a refusal."""
    database = open_database(store_url)
    try:
        buckets = RateBucketStore(database)
        with pytest.raises(ValueError, match="capacity"):
            buckets.take("v1:key_a", capacity=0.5, rate_per_s=1.0)
        with pytest.raises(ValueError, match="rate_per_s"):
            buckets.take("v1:key_a", capacity=1, rate_per_s=0.0)
    finally:
        database.close()
