"""Section 2: tokenizers."""

import pytest


def test_gpt2_encodes_hello_world_to_the_reference_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


@pytest.mark.parametrize("text", ["Hello world", "naïve café — “quotes”", "日本語のテキスト 🙂🚀",
                                  "  leading and trailing  \n\n\ttabs", "it's 1,234.5%"])
def test_gpt2_decode_inverts_encode(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_ranks_file_with_wrong_hash_is_refused(pico, tmp_path):
    tampered = tmp_path / "gpt2.tiktoken"
    tampered.write_bytes(pico.GPT2_RANKS_PATH.read_bytes().replace(b" 995\n", b" 996\n", 1))
    with pytest.raises(pico.UserError, match="sha256"):
        pico.load_gpt2_encoding(tampered)


def test_gpt2_token_byte_lengths_sum_to_the_text_bytes(gpt2):
    text = "Once upon a time, a café served 日本 tea."
    lengths = gpt2.token_byte_lengths()
    assert sum(lengths[i] for i in gpt2.encode(text)) == len(text.encode("utf-8"))
    assert lengths[gpt2.eot_id] == 0


def test_char_tokenizer_round_trips_utf8(pico):
    tokenizer = pico.ByteTokenizer()
    text = "héllo 🙂"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids + [tokenizer.eot_id]) == text


def test_unknown_tokenizer_is_a_user_error(pico):
    with pytest.raises(pico.UserError, match="--tokenizer"):
        pico.build_tokenizer("sentencepiece")
