"""Section 6: data sources, token cache, splits, epochs and batches."""

import json
import os
import random
import time

import numpy as np
import pytest
import torch


def args_for(pico, *argv):
    """The DataConfig this command line gives."""
    return pico.config_from_command_line(list(argv)).data


def test_input_file_lines_are_examples(pico, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n   \nsecond line  \n", encoding="utf-8")
    assert pico.read_text_lines(path) == ["first line", "second line"]


def test_a_stream_document_keeps_indentation_and_paragraphs(pico, tmp_path):
    path = tmp_path / "code.txt"
    path.write_bytes(b"\n  \ndef f(x):\r\n    return x  \n\n\nA paragraph.\n\n")
    assert pico.read_document(path) == "def f(x):\n    return x\n\n\nA paragraph."
    config = args_for(pico, "--input_files", str(path), "--data_format", "stream")
    assert pico.custom_documents(config) == ["def f(x):\n    return x\n\n\nA paragraph."]
    second = tmp_path / "second.txt"
    second.write_bytes("\ufeff\n    x = 1\n\n  two\fthree\nfour\n".encode())  # BOM; form feed
    assert pico.read_document(second) == "    x = 1\n\n  two\fthree\nfour"
    third = tmp_path / "third.txt"
    third.write_text("beyond the limit\n")
    limited = args_for(pico, "--input_files", str(path), str(second), str(third),
                       "--data_format", "stream", "--limit_custom_examples", "5")
    assert pico.custom_documents(limited) == ["def f(x):\n    return x\n\n\nA paragraph.",
                                              "    x = 1\n\n  two\fthree"]  # 5 non-blank lines
    assert pico.read_text_lines(path) == ["def f(x):", "return x", "A paragraph."]   # lines mode


def test_a_few_documents_are_cut_between_lines_not_beside_a_blank_one(pico):
    document = "p1\n\n\np2\np3\n\np4"
    for fraction in (0.2, 0.3, 0.5, 0.7):
        heads, tails = pico.split_documents([document], fraction, seed=0)
        head, = heads
        tail, = tails
        assert head and tail and head.strip("\n") == head and tail.strip("\n") == tail
        assert head.split("\n")[0] == "p1" and tail.split("\n")[-1] == "p4"
        assert (head + "\n" + tail).replace("\n", "") == document.replace("\n", "")


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"caf\xe9\n", "not valid UTF-8"),
    (b"\x00\x01\x02binary", "binary"),
])
def test_bad_input_files_raise_user_errors(pico, tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    for read in (pico.read_text_lines, pico.read_document):
        with pytest.raises(pico.UserError, match=message):
            read(path)


def test_input_dir_is_searched_recursively_for_txt(pico, tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub" / "deeper" / "b.txt").write_text("beta\ngamma\n")
    (tmp_path / "sub" / "ignored.md").write_text("not text data\n")
    args = args_for(pico, "--input_dir", str(tmp_path))
    assert sorted(pico.load_custom_examples(args)) == ["alpha", "beta", "gamma"]


def test_a_blank_file_in_input_dir_is_skipped_but_a_named_one_is_refused(pico, tmp_path, capsys):
    """A folder of documents may well hold an empty one; a file named on its own may not be."""
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text(" \n")
    for read, data_format in ((pico.load_custom_examples, "lines"), (pico.custom_documents, "stream")):
        assert read(args_for(pico, "--input_dir", str(tmp_path), "--data_format", data_format)) == ["alpha"]
        assert "skipped 1" in capsys.readouterr().err
    with pytest.raises(pico.UserError, match="b.txt is empty"):
        pico.load_custom_examples(args_for(pico, "--input_files", str(tmp_path / "b.txt")))


def test_a_skipped_files_name_with_control_characters_is_written_escaped(pico, tmp_path, capsys):
    """A name in a folder (a downloaded corpus's) holding a newline or a terminal's escape
    codes is shown as Python writes it: the note stays one line and sends no escape codes."""
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "\x1b[31mred\nx.txt").write_text("")
    assert pico.load_custom_examples(args_for(pico, "--input_dir", str(tmp_path))) == ["alpha"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert repr(str(tmp_path / "\x1b[31mred\nx.txt")) in err


@pytest.mark.parametrize("alias", ["hard link", "symbolic link", "named and in the folder"])
def test_one_file_under_two_names_is_refused(pico, tmp_path, alias):
    """Its lines would be in both the test and the training set."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha\nbeta\n")
    flags = ["--input_dir", str(tmp_path / "d")]
    if alias == "hard link":
        os.link(tmp_path / "d" / "a.txt", tmp_path / "b.txt")
        flags = ["--input_files", str(tmp_path / "d" / "a.txt"), str(tmp_path / "b.txt")]
    elif alias == "symbolic link":
        (tmp_path / "d" / "b.txt").symlink_to("a.txt")
    else:
        flags += ["--input_files", str(tmp_path / "d" / "a.txt")]
    for read, data_format in ((pico.load_custom_examples, "lines"), (pico.custom_documents, "stream")):
        with pytest.raises(pico.UserError, match=r"give each file once \(a link inside --input_dir: "
                                                 "move it out of the folder\\)"):
            read(args_for(pico, *flags, "--data_format", data_format))


def test_files_without_inode_numbers_are_all_read(pico, tmp_path, monkeypatch):
    """A file system that gives every file inode 0 (some network and FUSE ones) cannot tell
    links apart, so its files are read, not all refused as one file."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"{name}\n")
    real_stat = pico.Path.stat

    def stat_without_inodes(path, *args, **kwargs):
        status = real_stat(path, *args, **kwargs)
        return os.stat_result((*status[:1], 0, *status[2:]))   # (mode, ino, dev, ...)

    monkeypatch.setattr(pico.Path, "stat", stat_without_inodes)
    args = args_for(pico, "--input_files", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    assert pico.load_custom_examples(args) == ["a.txt", "b.txt"]


def test_get_batch_draws_every_window_the_array_holds(pico):
    """Six tokens hold two windows of four inputs and their targets, starting at 0 and 1."""
    inputs, targets = pico.get_batch(np.arange(6), 64, 4, "cpu", np.random.default_rng(0))
    assert set(inputs[0].tolist()) == {0, 1}
    assert torch.equal(targets[:-1], inputs[1:])


def test_a_small_test_fraction_still_holds_out_one_example(pico):
    train, test = pico.split_indices(10, 0.01, seed=0)
    assert (len(train), len(test)) == (9, 1)
    assert pico.split_indices(10, 0.0, seed=0)[1].size == 0
    assert [len(part) for part in pico.split_indices(3, 0.9, seed=0)] == [1, 2]  # and one trains


def test_from_min_documents_for_holdout_whole_documents_are_held_out(pico):
    """At MIN_DOCUMENTS_FOR_HOLDOUT documents a whole fifth is held out; one fewer, and each
    document gives its last lines instead."""
    count = pico.MIN_DOCUMENTS_FOR_HOLDOUT
    documents = [f"doc {i} line a\ndoc {i} line b" for i in range(count)]
    train, test = pico.split_documents(documents, 0.2, seed=0)
    assert len(test) == round(0.2 * count) and sorted(train + test) == sorted(documents)
    train, test = pico.split_documents(documents[:-1], 0.2, seed=0)
    assert len(train) == len(test) == count - 1 and all(t.endswith("line b") for t in test)


def test_each_rank_evaluates_its_own_share_of_the_test_set(pico, gpt2):
    data = make_data(pico, gpt2, [f"example number {i}" for i in range(40)], test_fraction=0.25)
    whole = [batch.inputs.t().tolist() for batch in data.test_batches(64)]
    shares = [[row for batch in data.test_batches(2, rank, 2) for row in batch.inputs.t().tolist()]
              for rank in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == len(whole[0]) == 10
    assert sorted(shares[0] + shares[1]) == sorted(whole[0])


def test_input_dir_without_txt_files_is_a_user_error(pico, tmp_path):
    (tmp_path / "notes.md").write_text("x\n")
    with pytest.raises(pico.UserError, match="no .txt"):
        pico.load_custom_examples(args_for(pico, "--input_dir", str(tmp_path)))


def test_limit_custom_examples(pico, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    args = args_for(pico, "--input_files", str(path), "--limit_custom_examples", "3")
    assert pico.load_custom_examples(args) == ["line 0", "line 1", "line 2"]


def test_default_source_is_the_shipped_custom_corpus(pico):
    examples = pico.load_custom_examples(args_for(pico))
    assert len(examples) >= 180


def test_token_cache_is_reused_without_retokenizing(pico, gpt2, tmp_path):
    texts = ["one two three", "four five"]
    first = pico.tokenize_examples(texts, gpt2, tmp_path)

    class NoEncoding:
        name, vocab_size, eot_id = gpt2.name, gpt2.vocab_size, gpt2.eot_id

        def encode_batch(self, texts):
            raise AssertionError("the cache should have been used")

    second = pico.tokenize_examples(texts, NoEncoding(), tmp_path)
    assert isinstance(second.tokens, np.memmap)
    assert np.array_equal(first.tokens, second.tokens)
    assert list(second.example(0)) == gpt2.encode("one two three") + [gpt2.eot_id]
    # another tokenizer or other content gets its own cache entry
    pico.tokenize_examples(texts, pico.ByteTokenizer(), tmp_path)
    pico.tokenize_examples(texts + ["six"], gpt2, tmp_path)
    assert len(list(tmp_path.glob("*.tokens.npy"))) == 3


def test_split_is_deterministic_disjoint_and_complete(pico):
    train, test = pico.split_indices(100, 0.1, seed=7)
    again_train, again_test = pico.split_indices(100, 0.1, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert len(test) == 10 and not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(range(100))
    assert not np.array_equal(pico.split_indices(100, 0.1, seed=8)[1], test)


def make_data(pico, gpt2, texts, block_size=16, seed=0, test_fraction=0.0):
    examples = pico.tokenize_examples(texts, gpt2, None)
    train, test = pico.split_indices(len(examples), test_fraction, seed)
    source = pico.DataSource("custom", examples, train, test)
    return pico.TrainingData([source], [1.0], block_size, gpt2.eot_id, seed)


def test_an_epoch_visits_every_training_example_once(pico, gpt2):
    texts = [f"example number {i}" for i in range(23)]
    data = make_data(pico, gpt2, texts)
    for _ in range(2):
        slots = data.epoch_order()
        assert sorted(index for _, index in slots) == list(range(23))
    assert data.steps_per_epoch(5, None) == 5 and data.steps_per_epoch(5, 2) == 2
    seen = [int(b.inputs.shape[1]) for b in data.train_batches(5, None)]
    assert seen == [5, 5, 5, 5, 3]


def test_mixed_sources_follow_the_weight(pico, gpt2):
    custom = pico.tokenize_examples([f"c {i}" for i in range(500)], gpt2, None)
    stories = pico.tokenize_examples([f"s {i}" for i in range(500)], gpt2, None)
    sources = [pico.DataSource("custom", custom, np.arange(500), np.arange(0)),
               pico.DataSource("tinystories", stories, np.arange(500), np.arange(0))]
    data = pico.TrainingData(sources, [0.2, 0.8], 8, gpt2.eot_id, 0)
    from_stories = sum(source == 1 for source, _ in data.epoch_order()) / 1000
    assert 0.75 < from_stories < 0.85


def test_batches_are_seq_len_by_batch_and_mask_padding(pico, gpt2):
    batch = pico.make_batch([np.array([1, 2, 3, 4, 5]), np.array([7, 8])], block_size=16, pad_id=99)
    assert batch.inputs.shape == (4, 2) and batch.targets.shape == (4, 2)
    assert batch.inputs[:, 0].tolist() == [1, 2, 3, 4]
    assert batch.targets[:, 0].tolist() == [2, 3, 4, 5]
    assert batch.mask[:, 1].tolist() == [True, False, False, False]
    assert batch.num_target_tokens == 5


def test_examples_are_truncated_to_the_block_size(pico):
    batch = pico.make_batch([np.arange(100)], block_size=8, pad_id=0)
    assert batch.inputs.shape == (8, 1) and batch.targets[-1, 0] == 8


def summed_loss(pico, model, batch):
    """The next-token loss of `model` on `batch`, summed over the real targets."""
    return pico.NextTokenLoss(model)(batch.inputs, batch.targets, batch.mask.float())


def test_padding_never_enters_the_loss(pico):
    torch.manual_seed(0)
    model = pico.LSTMSeqModel(vocab_size=50, embed_size=8, hidden_size=8)
    short = np.array([1, 2, 3])
    padded_a = pico.make_batch([short, np.arange(10)], block_size=16, pad_id=0)
    padded_b = pico.make_batch([short, np.arange(10)], block_size=16, pad_id=49)
    alone = pico.make_batch([short], block_size=16, pad_id=0)
    loss_a = summed_loss(pico, model, padded_a)
    loss_b = summed_loss(pico, model, padded_b)
    assert torch.allclose(loss_a, loss_b)
    long_alone = pico.make_batch([np.arange(10)], block_size=16, pad_id=0)
    expected = (summed_loss(pico, model, alone)
                + summed_loss(pico, model, long_alone))
    assert torch.allclose(loss_a, expected, atol=1e-4)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet"])
def test_tinystories_loads_a_local_copy_through_datasets(pico, tmp_path, suffix):
    stories = ["Tom saw a red ball.", "Sue liked to sing.", "The cat slept."]
    path = tmp_path / f"stories{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    elif suffix == ".txt":
        path.write_text("\n".join(stories) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": stories}), path)
    assert pico.load_tinystories(2, str(path)) == stories[:2]


def test_tinystories_own_txt_gives_the_stories_between_its_markers(pico, tmp_path):
    """TinyStories' .txt files: stories of several lines (a blank one among them), a line
    <|endoftext|> after each; in such a file a marker may also end a line. Each story is one
    record, its lines kept, and --tinystories_max_stories counts stories. A marker line that
    the reader's 1 MiB chunks cut in two is found all the same."""
    stories = ["Tom saw a red ball.\nHe kicked it.", "Sue liked to sing.\n\nShe sang all day.",
               "The cat slept.", "The end came."]
    path = tmp_path / "TinyStories-valid.txt"
    text = (f"{stories[0]}\n<|endoftext|>\n{stories[1]}\n<|endoftext|>\n"
            f"{stories[2]}<|endoftext|>{stories[3]}\n")
    path.write_text(text)
    assert pico.load_tinystories(10, str(path)) == stories
    assert pico.load_tinystories(2, str(path)) == stories[:2]
    cut = (1 << 20) - 5                          # the first marker straddles the chunk boundary
    path.write_text("x" * (cut - 20) + " " * 19 + "\n<|endoftext|>\nThe end.\n")
    assert pico.load_tinystories(10, str(path)) == ["x" * (cut - 20), "The end."]
    path.write_bytes(b"Once.\r\n<|endoftext|>\r\nTwice.\r\n<|endoftext|>")   # CRLF, marker last
    assert pico.load_tinystories(10, str(path)) == ["Once.", "Twice."]
    path.write_text("Once upon a time.\nThe end.\n<|endoftext|>")      # its one marker, last
    assert pico.load_tinystories(10, str(path)) == ["Once upon a time.\nThe end."]
    # A marker only inside a line is text, not a separator: a story a line, as ever
    path.write_text("The token <|endoftext|> ends a text.\nTom saw a ball.\n")
    assert pico.load_tinystories(10, str(path)) == ["The token <|endoftext|> ends a text.",
                                                    "Tom saw a ball."]


def reference_nesting_depth(text: str) -> int:
    """JSON's nesting, byte by byte: brackets inside strings (and escaped quotes) do not count."""
    deepest = depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def test_json_nesting_depth_skips_strings_across_chunk_boundaries(pico, tmp_path):
    """Random documents whose strings hold brackets, quotes and runs of backslashes, read in
    chunks that cut through all of them."""
    rng = random.Random(0)

    def document(level):
        text = "".join(rng.choice('[]{}"\\ab') for _ in range(rng.randint(0, 6)))
        if level > 5 or rng.random() < 0.3:
            return text
        if rng.random() < 0.5:
            return [document(level + 1) for _ in range(rng.randint(0, 3))]
        return {text + str(i): document(level + 1) for i in range(rng.randint(0, 3))}

    path = tmp_path / "stories.json"
    for _ in range(100):
        text = json.dumps(document(0))
        path.write_text(text)
        for chunk_bytes in (1, 2, 3, 7, 1 << 22):
            assert pico.json_nesting_depth(path, 10**9, chunk_bytes) == reference_nesting_depth(text)
    path.write_text('{"text": "' + "[" * 5000 + '"}')            # deep only inside a string
    assert pico.json_nesting_depth(path, 1000) == 1
    path.write_text('[["' + "\\\\" * 100_000 + '\\"[["]]')   # long runs: counted at once
    assert pico.json_nesting_depth(path, 1000) == 2


def test_tinystories_mixes_into_training_data(pico, gpt2, tmp_path):
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": f"Story {i}."}) + "\n" for i in range(20)))
    custom = tmp_path / "custom.txt"
    custom.write_text("".join(f"custom {i}\n" for i in range(20)))
    args = args_for(pico, "--input_files", str(custom), "--tinystories_weight", "0.25",
                    "--tinystories_path", str(path), "--cache_dir", str(tmp_path / "c"))
    data = pico.load_training_data(args, gpt2, pico.read_sources(args))
    assert [s.name for s in data.sources] == ["custom", "tinystories"]
    assert data.num_train_examples == 36
    assert data.weights.tolist() == [0.75, 0.25]       # each slot's source: the rest is custom's


def test_unreachable_hub_fails_fast_naming_the_local_option(pico, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(pico.UserError, match="--tinystories_path"):
        pico.load_tinystories(10, None)
    assert time.perf_counter() - started < 10


# --- stream mode: documents as one token stream, read in windows ------------------------------

def test_auto_data_format_is_lines_for_input_files_and_stream_otherwise(pico, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n")
    resolved = lambda *argv: pico.resolved_data_format(args_for(pico, *argv))  # noqa: E731
    assert resolved("--input_files", str(path)) == "lines"
    assert resolved("--input_dir", str(tmp_path)) == "stream"
    assert resolved() == "stream"                                     # the shipped corpus
    assert resolved("--input_files", str(path), "--data_format", "stream") == "stream"


def test_few_documents_keep_their_tails_for_testing_many_are_held_out_whole(pico):
    few = ["\n".join(f"doc{d} line{i}" for i in range(10)) for d in range(3)]
    train, test = pico.split_documents(few, 0.2, seed=0)
    assert [t.split("\n")[-1] for t in train] == ["doc0 line7", "doc1 line7", "doc2 line7"]
    assert test == ["doc0 line8\ndoc0 line9", "doc1 line8\ndoc1 line9", "doc2 line8\ndoc2 line9"]
    many = [f"story {i}" for i in range(50)]
    train, test = pico.split_documents(many, 0.2, seed=0)
    assert len(test) == 10 and sorted(train + test) == sorted(many)
    assert (train, test) == pico.split_documents(many, 0.2, seed=0)     # fixed by the seed
    assert pico.split_documents(many, 0.2, seed=1) != (train, test)


def test_windows_make_every_token_of_a_stretch_a_target_once(pico):
    tokens = np.arange(100)
    windows, (first, second) = pico.TokenWindows.over(tokens, [(0, 37), (37, 100)], 8, 100)
    for indices, (begin, end) in ((first, (0, 37)), (second, (37, 100))):
        targets = [t for i in indices for t in windows.example(i)[1:].tolist()]
        assert targets == list(range(begin + 1, end))                 # each once, in order
        assert all(len(windows.example(i)) <= 9 for i in indices)
    assert sum(windows.length(i) - 1 for i in range(len(windows))) == 98


def test_a_stretch_ending_on_a_window_boundary_makes_no_window_without_a_target(pico):
    """Nine tokens in windows of 4 positions: [0..4] and [4..8]; a third window of token 8
    alone would predict nothing and count as an example (a step's row of padding)."""
    windows, _ = pico.TokenWindows.over(np.arange(9), [(0, 9)], 4, 9)
    assert windows.starts.tolist() == [0, 4] and windows.ends.tolist() == [5, 9]
    assert all(windows.length(i) >= 2 for i in range(len(windows)))


def test_a_window_has_no_room_to_shift_past_its_stretch(pico):
    """--random_offsets moves a window by at most its slack: a training window moved past its
    stretch's end would read the test text that follows."""
    stretches = [(0, 13), (13, 23), (23, 40)]
    windows, indices = pico.TokenWindows.over(np.arange(40), stretches, 4, 40)
    for (begin, end), stretch in zip(stretches, indices):
        for i in stretch:
            assert windows.ends[i] + windows.slack[i] <= end and windows.slack[i] >= 0
    assert windows.slack[indices[0][-1]] == 0          # the last window ends at the stretch's end
    windows.shifts = windows.slack
    assert all(max(windows.example(i)) < 13 for i in indices[0])


def test_each_epoch_shuffles_the_training_examples_anew(pico):
    """Every epoch visits each training example once, in an order of its own (drawn from the
    seed and the epoch, so a resumed epoch repeats it)."""
    texts = [f"line {i}" for i in range(40)]
    examples = pico.tokenize_examples(texts, pico.ByteTokenizer(), None)
    train, test = pico.split_indices(len(texts), 0.1, seed=0)
    data = pico.TrainingData([pico.DataSource("custom", examples, train, test)], [1.0], 16, 0,
                             seed=5)
    first, second = data.epoch_order(1), data.epoch_order(2)
    assert sorted(index for _, index in first) == sorted(train.tolist())
    assert sorted(index for _, index in second) == sorted(train.tolist())
    assert first != second and data.epoch_order(1) == first


def test_a_gpt2_text_holding_the_end_of_text_marker_stays_one_example(pico):
    """The fast path joins texts with <|endoftext|> and splits at it: a text that itself holds
    the marker goes the slow way, one example per text, ending in one end-of-text id each."""
    tokenizer = pico.GPT2Tokenizer()
    examples = pico.tokenize_examples(["a<|endoftext|>b", "c"], tokenizer, None)
    assert len(examples) == 2
    assert examples.tokens[examples.offsets[1:] - 1].tolist() == [tokenizer.eot_id] * 2


def test_random_offsets_move_each_epochs_training_windows_within_their_stretch(pico):
    """--random_offsets: every epoch reads other windows (drawn from the seed and the epoch, so
    a resumed epoch reads the same ones), each as long as before and inside its own stretch;
    test windows never move."""
    tokens = np.arange(1000)
    windows, (train, test) = pico.TokenWindows.over(tokens, [(0, 900), (900, 1000)], 16, 1000)
    source = pico.DataSource("stream", windows, train, test)
    data = pico.TrainingData([source], [1.0], 16, 0, seed=3, data_format="stream",
                             random_offsets=True)

    def epoch_windows(epoch):
        first_batches = next(data.train_step_slots(len(train), None, epoch))
        return {index: windows.example(index).tolist() for _, index in first_batches}

    first, second = epoch_windows(1), epoch_windows(2)
    assert first != second and epoch_windows(1) == first
    for index, window in first.items():
        assert len(window) == windows.length(index)                       # same length
        assert window == list(range(window[0], window[0] + len(window)))  # contiguous text
        assert 0 <= window[0] - windows.starts[index] < 16 and window[-1] < 900  # own stretch
    assert len({w[0] % 16 for w in first.values()}) > 8                   # offsets vary
    assert [windows.example(i).tolist() for i in test] == [
        list(range(s, min(s + 17, 1000))) for s in range(900, 999, 16)]   # unmoved
    plain = pico.TrainingData([pico.DataSource("stream", pico.TokenWindows.over(
        tokens, [(0, 900), (900, 1000)], 16, 1000)[0], train, test)], [1.0], 16, 0, seed=3,
        data_format="stream")
    batch = plain.batch_of(next(plain.train_step_slots(4, None, 2)))
    assert (batch.inputs[0] % 16 == 0).all()                              # off: block starts


def test_stream_data_trains_on_windows_across_lines_and_tests_on_all_held_out_text(pico, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.txt").write_text("".join(f"{name} line {i}\n" for i in range(40)))
    config = args_for(pico, "--input_dir", str(corpus), "--block_size", "16",
                      "--cache_dir", str(tmp_path / "cache"))
    tokenizer = pico.ByteTokenizer()
    data = pico.load_training_data(config, tokenizer, pico.read_sources(config))
    assert data.data_format == "stream"
    source = data.sources[0]
    texts = pico.read_sources(config)[0]
    train_text = "".join(t + "\x00" for t in texts.texts[:len(texts.train)])  # + one eot each
    test_text = "".join(t + "\x00" for t in texts.texts[len(texts.train):])
    assert data.target_tokens([(0, int(i)) for i in source.train]) == len(train_text) - 1
    assert data.target_tokens([(0, int(i)) for i in source.test]) == len(test_text) - 1
    window = source.examples.example(int(source.train[0]))
    assert (window == ord("\n")).any()                                # windows cross line breaks
    batches = list(data.train_batches(4, None, epoch=1))
    assert sum(int(b.mask.sum()) for b in batches) == len(train_text) - 1  # an epoch: one pass


def test_a_stream_run_records_its_format_and_samples_across_lines(pico, run_main, tmp_path):
    """Lines of a play: a speaker's name, then a speech. In stream mode the model learns
    that a name line is followed by more text."""
    corpus = tmp_path / "plays"
    corpus.mkdir()
    lines = [("ROMEO." if i % 2 == 0 else "I speak of love and moonlight.") for i in range(400)]
    (corpus / "play.txt").write_text("\n".join(lines) + "\n")
    status, _, err = run_main("--input_dir", str(corpus), "--models", "lstm_seq", "--block_size", "32",
                              "--embed_size", "64", "--epochs", "3", "--learning_rate", "0.01",
                              "--prompt", "ROMEO.", "--max_new_tokens", "12", "--run_name", "play",
                              "--quiet")
    assert status == 0, err
    log = pico.load_runlog(tmp_path / "artefacts" / "play.json")
    assert log["data"]["data_format"] == "stream" and log["args"]["data_format"] == "auto"
    greedy = [s["text"] for s in log["models"]["lstm_seq"]["samples"] if s["rule"] == "greedy"][-1]
    assert greedy.startswith("ROMEO.\nI ")


def test_a_missing_shipped_corpus_is_named_as_such(pico, monkeypatch, tmp_path, capsys):
    """No data flag and no data/custom_corpus (an incomplete checkout): the error names the
    shipped corpus, not an --input_dir the user never gave."""
    monkeypatch.setattr(pico, "DEFAULT_CUSTOM_CORPUS", tmp_path / "custom_corpus")
    status = pico.main(["--models", "lstm_seq", "--epochs", "1", "--device_id", "cpu",
                        "--artefacts_dir", str(tmp_path / "art"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"the shipped corpus {tmp_path / 'custom_corpus'} is missing" in err
    assert "--input_dir" in err and "give --input_files or --input_dir" in err


@pytest.mark.parametrize("data_format", ["lines", "stream"])
def test_the_training_datas_fingerprint_changes_with_one_character_of_its_text(pico, data_format):
    """--resume compares it with the checkpoint's: in stream mode (the default for --input_dir,
    the shipped corpus and TinyStories) as in lines mode."""
    def fingerprint(text):
        source = pico.SourceTexts("custom", [text], 1.0, np.array([0]), np.array([], dtype=np.int64))
        data = pico.DataConfig(data_format=data_format, block_size=8)
        return pico.load_training_data(data, pico.ByteTokenizer(), [source]).fingerprint
    story = "one story, then another story " * 4
    assert fingerprint(story) == fingerprint(story)
    assert fingerprint(story) != fingerprint(story[:-2] + "z ")


def test_a_line_break_moved_between_two_examples_is_another_token_cache(pico, tmp_path):
    """The same characters cut into other examples: the cache key tells them apart, so the
    second text is not read back with the first one's example boundaries."""
    tokenizer = pico.ByteTokenizer()
    first = pico.tokenize_examples(["ab", "c"], tokenizer, tmp_path)
    second = pico.tokenize_examples(["a", "bc"], tokenizer, tmp_path)
    assert first.key != second.key
    assert first.offsets.tolist() == [0, 3, 5] and second.offsets.tolist() == [0, 2, 5]
