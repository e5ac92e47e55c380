import numpy as np
import pytest

from mqt_jax.config import MSampler


def draws(sampler, num_queries=256, n=20000, seed=0):
    return sampler.sample(num_queries, (n,), seed, 0)


def test_official_is_uniform_over_even_values():
    m = draws(MSampler("official"))
    assert m.dtype == np.int32
    values, counts = np.unique(m, return_counts=True)
    np.testing.assert_array_equal(values, np.arange(2, 257, 2))
    expected = len(m) / 128
    assert np.all(np.abs(counts - expected) < 0.35 * expected)  # ~156 +- 12.5 per value


def test_log_uniform_favours_small_m():
    m = draws(MSampler("log_uniform"), num_queries=64)
    assert m.min() == 1 and m.max() <= 64
    p1 = np.log(2) / np.log(65)  # P(floor(exp(U(0, log 65))) = 1)
    assert np.mean(m == 1) == pytest.approx(p1, abs=0.015)
    assert np.mean(m <= 8) == pytest.approx(np.log(9) / np.log(65), abs=0.02)


def test_fixed_set_keeps_values_up_to_m():
    m = draws(MSampler("fixed_set"), num_queries=64)
    assert set(np.unique(m).tolist()) == {2, 4, 8, 16, 36, 64}


def test_constant_defaults_to_m_and_per_batch_shares_one_draw():
    assert set(draws(MSampler("constant"), num_queries=64).tolist()) == {64}
    assert set(draws(MSampler("constant", constant=5), num_queries=64).tolist()) == {5}
    batch = MSampler("official", per="batch").sample(256, (4, 2), 0, 7)
    assert batch.shape == (4, 2) and len(np.unique(batch)) == 1


def test_all_gives_every_example_every_scale():
    s = MSampler("all", values=(64, 1, 4, 16, 4, 100))  # unordered, repeated, one above M
    m = s.sample(64, (3, 2), 0, 5)
    assert m.shape == (4, 3, 2) and m.dtype == np.int32 and s.copies(64) == 4
    np.testing.assert_array_equal(m, np.broadcast_to(np.array([1, 4, 16, 64])[:, None, None],
                                                     (4, 3, 2)))
    assert MSampler("official").copies(64) == 1
    with pytest.raises(ValueError, match="per='batch'"):
        MSampler("all", per="batch")


def test_draws_are_a_function_of_seed_and_keys():
    s = MSampler("official")
    np.testing.assert_array_equal(s.sample(256, (32,), 3, 10), s.sample(256, (32,), 3, 10))
    assert not np.array_equal(s.sample(256, (32,), 3, 10), s.sample(256, (32,), 3, 11))
    assert not np.array_equal(s.sample(256, (32,), 3, 10), s.sample(256, (32,), 4, 10))


def test_bad_settings():
    with pytest.raises(ValueError, match="distribution='gauss'"):
        MSampler("gauss")
    with pytest.raises(ValueError, match="no valid m in \\[1, 16\\]"):
        MSampler("fixed_set", values=(36, 64)).sample(16, (2,), 0)
    with pytest.raises(ValueError, match="no valid m in \\[1, 16\\]"):
        MSampler("constant", constant=17).sample(16, (2,), 0)
