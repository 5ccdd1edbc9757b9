"""Tests for translation_data.py: tokenizers round-trip, parallel-corpus errors name the file and
line, held-out splits, batches, the reverse task, the Ding extraction, and the WMT14 download and
preparation against a local HTTP server (tiny archives the test builds; no internet).

    python -m pytest tests/test_translation_data.py -q        (a few seconds)
"""
import hashlib
import io
import json
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import translation.translation_data as td
from data import DownloadError
from translation.encdec import BOS, EOS, PAD
from test_data import FAST, _Server, _unreachable_url

PAIRS = [(f"The {w} house number {i} is small.", f"Das {w} Haus Nummer {i} ist klein.")
         for i in range(40) for w in ("red", "green", "old", "new", "grüne")]


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


# ----------------------------------------------------------------------------- tokenizers

@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = td.TranslationByteTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids + [EOS, PAD]) == text


def test_sentencepiece_round_trips_and_is_cached(tmp_path):
    tok = td.build_tokenizer("sentencepiece", PAIRS, str(tmp_path), "toy", vocab_size=400)
    assert tok.vocab_size <= 400 and tok.sp.pad_id() == PAD and tok.sp.bos_id() == BOS
    assert tok.sp.eos_id() == EOS
    for s, t in PAIRS[:50]:
        for text in (s, t):
            ids = tok.encode(text)
            assert min(ids) > EOS and tok.decode(ids + [EOS]) == text
    assert len(tok.encode(PAIRS[0][0])) < len(PAIRS[0][0])   # subwords, not characters
    path = tmp_path / "toy.spm400.model"
    mtime = path.stat().st_mtime_ns
    again = td.build_tokenizer("sentencepiece", [("x", "y")], str(tmp_path), "toy", 400)
    assert path.stat().st_mtime_ns == mtime and again.encode("Das Haus") == tok.encode("Das Haus")
    assert not [p for p in os.listdir(tmp_path) if ".part" in p]


# A training text with what the default nmt_nfkc normalisation would rewrite (…, ½, full-width
# letters, a no-break space), accents, CJK, emoji, and whitespace it would collapse.
MIXED = ["Er sagte … nichts.", "Ein ½ Liter Milch, bitte.", "Café, naïve, résumé, Ärger.",
         "東京は大きい都市です。", "Das ist gut 👍 und 🙂.", "two  spaces  here", " leading",
         "trailing ", "a\ttab", "ＡＢＣ full width", "no\u00a0break space", "ﬁ ligature"] * 8


@pytest.fixture(scope="module")
def lossless_spm(tmp_path_factory):
    pairs = list(zip(MIXED, MIXED[1:] + MIXED[:1]))
    return td.build_tokenizer("sentencepiece", pairs, str(tmp_path_factory.mktemp("spm")),
                              "mixed", vocab_size=400)


@given(st.sampled_from(MIXED))
def test_sentencepiece_returns_every_training_sentence_byte_for_byte(lossless_spm, text):
    assert lossless_spm.decode(lossless_spm.encode(text) + [EOS]).encode() == text.encode()


@given(st.text().filter(lambda s: "\u2581" not in s))
def test_sentencepiece_returns_any_text_without_its_space_marker(lossless_spm, text):
    """Characters the training text lacks take the byte fallback; UNK (3) never appears."""
    ids = lossless_spm.encode(text)
    assert 3 not in ids and lossless_spm.decode(ids) == text


def test_unseen_character_round_trips_through_its_bytes(lossless_spm):
    sp = lossless_spm.sp
    ids = lossless_spm.encode("Жук")                    # Cyrillic: not in MIXED
    assert [sp.id_to_piece(i) for i in ids[1:3]] == ["<0xD0>", "<0x96>"]   # 'Ж' = D0 96
    assert lossless_spm.decode(ids) == "Жук" and lossless_spm.lossless()
    # the one exception: sentencepiece's own space marker U+2581 comes back as a space
    assert lossless_spm.decode(lossless_spm.encode("a\u2581b")) == "a b"


def test_too_small_vocabulary_for_byte_fallback_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=80 is too small .* at least \d+"):
        td.build_tokenizer("sentencepiece", PAIRS, str(tmp_path), "toy", vocab_size=80)


