"""Section 2.2: byte-level BPE (training, Tokenizer, GPT-2 equivalence, tiktoken fast path)."""
import heapq
import itertools
import os
import random
from collections import Counter

import pytest
import tiktoken
import tiktoken.load

from conftest import load_pico

pico = load_pico()
PAT, Tokenizer, count_pretokens = pico.GPT2_PATTERN, pico.Tokenizer, pico.count_pretokens
find_chunk_boundaries, gpt2_vocab_and_merges = pico.find_chunk_boundaries, pico.gpt2_vocab_and_merges
learn_merges, pretokenize_file, train_bpe = pico.learn_merges, pico.pretokenize_file, pico.train_bpe
tiktoken_encoding_from_bpe, PAT_RE = pico.tiktoken_encoding_from_bpe, pico.PAT_RE
GPT2_RANKS = str(pico.GPT2_RANKS_PATH)
EOT = "<|endoftext|>"

VARIED_TEXTS = [
    "Hello, world! This is a test.",
    "It's, I'm, you'll, we've, they're, she'd, don't, DON'T, 'tis",
    "a   b\n\n\n  c\t\t",
    "   leading spaces", "trailing spaces   ", "\n\nnewlines first\n\n",
    "numbers 12345 3.14159 1,000,000 -42 2024-01-01",
    "emoji 😀👍🏽🤖 family 👨‍👩‍👧 flags 🇫🇷",
    "CJK 日本語のテキスト 中文 한국어",
    "accents: café naïve résumé Ångström ñ ü ß",
    f"story one{EOT}story two{EOT}{EOT}end",
    "odd whitespace \u00a0nbsp \u3000ideographic \x85nel \x1cfs \r\n\r\nwindows",
    "code: def f(x):\n    return x**2  # square\n\tif x >= 0: pass",
    "", " ", "\n",
]

WORDS = ("the of and to a in is it you that he was for on are with as I his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them write "
         "would like so these her long make thing see him two has look more day could go come did "
         "number sound no most people my over know water than call first who may down side been "
         "now find any new work part take get place made live where after back little only round "
         "man year came show every good me give our under name very through just form sentence "
         "great think say help low line differ turn cause much mean before move right boy old too "
         "same tell does set three want air well also play small end put home read hand port large "
         "spell add even land here must big high such follow act why ask men change went light "
         "kind off need house picture try us again animal point mother world near build self earth "
         "café naïve 東京 😀").split()


