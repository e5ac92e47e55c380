import numpy as np
import pytest

from mqt_jax.core import splice
from mqt_jax.core.splice import IGNORE, IMAGE_TOKEN, Example

X = IGNORE
# [BOS, 10, <image>, 11, 12] with the loss on 12.
EX1 = Example([1, 10, IMAGE_TOKEN, 11, 12], [X, X, X, X, 12])
# [BOS, <image>, 20, 21] with the loss on 20 and 21.
EX2 = Example([1, IMAGE_TOKEN, 20, 21], [X, X, 20, 21])


def test_layout_of_one_example_by_hand():
    out = splice.layout_rows([[EX1]], np.array([[2]]), num_queries=4, seq_len=8)
    np.testing.assert_array_equal(out["token_ids"], [[1, 10, 0, 0, 11, 12, 0, 0]])
    np.testing.assert_array_equal(out["visual_index"], [[-1, -1, 0, 1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    # Position 4 (token 11) predicts 12; nothing else carries loss.
    np.testing.assert_array_equal(out["targets"], [[0, 0, 0, 0, 12, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 0, 1, 0, 0, 0]])


def test_text_after_the_image_follows_the_m_visual_tokens():
    for m in (1, 3, 4):
        out = splice.layout_rows([[EX1]], np.array([[m]]), num_queries=4, seq_len=10)
        first_text_after = 2 + m
        assert out["token_ids"][0, first_text_after] == 11
        assert out["positions"][0, first_text_after] == first_text_after
        np.testing.assert_array_equal(out["visual_index"][0, 2 : 2 + m], np.arange(m))


def test_packing_two_examples_in_one_row():
    out = splice.layout_rows([[EX1, EX2]], np.array([[2, 3]]), num_queries=4, seq_len=14)
    np.testing.assert_array_equal(
        out["token_ids"], [[1, 10, 0, 0, 11, 12, 1, 0, 0, 0, 20, 21, 0, 0]])
    # The second example's image is slot 1 of the row: indices 1 * M + q.
    np.testing.assert_array_equal(
        out["visual_index"], [[-1, -1, 0, 1, -1, -1, -1, 4, 5, 6, -1, -1, -1, -1]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1] * 6 + [2] * 6 + [0, 0]])
    np.testing.assert_array_equal(out["targets"], [[0, 0, 0, 0, 12, 0, 0, 0, 0, 20, 21, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]])
    assert splice.true_length(EX1, [2]) + splice.true_length(EX2, [3]) == 12
    # Each image's question ends right before its answer: token 11 (position 4), token 20's
    # predecessor, the last visual token (position 9).
    np.testing.assert_array_equal(out["question_end"], [[4, 9]])


def test_question_end_of_a_prompt_is_its_last_token():
    prompt = Example([1, 10, IMAGE_TOKEN, 11, 12, 13], [X] * 6)
    out = splice.layout_rows([[prompt], [EX1]], np.array([[3, 0], [1, 0]]).clip(1), 4, 9)
    np.testing.assert_array_equal(out["question_end"], [[7, 0], [3, 0]])  # unused slot: 0


def test_survivors_of_a_drop_must_fit_the_compacted_row():
    # M = 4 tokens per image, of which the first 3 (patches) leave; seq_len 8 -> room 5.
    fits = splice.layout_rows([[EX1]], np.array([[4]]), num_queries=4, seq_len=8)
    np.testing.assert_array_equal(splice.dropped_positions(fits["visual_index"], 4, 3),
                                  [[0, 0, 1, 1, 1, 0, 0, 0]])
    splice.check_survivors({**fits, "m": np.array([[4]])}, 4, 3)  # 5 survivors: fits
    text = Example([1, 2, 3, 4, 5, 6, 7], [X] * 7)
    row = splice.layout_rows([[text]], np.array([[4]]), num_queries=4, seq_len=8)
    with pytest.raises(ValueError, match=r"rows \[0\] keep \[7\] tokens .* than the 5"):
        splice.check_survivors({**row, "m": np.array([[4]])}, 4, 3)


def test_truncation_keeps_the_first_tokens_and_drops_the_cut_target():
    out = splice.layout_rows([[EX1]], np.array([[2]]), num_queries=4, seq_len=5)
    np.testing.assert_array_equal(out["token_ids"], [[1, 10, 0, 0, 11]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 0, 0]])


def test_text_only_example_uses_no_image_slot():
    text = Example([1, 5, 6], [X, 5, 6])
    out = splice.layout_rows([[text]], np.array([[7]]), num_queries=8, seq_len=4)
    np.testing.assert_array_equal(out["visual_index"], [[-1, -1, -1, -1]])
    np.testing.assert_array_equal(out["targets"], [[5, 6, 0, 0]])


@pytest.mark.parametrize("bad", [0, 5, -3])
def test_m_outside_range_is_named(bad):
    with pytest.raises(ValueError, match=rf"m=\[{bad}\] outside \[1, 4\]"):
        splice.layout_rows([[EX1]], np.array([[bad]]), num_queries=4, seq_len=8)


def test_more_placeholders_than_images():
    two_images = Example([1, IMAGE_TOKEN, IMAGE_TOKEN, 3], [X, X, X, 3])
    with pytest.raises(ValueError, match="2 <image> placeholders but the batch has 1 image slot"):
        splice.layout_rows([[two_images]], np.array([[2]]), num_queries=4, seq_len=8)
    with pytest.raises(ValueError, match="2 <image> placeholders but only 1 image"):
        splice.expand_example(two_images, [2], num_queries=4)


def make_batch(m=2, size=8):
    out = splice.layout_rows([[EX1]], np.array([[m]]), num_queries=4, seq_len=8)
    return {"images": np.zeros((1, 1, size, size, 3), np.float32), "m": np.array([[m]]), **out}


def test_validate_batch_errors():
    splice.validate_batch(make_batch(), num_queries=4, image_size=8)  # a good batch passes
    with pytest.raises(ValueError, match=r"images of shape \(1, 1, 9, 9, 3\)"):
        splice.validate_batch(make_batch(size=9), num_queries=4, image_size=8)
    bad_m = make_batch()
    bad_m["m"] = np.array([[9]])
    with pytest.raises(ValueError, match=r"m=\[9\] outside \[1, 4\]"):
        splice.validate_batch(bad_m, num_queries=4, image_size=8)
    stale = make_batch(m=3)
    stale["m"] = np.array([[2]])  # laid out for m=3, claims m=2: index 2 is past m
    with pytest.raises(ValueError, match="visual_index points past an image's m"):
        splice.validate_batch(stale, num_queries=4, image_size=8)
    missing = make_batch()
    del missing["positions"]
    with pytest.raises(ValueError, match="batch lacks \\['positions'\\]"):
        splice.validate_batch(missing, num_queries=4, image_size=8)


def test_splice_gathers_visual_tokens_within_each_row():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(2, 5, 3)).astype(np.float32)
    visual = rng.normal(size=(2, 8, 3)).astype(np.float32)
    index = np.array([[-1, 0, 1, -1, -1], [-1, 6, 7, 2, -1]])
    out = np.asarray(splice.splice(text, visual, index))
    expected = text.copy()
    for b, t in zip(*np.nonzero(index >= 0)):
        expected[b, t] = visual[b, index[b, t]]
    np.testing.assert_array_equal(out, expected)


def test_query_masks():
    prefix = np.asarray(splice.query_mask(np.array([2, 4]), 4, "prefix"))[:, 0]
    np.testing.assert_array_equal(prefix[0], [[1, 1, 0, 0]] * 4)
    np.testing.assert_array_equal(prefix[1], np.ones((4, 4)))
    causal = np.asarray(splice.query_mask(np.array([2]), 3, "causal"))[0, 0]
    np.testing.assert_array_equal(causal, [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