def test_an_old_lossy_sentencepiece_model_still_loads_with_a_warning(tmp_path, capsys):
    """A cached file or checkpoint made with nmt_nfkc and no byte fallback tokenises as it was
    trained (a checkpoint's model was trained on those ids) and says that it rewrites text."""
    import sentencepiece as spm
    texts = [s for pair in PAIRS for s in pair]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts),
                                   model_prefix=str(tmp_path / "toy.spm80"), vocab_size=80,
                                   pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=3,
                                   hard_vocab_limit=False, minloglevel=2)
    tok = td.build_tokenizer("sentencepiece", PAIRS, str(tmp_path), "toy", vocab_size=80)
    assert "nmt_nfkc" in capsys.readouterr().err and not tok.lossless()
    assert tok.decode(tok.encode("Das … Haus")) == "Das ... Haus"
    again = td.tokenizer_from_state(tok.state())
    assert again.encode("Das Haus") == tok.encode("Das Haus") and not again.lossless()


def test_unknown_tokenizer_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer='words'"):
        td.build_tokenizer("words", PAIRS, str(tmp_path), "toy", 80)


# ----------------------------------------------------------------------------- parallel corpora

def write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_tsv_and_aligned_files_read_the_same(tmp_path):
    tsv = write(tmp_path / "c.tsv", "Hello .\tHallo .\r\n  Two words\tZwei Wörter \n")
    src = write(tmp_path / "c.en", "Hello .\nTwo words\n")
    tgt = write(tmp_path / "c.de", "Hallo .\nZwei Wörter")
    want = [("Hello .", "Hallo ."), ("Two words", "Zwei Wörter")]
    assert td.read_tsv(tsv) == want and td.read_aligned(src, tgt) == want


def test_lines_split_at_newline_only(tmp_path):
    """U+2028 and \\x1c occur inside WMT sentences; splitting there would shift the alignment."""
    src = write(tmp_path / "a.en", "one\u2028still one\nx\x1cy\n")
    tgt = write(tmp_path / "a.de", "eins\nzwei\n")
    assert td.read_aligned(src, tgt) == [("one\u2028still one", "eins"), ("x\x1cy", "zwei")]


@pytest.mark.parametrize("text, match", [
    ("a\tb\nno tab here\n", r"c.tsv:2: expected 'source<TAB>target' \(one tab\), found 0"),
    ("a\tb\nx\ty\tz\n", r"c.tsv:2: .* found 2 tabs"),
    ("a\tb\n \tb\n", r"c.tsv:2: empty source sentence"),
    ("a\tb\nc\td\ne\t\n", r"c.tsv:3: empty target sentence"),
    ("", r"c.tsv holds no sentence pairs"),
    (b"a\tb\n\xff\tc\n", r"c.tsv:2: not valid UTF-8"),
])
def test_tsv_errors_name_the_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        td.read_tsv(write(tmp_path / "c.tsv", text))


def test_aligned_errors_name_the_files_and_line(tmp_path):
    src = write(tmp_path / "a.en", "one\ntwo\nthree\n")
    with pytest.raises(ValueError, match=r"a.en has 3 lines, .*a.de has 2"):
        td.read_aligned(src, write(tmp_path / "a.de", "eins\nzwei\n"))
    with pytest.raises(ValueError, match=r"a.en:2 / .*b.de:2: empty target"):
        td.read_aligned(src, write(tmp_path / "b.de", "eins\n\ndrei\n"))
    assert td.read_aligned(src, str(tmp_path / "b.de"), empty="skip") == [("one", "eins"),
                                                                          ("three", "drei")]
    with pytest.raises(FileNotFoundError, match="missing.de not found; check --data_path"):
        td.read_aligned(src, str(tmp_path / "missing.de"))


def test_long_pairs_skipped_or_truncated_and_counted():
    tok = td.TranslationByteTokenizer()
    pairs = [("abc", "xyz"), ("a" * 10, "b"), ("c", "d" * 9)]
    kept, n = td.encode_pairs(pairs, tok, max_len=6, long="skip")
    assert n == 2 and len(kept) == 1
    assert kept[0][0].tolist() == tok.encode("abc") + [EOS]
    cut, n = td.encode_pairs(pairs, tok, max_len=6, long="truncate")
    assert n == 2 and [len(s) for s, _ in cut] == [4, 6, 2] and [len(t) for _, t in cut] == [4, 2, 6]
    assert all(s[-1] == EOS and t[-1] == EOS for s, t in cut)
    with pytest.raises(ValueError, match="long='drop'"):
        td.encode_pairs(pairs, tok, 6, long="drop")


def test_encode_splits_prints_counts(capsys):
    tok = td.TranslationByteTokenizer()
    splits = {"train": [("a" * 10, "b"), ("c", "d")], "test": [("a" * 10, "b")]}
    out = td.encode_splits(splits, tok, max_len=6)
    assert len(out["train"]) == 1 and len(out["test"]) == 1
    log = capsys.readouterr().out
    assert "train: skipped 1 of 2 pairs" in log and "test: truncated 1 of 1" in log