def english_like_text(num_bytes, seed=0):
    """Deterministic pseudo-English: Zipf-distributed words, punctuation, numbers, lines."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]
    parts, size = [], 0
    while size < num_bytes:
        words = rng.choices(WORDS, weights, k=rng.randint(3, 15))
        words = [w if rng.random() < 0.9 else  # plus rare words, as real text has many
                 "".join(rng.choices("etaoinshrdlucmfwypvbgkjqxz", k=rng.randint(3, 10)))
                 for w in words]
        sentence = " ".join(words).capitalize()
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 10 ** rng.randint(1, 6))}"
        if rng.random() < 0.1:
            sentence += ", isn't it?" if rng.random() < 0.5 else " (they're 'quoted')"
        sentence += rng.choice([". ", ". ", "! ", ".\n", ".\n\n", "  \n"])
        parts.append(sentence)
        size += len(sentence.encode())
    return "".join(parts)


def write(tmp_path, text, name="corpus.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ----------------------------------------------------------------------------- training

def test_hand_checkable_merges(tmp_path):
    # Pre-tokens (newlines are separate one-byte pre-tokens): low x5, lower x2, widest x3,
    # newest x6. Pair counts: es=9, st=9 -> tie, the greater pair (s,t) wins; then (e,st)=9;
    # then lo=7 ties ow=7 -> (o,w); (l,ow)=7; then ne=ew=w-est=6 -> (w,est) (b"w" is
    # greatest); then (n,e)=6 beats (e,west)=6; (ne,west)=6; then wi=id=d-est=3 -> (w,i)...
    text = "low\n" * 5 + "lower\n" * 2 + "widest\n" * 3 + "newest\n" * 6
    vocab, merges = train_bpe(write(tmp_path, text), 256 + 1 + 12, [EOT])
    expected = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"),
                (b"n", b"e"), (b"ne", b"west"), (b"w", b"i"), (b"wi", b"d"), (b"wid", b"est"),
                (b"low", b"e"), (b"lowe", b"r")]
    assert merges == expected
    assert vocab[256] == EOT.encode()
    assert vocab[257] == b"st" and vocab[268] == b"lower"


def test_tie_break_prefers_greater_bytes(tmp_path):
    # Pre-tokens: "ab" x1, " ab" x2, " cd" x3. (a,b), (" ",c), (c,d) all count 3: the
    # greatest, (c,d), goes first. Then (a,b) and (" ",cd) tie at 3: b"a" > b" ".
    vocab, merges = train_bpe(write(tmp_path, "ab cd ab cd ab cd"), 256 + 4, [])
    assert merges == [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd"), (b" ", b"ab")]


def test_vocab_layout_and_early_stop(tmp_path):
    path = write(tmp_path, english_like_text(20_000))
    vocab, merges = train_bpe(path, 400, [EOT, "<|pad|>"])
    assert sorted(vocab) == list(range(400)) and len(merges) == 400 - 258
    assert all(vocab[i] == bytes([i]) for i in range(256))
    assert vocab[256] == EOT.encode() and vocab[257] == b"<|pad|>"
    assert all(vocab[258 + i] == a + b for i, (a, b) in enumerate(merges))
    # "a<|endoftext|>b<|endoftext|>...": one-byte pre-tokens only, no pair: stops at once
    vocab, merges = train_bpe(write(tmp_path, f"a{EOT}b{EOT}" * 50, "tiny.txt"), 1000, [EOT])
    assert merges == [] and sorted(vocab) == list(range(257))
    with pytest.raises(ValueError):
        train_bpe(path, 256, [EOT])


def test_special_tokens_never_merged(tmp_path):
    text = f"cat{EOT}dog{EOT}" * 200 + f"<|end{EOT}oftext|>{EOT}" * 50
    vocab, merges = train_bpe(write(tmp_path, text), 300, [EOT])
    assert vocab[256] == EOT.encode()
    pieces = [b"cat", b"dog", b"<|end", b"oftext|>"]  # the text between special tokens
    for token in list(vocab.values())[257:]:
        assert any(token in piece for piece in pieces), token
    assert (b"ca", b"t") in merges or (b"c", b"at") in merges


def naive_train(pretoken_counts, num_merges):
    """Reference trainer: recount every pair from scratch at each step."""
    words = {tuple(bytes([b]) for b in w): n for w, n in pretoken_counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


def test_incremental_matches_naive(tmp_path):
    rng = random.Random(1)
    alphabet = "aaabbbccdde  \n!?1é😀"  # small alphabet: many ties and repeated pairs ("aaa")
    text = "".join(rng.choice(alphabet) for _ in range(20_000))
    path = write(tmp_path, text)
    _, merges = train_bpe(path, 256 + 300, [])
    assert merges == naive_train(count_pretokens(text, []), 300)


def test_rebuilding_the_heap_from_live_counts_changes_no_merge(monkeypatch):
    """learn_merges drops stale heap entries by rebuilding the heap once they pile up (past
    10,000 on a large corpus); rebuilt after every merge, it learns the same merges."""
    rng = random.Random(0)
    counts = Counter()
    for _ in range(2000):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(4, 10)))
        counts[word.encode()] += rng.randrange(1, 5)
    rebuilt, heapify = [], heapq.heapify
    monkeypatch.setattr(pico, "STALE_HEAP_ENTRIES", -10**9)         # rebuilt at every merge
    monkeypatch.setattr(heapq, "heapify", lambda heap: rebuilt.append(len(heap)) or heapify(heap))
    merges = learn_merges(counts, 150)
    assert len(rebuilt) == 1 + 150                     # the first heap, then one per merge
    assert merges == naive_train(counts, 150)
    few = Counter(dict(list(counts.items())[:300]))    # to the end: pairs seen once merge last
    merges = learn_merges(few, 10**6)
    assert merges == naive_train(few, 10**6) and len(merges) > 500


# ----------------------------------------------------------------------------- parallel

def test_parallel_pretokenization_matches_single_process(tmp_path):
    text = "".join(english_like_text(3000, seed=s) + EOT for s in range(30))
    path = write(tmp_path, text)
    bounds = find_chunk_boundaries(path, 8, EOT)
    raw = text.encode()
    assert len(bounds) > 4 and all(raw[b:].startswith(EOT.encode()) for b in bounds[1:-1])
    single = pretokenize_file(path, [EOT], num_workers=1)
    assert pretokenize_file(path, [EOT], num_workers=2, min_chunk_bytes=2000) == single
    assert train_bpe(path, 400, [EOT], num_workers=2, min_chunk_bytes=2000) == \
        train_bpe(path, 400, [EOT], num_workers=1)


def test_chunk_boundaries_past_the_last_split_token_fall_at_the_end_of_the_file(tmp_path):
    """A guessed boundary with no <|endoftext|> after it (a last story longer than the read
    window) becomes the file's end: never a cut inside that story, and no chunk counted twice."""
    stories = "".join(english_like_text(200, seed=s) + EOT for s in range(20))
    window, num_chunks = 1024, 8
    text = stories + english_like_text(3 * window, seed=99)     # the long last story: no marker
    path, raw = write(tmp_path, text), text.encode()
    bounds = find_chunk_boundaries(path, num_chunks, EOT, window=window)
    assert bounds == sorted(set(bounds)) and bounds[0] == 0 and bounds[-1] == len(raw)
    assert all(raw[b:].startswith(EOT.encode()) for b in bounds[1:-1])
    last_marker = raw.rfind(EOT.encode())
    assert len(raw) * (num_chunks - 1) // num_chunks > last_marker  # some guesses land past it
    assert [b for b in bounds if b > last_marker] == [len(raw)]
    single = pretokenize_file(path, [EOT], num_workers=1)
    assert pretokenize_file(path, [EOT], num_workers=2, min_chunk_bytes=len(raw) // num_chunks) \
        == single == count_pretokens(text, [EOT])


def test_pool_workers_end_quietly_under_the_scripts_sigterm_handler(tmp_path, capfd):
    """As a script, pico-llm turns SIGTERM into an exception; the pool ends its workers with
    SIGTERM, so workers that inherited that handler each printed a traceback."""
    import signal
    path = write(tmp_path, "".join(english_like_text(500, seed=s) + EOT for s in range(8)))
    previous = signal.signal(signal.SIGTERM, pico.raise_terminated)
    try:
        counts = pretokenize_file(path, [EOT], num_workers=2, min_chunk_bytes=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert counts == pretokenize_file(path, [EOT], num_workers=1)
    assert capfd.readouterr().err == ""


def test_pool_workers_start_with_sigterm_held_until_it_ends_them(tmp_path, monkeypatch):
    """A SIGTERM reaching a worker before it takes SIGTERM's default waits for that default
    (it is blocked from the fork on), rather than reach the parent's handler, whose call a
    fresh child can drop: such a worker never ended. The parent's own mask is left as it was."""
    import signal
    record, real = tmp_path / "mask", pico.default_signals

    def recording():                  # what the worker's mask is before and after
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        real()
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        handler = signal.getsignal(signal.SIGTERM)
        record.write_text(f"{signal.SIGTERM in before} {signal.SIGTERM in after} "
                          f"{handler is signal.SIG_DFL}")
    monkeypatch.setattr(pico, "default_signals", recording)
    previous = signal.signal(signal.SIGTERM, pico.raise_terminated)
    try:
        with pico.start_pool(1) as pool:
            assert pool.apply(os.getpid) != os.getpid()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert record.read_text() == "True False True"
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_pool_workers_start_where_signals_cannot_be_held(tmp_path, monkeypatch):
    """Without signal masks (Windows) the pool starts as before and counts the same."""
    path = write(tmp_path, "".join(english_like_text(300, seed=s) + EOT for s in range(4)))
    monkeypatch.setattr(pico, "CAN_HOLD_SIGNALS", False)
    monkeypatch.delattr("signal.pthread_sigmask")
    counts = pretokenize_file(path, [EOT], num_workers=2, min_chunk_bytes=1)
    monkeypatch.undo()
    assert counts == pretokenize_file(path, [EOT], num_workers=1)


def test_parallel_without_special_tokens_cuts_at_safe_newlines(tmp_path):
    # "\n\n " runs and spaces before newlines: a cut at an arbitrary newline would differ
    text = "".join(english_like_text(2000, seed=s) + "\n\n  x  \n \n" for s in range(30))
    path = write(tmp_path, text)
    assert len(find_chunk_boundaries(path, 8)) > 4
    assert pretokenize_file(path, [], num_workers=2, min_chunk_bytes=2000) == count_pretokens(text, [])


def test_without_special_tokens_every_cut_is_a_newline_after_a_printable_byte(tmp_path):
    """Most newlines here are unsafe (after a space, or before another newline), and small
    windows put a cut near each: every cut still lands on a newline whose byte before it is
    printable and not a space, and the chunks count the whole text's pre-tokens."""
    text = "".join(f"w{i} \n\n x \n \n" + ("end.\n" if i % 7 == 0 else "") for i in range(400))
    path = write(tmp_path, text)
    raw = text.encode()
    boundaries = find_chunk_boundaries(path, 64, window=16)
    assert len(boundaries) > 20
    for cut in boundaries[1:-1]:
        assert raw[cut:cut + 1] == b"\n" and 0x21 <= raw[cut - 1] <= 0x7e, raw[cut - 8:cut + 8]
    assert pretokenize_file(path, [], num_workers=2, min_chunk_bytes=64) == count_pretokens(text, [])


def test_a_vocabulary_of_500_on_100_kb_takes_every_merge_it_asks_for(tmp_path):
    """256 bytes, the special token, then 243 merges, each a new token made of two earlier
    ones, none of them repeated."""
    path = write(tmp_path, english_like_text(100_000))
    vocab, merges = train_bpe(path, 500, [EOT])
    assert len(vocab) == 500 and len(merges) == 500 - 256 - 1
    assert vocab[256] == EOT.encode()
    earlier = set(vocab[i] for i in range(256))
    for index, (first, second) in enumerate(merges):
        assert first in earlier and second in earlier, index
        assert vocab[257 + index] == first + second not in earlier
        earlier.add(first + second)


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    text = "".join(english_like_text(8000, seed=s) + EOT for s in range(8))
    path = tmp_path_factory.mktemp("bpe") / "train.txt"
    path.write_bytes(text.encode())
    vocab, merges = train_bpe(str(path), 800, [EOT])
    return vocab, merges


@pytest.fixture(scope="module")
def gpt2():
    vocab, merges = gpt2_vocab_and_merges(GPT2_RANKS)
    reference = tiktoken.Encoding(
        name="gpt2", pat_str=PAT, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(GPT2_RANKS),
        special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    return Tokenizer(vocab, merges, special_tokens=[EOT]), reference


def test_gpt2_vocab_and_merges(gpt2):
    tokenizer, _ = gpt2
    assert tokenizer.vocab_size == 50257 and tokenizer.vocab[50256] == EOT.encode()
    assert len(tokenizer.merge_ranks) == 50000
    assert tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", VARIED_TEXTS + [pytest.param(english_like_text(5000, seed=7),
                                                              id="5,000 bytes of pseudo-English")])
