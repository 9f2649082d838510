"""Which steps do the loop's periodic work: every N steps, and 0 for none but the last."""

from ldm_jax.training import loop


def test_intervals_of_zero_or_less_mean_never():
    assert [s for s in range(1, 11) if loop._due(s, 4)] == [4, 8]
    assert not any(loop._due(s, 0) for s in range(1, 11))  # was a ZeroDivisionError
    assert not any(loop._due(s, -1) for s in range(1, 11))