def test_heldout_split_is_random_disjoint_and_fixed():
    pairs = [(f"s{i // 2}", f"t{i}") for i in range(300)]     # every source twice
    a, b = td.split_heldout(pairs, 30, seed=1), td.split_heldout(pairs, 30, seed=1)
    assert a == b and sum(len(v) for v in a.values()) == 300
    train_src = {s for s, _ in a["train"]}
    assert not train_src & {s for s, _ in a["valid"] + a["test"]}
    assert 0 < len(a["test"]) <= 30 and a["valid"] != pairs[-60:-30]
    with pytest.raises(ValueError, match="too few"):
        td.split_heldout(pairs[:10], 5)


def test_load_parallel_tsv(tmp_path):
    path = write(tmp_path / "my corpus.tsv", "".join(f"{s}\t{t}\n" for s, t in PAIRS))
    splits, name = td.load_parallel("parallel", data_path=path, heldout=20)
    assert name.startswith("my corpus_") and len(splits["valid"]) == 20
    with pytest.raises(ValueError, match="needs --data_path"):
        td.load_parallel("parallel")
    with pytest.raises(ValueError, match="dataset='wmt15'"):
        td.load_parallel("wmt15")


# ----------------------------------------------------------------------------- batches

def test_collate_pads_and_shifts():
    ex = [(np.array([5, 6, EOS]), np.array([7, EOS])), (np.array([8, EOS]), np.array([9, 10, EOS]))]
    src, tgt_in, targets = td.collate(ex)
    assert src.tolist() == [[5, 6, EOS], [8, EOS, PAD]]
    assert tgt_in.tolist() == [[BOS, 7, PAD], [BOS, 9, 10]]
    assert targets.tolist() == [[7, EOS, -100], [9, 10, EOS]]