def test_gpt2_matches_tiktoken(gpt2, text):
    tokenizer, reference = gpt2
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert tokenizer.decode(ids) == text


def test_roundtrip_and_invalid_utf8(trained):
    tokenizer = Tokenizer(*trained, special_tokens=[EOT])
    for text in VARIED_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    euro = tokenizer.encode("€")  # 3 bytes, not merged here: one id per byte
    assert len(euro) == 3
    assert tokenizer.decode(euro[:2]) == "\ufffd"
    assert tokenizer.decode([0xFF] + tokenizer.encode("ok")) == "\ufffdok"


def test_overlapping_special_tokens_longest_first(trained):
    double = EOT + EOT
    tokenizer = Tokenizer(*trained, special_tokens=[EOT, double])
    eot, eot2 = tokenizer.special_ids[EOT], tokenizer.special_ids[double]
    assert eot == 256 and eot2 == 800 and tokenizer.vocab_size == 801
    assert tokenizer.encode(EOT * 3) == [eot2, eot]
    assert tokenizer.decode(tokenizer.encode(f"a{EOT * 3}b")) == f"a{EOT * 3}b"


def test_encode_iterable_matches_encode(trained, gpt2, tmp_path):
    text = ("first line  \n\n   indented\n \n\t\ttabs\t\n" + "".join(VARIED_TEXTS) + "end  \n\n") * 3
    path = write(tmp_path, text)
    gpt2_tokenizer, _ = gpt2
    for tokenizer in [gpt2_tokenizer, Tokenizer(*trained, special_tokens=[EOT])]:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep "\r\n" as is
            assert list(tokenizer.encode_iterable(f)) == tokenizer.encode(text)
    # encoding each line on its own would be wrong: "  \n\n  " is one GPT-2 pre-token
    lines = text.splitlines(keepends=True)
    assert sum(map(gpt2_tokenizer.encode, lines), []) != gpt2_tokenizer.encode(text)


