import pytest
from data_helpers import system_ids, word_level_tokenizer

from mqt_jax.core.splice import IGNORE as X
from mqt_jax.core.splice import IMAGE_TOKEN as IMG
from mqt_jax.data.conversation import BadRecord, encode_conversation
from mqt_jax.data.tokenizer import load_tokenizer, train_sentencepiece

TWO_TURNS = [
    {"from": "human", "value": "What colour ?\n<image>"},
    {"from": "gpt", "value": "Red"},
    {"from": "human", "value": "And now ?"},
    {"from": "gpt", "value": "Blue"},
]


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    vocab = word_level_tokenizer(folder)
    return vocab, load_tokenizer(folder)


def test_vicuna_v1_layout_by_hand(words):
    v, tok = words
    ex = encode_conversation(TWO_TURNS, "vicuna_v1", tok, has_image=True)
    # <s> SYSTEM USER : <image> \n What colour ? ASSISTANT : Red </s> USER : And now ? ASSISTANT : Blue </s>
    # (LLaVA moves the image to the front of the first turn.)
    after_system = [v["USER"], v[":"], IMG, v["\n"], v["What"], v["colour"], v["?"],
                    v["ASSISTANT"], v[":"], v["Red"], 2,
                    v["USER"], v[":"], v["And"], v["now"], v["?"],
                    v["ASSISTANT"], v[":"], v["Blue"], 2]
    assert list(ex.tokens) == [1] + system_ids(v) + after_system
    loss = [X] * 9 + [v["Red"], 2] + [X] * 7 + [v["Blue"], 2]
    assert list(ex.labels) == [X] + [X] * len(system_ids(v)) + loss


def test_plain_layout_by_hand(words):
    v, tok = words
    conv = [{"from": "human", "value": "<image>\nDescribe ."}, {"from": "gpt", "value": "Red circle"}]
    ex = encode_conversation(conv, "plain", tok, has_image=True)
    assert list(ex.tokens) == [1, IMG, v["Red"], v["circle"], v["\n"]]
    assert list(ex.labels) == [X, X, v["Red"], v["circle"], v["\n"]]


def test_lm_template_is_vicuna_v1_with_every_token_a_target(words):
    _, tok = words
    chat = encode_conversation(TWO_TURNS[2:], "vicuna_v1", tok, has_image=False)
    lm = encode_conversation(TWO_TURNS[2:], "lm", tok, has_image=False)
    assert lm.tokens == chat.tokens
    assert list(lm.labels) == [X] + list(lm.tokens[1:])  # all but BOS, which nothing predicts


def test_text_only_record_has_no_image_token(words):
    _, tok = words
    ex = encode_conversation(TWO_TURNS[2:], "vicuna_v1", tok, has_image=False)
    assert IMG not in ex.tokens and ex.num_images == 0


@pytest.mark.parametrize("conversations,has_image,reason", [
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], False, "unknown_role"),
    ([{"from": "human", "value": "hi"}], False, "no_assistant_turn"),
    ([{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}], False, "empty_text"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], True,
     "too_many_placeholders"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], False,
     "too_many_placeholders"),
])
def test_bad_conversations_name_their_reason(words, conversations, has_image, reason):
    with pytest.raises(BadRecord) as err:
        encode_conversation(conversations, "vicuna_v1", words[1], has_image)
    assert err.value.reason == reason


def test_sentencepiece_offsets_are_characters_and_labels_cover_answers(tmp_path):
    texts = ["USER: What colour is the circle? ASSISTANT: Red", "Quelle forme? Un carré rouge."] * 40
    train_sentencepiece(texts, tmp_path, vocab_size=320)
    tok = load_tokenizer(tmp_path)
    text = "Un carré? ASSISTANT: Red"
    ids, begins, ends = tok.encode(text)
    assert tok.decode(ids) == text
    assert begins[0] == 0 and ends[-1] == len(text)  # characters, not UTF-8 bytes
    conv = [{"from": "human", "value": "Un carré?"}, {"from": "gpt", "value": "Red"}]
    ex = encode_conversation(conv, "vicuna_v1", tok, has_image=False)
    answer = [t for t in ex.labels if t != X]
    assert answer[-1] == tok.eos_id and tok.decode(answer[:-1]) == "Red"


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)


def test_image_placeholder_in_a_later_turn_goes_there_by_hand(words):
    """As LLaVA: the image moves to the front of the human turn holding <image>; the
    placeholder text never reaches the tokenizer."""
    v, tok = words
    turns = [dict(TWO_TURNS[0], value="What colour ?"), TWO_TURNS[1],
             dict(TWO_TURNS[2], value="And now ? <image>"), TWO_TURNS[3]]
    ex = encode_conversation(turns, "vicuna_v1", tok, has_image=True)
    after_system = [v["USER"], v[":"], v["What"], v["colour"], v["?"],
                    v["ASSISTANT"], v[":"], v["Red"], 2,
                    v["USER"], v[":"], IMG, v["\n"], v["And"], v["now"], v["?"],
                    v["ASSISTANT"], v[":"], v["Blue"], 2]
    assert list(ex.tokens) == [1] + system_ids(v) + after_system
    assert v["<unk>"] not in list(ex.tokens)


def test_digits_are_pieces_of_their_own_and_a_bare_leading_space_is_a_target(tmp_path):
    """Every digit is its own piece, so the "3" of "column 3?" and of "column 3:" is one
    token; an answer that starts with a bare "▁" piece has that piece as a target (otherwise
    the model never learns to begin the answer)."""
    texts = ["USER: What is in row 2, column 3? ASSISTANT: 9",
             "row 2, column 3: a red circle; row 1, column 1: a blue square."] * 40
    train_sentencepiece(texts, tmp_path, vocab_size=300)
    tok = load_tokenizer(tmp_path)
    pieces = lambda text: [tok.decode([i]) for i in tok.encode(text)[0]]  # noqa: E731
    question, description = tok.encode("column 3?")[0], tok.encode("column 3:")[0]
    assert list(question[:-1]) == list(description[:-1]) and question[-1] != description[-1]
    assert "3" in pieces("column 3?") and "12" not in pieces("12 shapes")
    conv = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "9"}]
    ex = encode_conversation(conv, "vicuna_v1", tok, has_image=False)
    targets = [t for t in ex.labels if t != X]
    answer = tok.encode(" 9")[0]
    assert len(answer) == 2  # "▁", "9": the space a piece of its own
    assert targets == list(answer) + [tok.eos_id]