def test_length_batches_cover_everything_within_the_token_budget():
    rng = np.random.default_rng(0)
    ex = [(np.zeros(rng.integers(1, 30)), np.zeros(rng.integers(1, 30))) for _ in range(200)]
    batches = td.length_batches(ex, max_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for b in batches:
        width = max(max(len(ex[i][0]), len(ex[i][1])) for i in b)
        assert width * len(b) <= 100 or len(b) == 1


def test_parallel_stream_resumes_and_differs_per_rank():
    ex, _ = td.encode_pairs(PAIRS, td.TranslationByteTokenizer(), 64)
    a = td.ParallelStream(ex, seq_len=40, seed=3)
    first = [a.batch(400) for _ in range(3)]
    for src, tgt_in, _ in first:   # the budget is padded tokens, B x max(S, T)
        assert src.shape[0] * max(src.shape[1], tgt_in.shape[1]) <= 400
    first = [src for src, _, _ in first]
    b = td.ParallelStream(ex, seq_len=40, seed=3)
    b.load_state_dict({"n_batches": 1})
    assert torch.equal(b.batch(400)[0], first[1])
    other = td.ParallelStream(ex, seq_len=40, seed=3, rank=1)
    assert any(not torch.equal(other.batch(400)[0], f) for f in first)
    with pytest.raises(ValueError, match="max_tokens=39 padded tokens cannot hold a pair"):
        a.batch(39)


def test_real_tokens_count_source_and_target_without_padding():
    ex = [(np.array([5, 6, EOS]), np.array([7, EOS])),
          (np.array([5, EOS]), np.array([7, 8, 9, EOS]))]
    batch = td.collate(ex)                     # src (2, 3), targets (2, 4): 14 slots, 11 real
    assert td.real_tokens(batch) == (3 + 2) + (2 + 4)


def test_translation_evals_score_the_whole_split_in_token_batches():
    """Every valid pair, each once, in batches of at most run.micro padded tokens, on each rank
    its share: the split that ckpt_best.pt is chosen on is the whole of it."""
    ex, _ = td.encode_pairs(PAIRS, td.TranslationByteTokenizer(), 64)
    args = SimpleNamespace(dataset="parallel", seq_len=64, eval_iters=1, valid_size=2)
    for world in (1, 2):
        seen = 0
        for rank in range(world):
            run = SimpleNamespace(micro=256, rank=rank, world=world)
            for full in (True, False):
                batches = td.translation_eval_batches(args, {"valid": ex}, "valid", run, full)
                assert all(s.shape[0] * max(s.shape[1], t.shape[1]) <= 256 for s, t, _ in batches)
                n = sum(len(s) for s, _, _ in batches)
                assert n == len(ex[rank::world])
            seen += n
        assert seen == len(ex) == 200


def test_tokenized_stream_refuses_another_tokenizer(tmp_path):
    ex, _ = td.encode_pairs(PAIRS, td.TranslationByteTokenizer(), 64)
    spm = td.build_tokenizer("sentencepiece", PAIRS, str(tmp_path), "toy", vocab_size=400)
    a = td.TokenizedStream(td.TranslationByteTokenizer(), ex, 64)
    a.batch(256)
    state = a.state_dict()
    assert state == {"n_batches": 1, "tokenizer": {"kind": "bytes"}}
    td.TokenizedStream(td.TranslationByteTokenizer(), ex, 64).load_state_dict(state)
    with pytest.raises(SystemExit, match="another tokenizer"):
        td.TokenizedStream(spm, ex, 64).load_state_dict(state)


def test_reverse_task_targets_and_heldout():
    task = td.ReverseTask(vocab_size=12, min_len=2, max_len=9, seed=0)
    src, tgt_in, targets = task.batch(640)     # padded tokens: 64 strings of max_len + EOS = 10
    assert src.shape[0] == 64 and len(task.batch(649)[0]) == 64 and len(task.batch(10)[0]) == 1
    for s, t in zip(src.tolist(), targets.tolist()):
        s = s[:s.index(EOS)]
        assert t[:len(s) + 1] == s[::-1] + [EOS] and 2 <= len(s) <= 9
    held = task.heldout_set(50)
    task.batch(640)
    assert [s.tolist() for s, _ in held] == [s.tolist() for s, _ in task.heldout_set(50)]
    held_strings = {tuple(s.tolist()) for s, _ in held}
    drawn = set()
    for _ in range(30):
        drawn |= {tuple(r[:r.index(EOS) + 1]) for r in task.batch(640)[0].tolist()}
    assert len(drawn) > 1000 and not held_strings & drawn
    # the short strings are few (10^2 of length 2), so without the hash rule they would meet
    assert any(len(s) <= 4 for s in held_strings)


# ----------------------------------------------------------------------------- Ding

DING = """# Version :: devel 2023-01-30
Abend {m} | Abende {pl} :: evening | evenings
Haus {n} | Das Haus ist sehr alt. | Er wohnt in dem Haus. :: house | The house is very old. | He lives in that house.
Wie spät ist es bitte? :: What time is it please?
Nur drei Wörter. :: Just three words.
Er ist [ugs.] müde. :: He is really tired.
"""


def test_ding_sentence_pairs(tmp_path):
    pairs = td.ding_sentence_pairs(write(tmp_path / "de-en", DING))
    assert pairs == [("The house is very old.", "Das Haus ist sehr alt."),
                     ("He lives in that house.", "Er wohnt in dem Haus."),
                     ("What time is it please?", "Wie spät ist es bitte?")]
    with pytest.raises(FileNotFoundError, match="apt-get install trans-de-en"):
        td.ding_sentence_pairs(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- Bible

def test_align_verses_pairs_by_key_cleans_and_drops():
    en = {"Gen.1.1": "In the beginning\u00b6 God  created.", "Gen.1.2": "And the earth.",
          "Gen.1.3": "Only in English.", "Gen.1.4": "In the beginning God created.",
          "Ps.3.1": "LORD, how are they increased"}
    es = {"Ps.3.1": "Salmo de David. JEHOVA, cuanto se han multiplicado", "Gen.1.2": "",
          "Gen.1.1": "EN el principio crió Dios.", "Gen.1.4": "EN el principio crió Dios.",
          "Rev.1.1": "Solo en español."}
    assert td.align_verses(en, es) == [
        ("In the beginning God created.", "EN el principio crió Dios."),   # Gen.1.4 repeats it
        ("LORD, how are they increased", "Salmo de David. JEHOVA, cuanto se han multiplicado")]


def test_bible_verse_pairs_from_the_debian_modules():
    """The real modules (apt-get install sword-text-kjv sword-text-sparv; pip install pysword),
    where this machine has them."""
    pytest.importorskip("pysword")
    if not all(os.path.isdir(os.path.join(td.SWORD_PATH, "modules", "texts", "ztext", m))
               for m in td.BIBLE_MODULES):
        pytest.skip("the SWORD modules sword-text-kjv and sword-text-sparv are not installed")
    pairs = td.bible_verse_pairs()
    assert len(pairs) == 30919
    assert ("Blessed are the peacemakers: for they shall be called the children of God.",
            "Bienaventurados los pacificadores: porque ellos serán llamados hijos de Dios.") in pairs


def test_sword_verses_names_the_packages_when_a_module_is_missing(tmp_path):
    pytest.importorskip("pysword")
    (tmp_path / "mods.d").mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install sword-text-kjv sword-text-sparv"):
        td.sword_verses("engKJV2006eb", str(tmp_path))


# ----------------------------------------------------------------------------- WMT14

def tgz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sgm(sents):
    body = "".join(f'<seg id="{i}">  {s} </seg>\n' for i, s in enumerate(sents, 1))
    return f'<srcset setid="x">\n<doc docid="d" genre="news">\n{body}</doc>\n</srcset>\n'


def wmt_sources(server, md5_ok=True):
    archives = {
        "/ep.tgz": {"training/europarl-v7.de-en.en": "Resumption .\n\nGood day\n",
                    "training/europarl-v7.de-en.de": "Wiederaufnahme .\nLeer\nGuten Tag\n"},
        "/cc.tgz": {"commoncrawl.de-en.en": "crawl\n", "commoncrawl.de-en.de": "Kriechen\n"},
        "/nc.tgz": {"training/news-commentary-v9.de-en.en": "news  &amp; views\n",
                    "training/news-commentary-v9.de-en.de": "Nachrichten\n"},
        "/dev.tgz": {"test/newstest2013-src.en.sgm": sgm(["A  b", "c"]),
                     "test/newstest2013-src.de.sgm": sgm(["A b", "C"])},
        "/test.tgz": {"test-full/newstest2014-deen-src.en.sgm": sgm(["x y"]),
                      "test-full/newstest2014-deen-ref.de.sgm": sgm(["X Y"])},
    }
    sources = []
    for (url, md5, members), (route, files) in zip(td.WMT14, archives.items()):
        body = tgz(files)
        server.routes[route] = body
        digest = hashlib.md5(body).hexdigest() if md5_ok else "0" * 32
        sources.append((server.url + route, digest if md5 else None, members))
    return sources


def test_wmt14_download_and_prepare(server, tmp_path):
    sources = wmt_sources(server)
    paths = td.prepare_wmt14(str(tmp_path), sources=sources, **FAST)
    read = lambda p: open(p, encoding="utf-8").read()
    assert read(paths["train"][0]) == "Resumption .\n\nGood day\ncrawl\nnews  &amp; views\n"
    assert read(paths["train"][1]) == "Wiederaufnahme .\nLeer\nGuten Tag\nKriechen\nNachrichten\n"
    assert read(paths["valid"][0]) == "A b\nc\n" and read(paths["test"][1]) == "X Y\n"
    assert td.read_aligned(*paths["train"], empty="skip")[0] == ("Resumption .", "Wiederaufnahme .")
    record = json.load(open(tmp_path / "wmt14_en_de" / "downloads.json"))
    assert len(record) == 5 and all(len(r["sha256"]) == 64 for r in record.values())
    hits = len(server.hits)
    assert td.prepare_wmt14(str(tmp_path), sources=sources, **FAST) == paths   # idempotent
    assert len(server.hits) == hits


def test_wmt14_archive_changed_since_first_download(server, tmp_path):
    sources = wmt_sources(server)
    td.prepare_wmt14(str(tmp_path), sources=sources, **FAST)
    os.remove(tmp_path / "wmt14_en_de" / "meta.json")
    with open(tmp_path / "wmt14_en_de" / "raw" / "cc.tgz", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ValueError, match="differs from the file first downloaded"):
        td.prepare_wmt14(str(tmp_path), sources=sources, **FAST)


def test_wmt14_bad_md5_and_offline_messages(server, tmp_path):
    with pytest.raises(DownloadError, match="wrong MD5"):
        td.prepare_wmt14(str(tmp_path), sources=wmt_sources(server, md5_ok=False), **FAST)
    offline = [(_unreachable_url(), None, m) for _, _, m in td.WMT14]
    with pytest.raises(DownloadError) as e:
        td.prepare_wmt14(str(tmp_path / "off"), sources=offline, **FAST)
    assert "by hand" in str(e.value) and "WMT14 needs these archives in" in str(e.value)


def test_read_sgm_matches_sacrebleu(tmp_path):
    from sacrebleu.dataset.fake_sgml import FakeSGMLDataset
    path = write(tmp_path / "x.sgm", sgm(["  two   spaces ", "a &amp; b", "plain"]))
    out = tmp_path / "x.txt"
    FakeSGMLDataset("x")._convert_format(path, str(out))
    assert td.read_sgm(path) == out.read_text(encoding="utf-8").splitlines()