def test_encode_iterable_random_chunks(trained):
    # special tokens with spaces inside (and overlapping) are the hard case for cut points
    rng = random.Random(0)
    varied = ["a", "b", " ", "  ", "\n", "\n\n", "\t", "é", "😀", "1", "!", "'s", EOT, "<|end", "oftext|>"]
    near_special = ["x", "y", "z", " ", "  ", "\n", "a"]  # often builds, or almost, a special
    for specials, pieces in [([EOT, "x y", "y\nx y", "z  z"], varied),
                             ([EOT, "x y", "y\nx y", "z  z"], near_special),
                             (["x y", "y\nx y", "z  z"], near_special)]:
        tokenizer = Tokenizer(*trained, special_tokens=specials)
        for _ in range(300):  # random texts cut into random chunks, even inside special tokens
            text = "".join(rng.choices(pieces, k=rng.randint(0, 60)))
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 10))))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert list(tokenizer.encode_iterable(iter(chunks))) == tokenizer.encode(text), chunks


def test_encode_cache_stays_within_its_limit_and_gives_the_same_ids(trained):
    """The pre-token cache is cleared when full, so that encoding an endless stream holds
    bounded memory; a cache cleared mid-text must not change a single id."""
    class Watched(dict):                     # the largest the cache ever was
        peak = 0

        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.peak = max(self.peak, len(self))

    text = english_like_text(3000, seed=3)
    limited = Tokenizer(*trained, special_tokens=[EOT])
    limited.CACHE_LIMIT, limited.cache = 2, Watched()  # far fewer than the distinct pre-tokens
    assert len(set(PAT_RE.findall(text))) > 10 * limited.CACHE_LIMIT
    assert limited.encode(text) == Tokenizer(*trained, special_tokens=[EOT]).encode(text)
    assert 0 < limited.cache.peak <= limited.CACHE_LIMIT


