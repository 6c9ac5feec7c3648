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


def test_the_character_tokenizers_end_of_text_stands_for_no_bytes(pico):
    lengths = pico.ByteTokenizer().token_byte_lengths()
    assert lengths[256] == 0 and lengths.sum() == 256        # each byte 1, <|endoftext|> none


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_token_bytes_join_into_the_text(pico, gpt2, tmp_path, kind):
    text = "Once upon a time, a café served 日本 tea ☃."
    tokenizer = {"char": pico.ByteTokenizer, "gpt2": lambda: gpt2, "bpe": lambda: pico.train_bpe_tokenizer(
        [f"the café number {i} served tea" for i in range(30)], 300, tmp_path)}[kind]()
    assert b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode(text)) == text.encode("utf-8")


def test_token_labels_show_a_lone_byte_of_a_character_as_its_bytes(pico, gpt2):
    """The clusters label each token alone: a byte that is part of a character reads <0xC3>,
    not U+FFFD, which every such byte would share; whole characters and the end of text read as
    themselves."""
    char = pico.ByteTokenizer()
    assert [pico.token_label(char, i) for i in char.encode("é")] == ["<0xC3>", "<0xA9>"]
    assert [pico.token_label(char, i) for i in (ord("a"), ord("\n"), char.eot_id)] == ["a", "\n", "<eot>"]
    snowman = gpt2.encode(" ☃")                      # " " and two of its bytes, then the third
    assert [pico.token_label(gpt2, i) for i in snowman] == [" <0xE2><0x98>", "<0x83>"]
    assert [pico.token_label(gpt2, i) for i in gpt2.encode(" café")] == [" café"]
    assert pico.token_label(gpt2, gpt2.encode("\ufffd")[0]) == "\ufffd"   # one that is U+FFFD


def test_char_tokenizer_round_trips_utf8(pico):
    tokenizer = pico.ByteTokenizer()
    text = "héllo 🙂"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode(ids + [tokenizer.eot_id]) == text


def test_unknown_tokenizer_is_a_user_error(pico):
    with pytest.raises(pico.UserError, match="--tokenizer"):
        pico.build_tokenizer("sentencepiece")