def test_encode_iterable_is_lazy(trained):
    tokenizer = Tokenizer(*trained, special_tokens=[EOT])
    endless = itertools.repeat("hello world  \n")  # never ends: only works if lazy
    ids = list(itertools.islice(tokenizer.encode_iterable(endless), 1000))
    assert tokenizer.decode(ids).startswith("hello world  \nhello world  \n")


def test_save_and_from_files(trained, tmp_path):
    tokenizer = Tokenizer(*trained, special_tokens=[EOT])
    tokenizer.save(tmp_path / "vocab.json", tmp_path / "merges.json")
    loaded = Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.json", [EOT])
    assert loaded.vocab == tokenizer.vocab and loaded.merge_ranks == tokenizer.merge_ranks
    text = "".join(VARIED_TEXTS)
    assert loaded.encode(text) == tokenizer.encode(text)


def test_tiktoken_fast_path_matches_tokenizer(trained):
    vocab, merges = trained
    tokenizer = Tokenizer(vocab, merges, special_tokens=[EOT])
    fast = tiktoken_encoding_from_bpe(vocab, merges, [EOT], name="pico-800")
    for text in VARIED_TEXTS + [english_like_text(20_000, seed=99)]:
        assert fast.encode(text, allowed_special="all") == tokenizer.encode(text)
    # every token's own bytes (also invalid UTF-8 ones) encode to the token itself
    for token_id, token in vocab.items():
        if token_id != 256:
            assert fast._encode_bytes(token) == [token_id]


def test_tiktoken_fast_path_random_small_vocabs():
    # small alphabets give many overlapping pairs ("aaa"), where rank-by-concatenation
    # (tiktoken) and merge-list BPE (Tokenizer) could disagree if anything were off
    for seed in range(100):
        rng = random.Random(seed)
        alphabet = "abcd"[:rng.randint(2, 4)]
        words = ["".join(rng.choices(alphabet, k=rng.randint(2, 12))) for _ in range(30)]
        merges = learn_merges(Counter(w.encode() for w in rng.choices(words, k=100)), 50)
        vocab = {i: bytes([i]) for i in range(256)}
        vocab.update({256 + i: a + b for i, (a, b) in enumerate(merges)})
        tokenizer = Tokenizer(vocab, merges)
        fast = tiktoken_encoding_from_bpe(vocab, merges, [], name="random")
        for _ in range(50):
            text = "".join(rng.choices(alphabet, k=rng.randint(1, 16)))
            assert fast.encode(text) == tokenizer.encode(text), (seed, text)


def test_tiktoken_fast_path_duplicate_merge_results():
    # (ab, c) and (a, bc) both make b"abc": the first id (258) is kept, 259 never emitted
    merges = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc")]
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256 + i: a + b for i, (a, b) in enumerate(merges)})
    fast = tiktoken_encoding_from_bpe(vocab, merges, [], name="dup")
    tokenizer = Tokenizer(vocab, merges)
    for text in ["abc", "abcabc", "bcabc", "aabcc", "cab"]:
        assert fast.encode(text) == tokenizer.encode(text)
    assert tokenizer.encode("abc") == [258]
    with pytest.raises(ValueError):  # ids not following merge order can't be tiktoken ranks
        tiktoken_encoding_from_bpe({**vocab, 256: b"bc", 257: b"ab"}, merges, [], name="bad")


def test_tiktoken_fast_path_on_gpt2(gpt2):
    tokenizer, reference = gpt2
    vocab = {i: b for i, b in tokenizer.vocab.items()}
    merges = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)
    fast = tiktoken_encoding_from_bpe(vocab, merges, [EOT], name="gpt2-rebuilt")
    text = "".join(VARIED_TEXTS)
    assert fast.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


def test_bpe_tokenizer_flag_trains_on_the_training_split_and_is_cached(tmp_path):
    texts = [f"the quick brown fox number {i} jumps" for i in range(50)]
    first = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    assert first.name == "bpe:300" and first.vocab_size == 300 and first.eot_id == 256
    assert first.decode(first.encode("the quick fox")) == "the quick fox"
    assert first.encode("the quick brown") == first.bpe.encode("the quick brown")
    cached = list(tmp_path.glob("bpe-*"))
    assert len(cached) == 1
    again = pico.train_bpe_tokenizer(texts, 300, tmp_path)
    assert again.encode("number 7 jumps") == first.encode("number 7 jumps")
    lengths = first.token_byte_lengths()
    ids = first.encode("brown fox")
    assert sum(lengths[i] for i in ids) == len("brown fox")


def test_a_bpe_trained_on_the_same_characters_cut_into_other_examples_is_trained_again(tmp_path):
    """No merge crosses from one example into the next, so other example boundaries may give
    other merges: the cache keeps the two apart."""
    pico.train_bpe_tokenizer(["ab ab ab", " c"], 260, tmp_path)
    pico.train_bpe_tokenizer(["ab ab a", "b c"], 260, tmp_path)
    assert len(list(tmp_path.glob("bpe-*"))) == 2


def test_end_of_text_stands_for_no_bytes_of_text():
    """Bits per byte divides by the text's bytes: <|endoftext|>, a target at the end of every
    example, adds none (its 13 characters are a name, not text)."""
    tokenizer = pico.train_bpe_tokenizer([f"the fox number {i}" for i in range(20)], 270, None)
    lengths = tokenizer.token_byte_lengths()
    assert lengths[tokenizer.eot_id] == 0
    ids = tokenizer.encode("the fox number 7") + [tokenizer.eot_id]
    assert sum(lengths[i] for i in ids) == len("the fox number 7")


def test_a_trained_bpe_whose_ids_are_not_as_training_makes_them_is_refused():
    """A checkpoint's (or cache's) vocabulary with two bytes' ids swapped had encoded and
    decoded every "a" as "b": the merges, which the fingerprint reads, are unchanged."""
    tokenizer = pico.train_bpe_tokenizer([f"the fox number {i}" for i in range(20)], 270, None)
    vocab, merges = dict(tokenizer.bpe.vocab), tokenizer.bpe.merges
    assert pico.TrainedBPETokenizer(vocab, merges, 270).encode("ab") == [97, 98]
    identity = pico.tokenizer_identity("bpe:270", tokenizer)
    assert pico.tokenizer_from_identity(identity).fingerprint == tokenizer.fingerprint
    swapped_bytes = vocab | {97: vocab[98], 98: vocab[97]}
    last = max(vocab)
    swapped_merges = vocab | {last: vocab[last - 1], last - 1: vocab[last]}
    # id 256 is end-of-text (or the first merge's): a merge there, end-of-text moved to the end
    moved_end = vocab | {256: b"zz", last + 1: vocab[256]}
    for damaged in (swapped_bytes, swapped_merges, moved_end):
        with pytest.raises(ValueError, match="not the 256 bytes and then its merges' results"):
            pico.TrainedBPETokenizer(damaged, merges, 270)
    identity["bpe_vocab"] = {str(i): token.hex() for i, token in swapped_bytes.items()}
    with pytest.raises(ValueError, match="not the 256 bytes"):
        pico.tokenizer_from_identity(identity)


def test_a_special_token_whose_bytes_the_vocabulary_holds_twice_takes_the_smaller_id():
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"<|eot|>", 300: b"<|eot|>"}
    assert pico.assign_special_ids(vocab, ["<|eot|>"]) == {"<|eot|>": 256}


def test_a_merge_listed_twice_keeps_its_first_rank():
    """Only a merges file from elsewhere can list a pair twice; its first place is its rank."""
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"bc", 257: b"ab"}
    tokenizer = pico.Tokenizer(vocab, [(b"b", b"c"), (b"a", b"b"), (b"b", b"c")])
    assert tokenizer.encode("abc") == [97, 256]            # a, bc: (b, c) ranks first


def test_chunk_boundaries_find_a_special_token_across_two_read_windows(tmp_path):
    path = tmp_path / "text.bin"
    path.write_bytes(b"x" * 100 + b"a" * 10 + b"<|eot|>" + b"b" * 83)
    assert pico.find_chunk_boundaries(path, 2, "<|eot|>", window=14) == [0, 110, 200]


def test_bpe_tokenizer_spec_is_validated():
    assert pico.parse_tokenizer_spec("bpe:500") == ("bpe", 500)
    assert pico.parse_tokenizer_spec("bpe:257") == ("bpe", 257)      # the bytes and <|endoftext|>
    for bad in ("bpe:10", "bpe:256", "bpe:", "bpe:abc", "bpe:³⁰⁰", "wordpiece"):
        with pytest.raises(pico.UserError, match="--tokenizer"):
            pico.parse_tokenizer_spec(bad)


def test_a_bpe_run_saves_its_tokenizer_with_the_run_log(run_main, tmp_path):
    from conftest import TINY_RUN
    argv = [a if a != "char" else "bpe:300" for a in TINY_RUN]
    status, out, err = run_main(*argv, "--models", "transformer", "--run_name", "bpe")
    assert status == 0, err
    log = pico.load_runlog(tmp_path / "artefacts" / "bpe.json")
    assert log["data"]["tokenizer"] == "bpe:300" and log["data"]["vocab_size"] == 300
    vocab_path, merges_path = log["data"]["tokenizer_files"]
    reloaded = Tokenizer.from_files(vocab_path, merges_path, [EOT])
    assert reloaded.decode(reloaded.encode("0 1 2 3")) == "0 1 2 3"
