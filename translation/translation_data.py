"""Data for translation with encdec.py: WMT14 English-German (the paper's Table 4), any parallel
corpus a user brings, a real small English-German corpus from a Debian package, tokenizers, and a
synthetic transduction task.

    python -m translation.translation_data --dataset=wmt14 --data_dir=data      # download + prepare (~1.5 GB)
    python -m translation.translation_data --dataset=ding --data_dir=data       # 16K en-de sentence pairs
    python -m translation.translation_data --dataset=parallel --data_path=pairs.tsv   # check a corpus
    python train.py --dataset=parallel --data_path=pairs.tsv             # train on it (train.py
                                                                         # uses the functions at
                                                                         # the end of this file)

WMT14 en-de as the paper and sacreBLEU use it, raw (untokenised) text from statmt.org: training =
Europarl v7 + Common Crawl + News Commentary v9 (4.5M pairs), valid = newstest2013, test =
newstest2014 (the 3,003-sentence "full" set, sacreBLEU's wmt14/full). The archives go through
data.download (requests, a tqdm bar, a .part file renamed when complete, retries, and a message
naming the file to place by hand when offline). The two test archives are checked against the
MD5s sacreBLEU publishes for them; nobody publishes checksums of the three training archives, so
their size and SHA-256 are recorded in downloads.json at first download and checked on every
later use (trust on first use), which catches a file replaced or damaged since.

Any parallel corpus: a TSV of `source<TAB>target` lines (--data_path=FILE.tsv, valid and test
split off at random, --heldout pairs each) or two line-aligned files (--data_path=SRC,TGT).
Errors name the file and line: a line without exactly one tab, an empty side, mismatched line
counts. A sentence longer than --max_seq_len tokens is skipped in training data and truncated in
valid/test data (which must keep every line to be scored); the counts are printed.

Tokenizers: sentencepiece (unigram, one joint vocabulary for both languages, --vocab_size, ~32K
by default like the authors' 33,300), trained on the training text and cached next to the data;
or bytes (--tokenizer=bytes, vocab 259), which need no dependency. Both reserve PAD 0, BOS 1,
EOS 2 (encdec.py). Both are lossless: decode(encode(s)) == s for any text s (sentencepiece: any s
without U+2581, its own space marker), so sacreBLEU scores the model's words, not a rewriting.

Shape legend: B batch (sentences), S source length, T target length.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import tarfile

import numpy as np
import torch

from data import (_VALID, IGNORE_INDEX, ByteTokenizer, DownloadError, _generator, _Stream, _to,
                  _verify, download, file_digest)
from translation.encdec import BOS, EOS, PAD

# ----------------------------------------------------------------------------- tokenizers


class TranslationByteTokenizer(ByteTokenizer):
    """data.ByteTokenizer with one more reserved id: PAD 0, BOS 1, EOS 2, byte b is id b + 3."""
    vocab_size = 259
    OFFSET = 3
    kind = "bytes"

    def encode_many(self, texts):
        return [self.encode(t) for t in texts]

    def state(self):
        return {"kind": self.kind}


class SentencePieceTokenizer:
    """A sentencepiece model (Kudo & Richardson 2018) with PAD 0, BOS 1, EOS 2, UNK 3.

    train() learns one vocabulary from both sides of the training text: German and English share
    most of their alphabet and many names, and a joint vocabulary lets the embeddings be tied.
    The model file sits next to the data and is reused when it exists.

    Text in, the same text out: decode(encode(s)) == s byte for byte, for any s without U+2581
    (sentencepiece's space marker '▁', which decodes as a space). Three trainer settings give it:
    identity normalisation (the default nmt_nfkc would turn '…' into '...' and '½' into '1⁄2',
    and sacreBLEU scores against the raw references), remove_extra_whitespaces=False (runs of
    spaces, leading and trailing ones are kept) and byte_fallback=True (a character the training
    text lacks is spelled as its UTF-8 bytes, not UNK, which decodes as ' ⁇ '). Byte fallback
    costs 256 vocabulary entries, so vocab_size must exceed 256 + 4 + the characters of the text.
    """
    kind = "sentencepiece"
    TRAINER = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                   byte_fallback=True)

    def __init__(self, model_path=None, proto=None):
        spm = _import_sentencepiece()
        self.sp = (spm.SentencePieceProcessor(model_proto=proto) if proto is not None else
                   spm.SentencePieceProcessor(model_file=model_path))
        self.vocab_size = self.sp.get_piece_size()

    def state(self):
        """What a checkpoint keeps to rebuild it: the serialized model (a few hundred KB)."""
        return {"kind": self.kind, "proto": self.sp.serialized_model_proto()}

    def lossless(self):
        """False for a model trained without TRAINER's settings (files and checkpoints made
        before them): it still loads and tokenises as it was trained, but rewrites some text."""
        probe = "½ …  ж\t"
        return self.decode(self.encode(probe)) == probe

    @classmethod
    def train(cls, texts, model_path, vocab_size, max_sentences=2_000_000, seed=0):
        """Train on an iterable of sentences (at most max_sentences, drawn at random when there
        are more: sentencepiece's own sampling), write model_path, return the tokenizer."""
        spm = _import_sentencepiece()
        spm.set_random_generator_seed(seed)            # its sampling of training sentences
        os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
        prefix = model_path[:-len(".model")] if model_path.endswith(".model") else model_path
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_prefix=prefix + ".part",
                vocab_size=vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=3,
                character_coverage=1.0, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2,
                **cls.TRAINER)
        except RuntimeError as e:
            need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if not need:
                raise
            raise ValueError(f"vocab_size={vocab_size} is too small for this text: it needs at "
                             f"least {need.group(1)} (256 byte-fallback pieces, 4 reserved ids "
                             f"and every character of the training text)") from None
        os.replace(prefix + ".part.model", model_path)     # the model appears only when complete
        os.remove(prefix + ".part.vocab")
        return cls(model_path)

    def encode(self, text):
        return self.sp.encode(text)

    def encode_many(self, texts):
        return self.sp.encode(list(texts), num_threads=os.cpu_count())  # one C++ call, threaded

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.sp.decode([i for i in ids if i > EOS])


LOSSY_WARNING = ("warning: {where} holds a sentencepiece model trained with nmt_nfkc "
                 "normalisation or without byte fallback: it rewrites some text ('…' -> '...', "
                 "unseen characters -> ' ⁇ '), so BLEU is scored on rewritten output. Delete the "
                 "file (or retrain the checkpoint) for a lossless one.")


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("the sentencepiece tokenizer needs the sentencepiece package: "
                          "pip install sentencepiece (see requirements.txt), or use "
                          "--tokenizer=bytes, which needs no dependency") from None
    return sentencepiece


def tokenizer_from_state(state):
    """The tokenizer a checkpoint saved with tokenizer.state()."""
    if state["kind"] == "bytes":
        return TranslationByteTokenizer()
    return SentencePieceTokenizer(proto=state["proto"])


def build_tokenizer(kind, train_pairs, data_dir, name, vocab_size):
    """The tokenizer for a dataset: bytes, or sentencepiece trained on train_pairs (both sides)
    and cached as data_dir/<name>.spm<vocab_size>.model."""
    if kind == "bytes":
        return TranslationByteTokenizer()
    if kind != "sentencepiece":
        raise ValueError(f"tokenizer={kind!r} is not one of ('sentencepiece', 'bytes')")
    path = os.path.join(data_dir, f"{name}.spm{vocab_size}.model")
    if os.path.exists(path):
        tok = SentencePieceTokenizer(path)
        if not tok.lossless():
            print(LOSSY_WARNING.format(where=path), file=sys.stderr)
        return tok
    print(f"training a sentencepiece vocabulary of {vocab_size} on {len(train_pairs):,} pairs "
          f"-> {path}")
    texts = (s for pair in train_pairs for s in pair)
    return SentencePieceTokenizer.train(texts, path, vocab_size)


# ----------------------------------------------------------------------------- parallel corpora

def read_tsv(path, empty="error"):
    """[(source, target)] from lines `source<TAB>target`; ValueError naming path:line otherwise.
    empty='skip' drops pairs with an empty side instead of raising (see _checked_pairs)."""
    pairs = []
    for n, line in enumerate(read_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'source<TAB>target' (one tab), found "
                             f"{len(parts) - 1} tabs in {line[:80]!r}")
        pairs.append(parts)
    if not pairs:
        raise ValueError(f"{path} holds no sentence pairs")
    return _checked_pairs(pairs, empty, lambda n: f"{path}:{n}")


def read_aligned(src_path, tgt_path, empty="error"):
    """[(source, target)] from two line-aligned files; ValueError naming the file and line."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"line counts differ: {src_path} has {len(src):,} lines, {tgt_path} has "
                         f"{len(tgt):,}; the files must be line-aligned (line i of one is the "
                         f"translation of line i of the other)")
    return _checked_pairs(zip(src, tgt), empty, lambda n: f"{src_path}:{n} / {tgt_path}:{n}")


def _checked_pairs(pairs, empty, where):
    """Pairs with outer spaces stripped. A pair with an empty side raises ValueError naming
    where(line number) (empty='error', for a corpus a user made) or is dropped and counted
    (empty='skip', for WMT's training corpus, whose sentence alignment leaves a few gaps)."""
    out, n_empty = [], 0
    for n, (s, t) in enumerate(pairs, 1):
        s, t = s.strip(), t.strip()
        if s and t:
            out.append((s, t))
        elif empty == "skip":
            n_empty += 1
        else:
            side = "source" if not s else "target"
            raise ValueError(f"{where(n)}: empty {side} sentence; remove the line or fill it in")
    if n_empty:
        print(f"skipped {n_empty:,} pairs with an empty side")
    return out


def read_lines(path):
    """The lines of a UTF-8 file, split at '\n' only (as wc -l and paste count them; str.splitlines
    would also split at the U+2028 and \\x1c that occur inside WMT sentences and break the
    alignment), '\r' stripped. ValueError naming the line of any invalid UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parallel corpus file {path} not found; check --data_path")
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for n, line in enumerate(raw, 1):
        try:
            lines.append(line.rstrip(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid UTF-8 ({e})") from None
    return lines


def split_heldout(pairs, n_heldout, seed=0):
    """{'train', 'valid', 'test'}: n_heldout pairs each for valid and test, drawn at random (a
    corpus sorted alphabetically or by document must not give a held-out part unlike the rest);
    a pair whose source also occurs in training is kept out of the held-out parts."""
    if len(pairs) < 3 * n_heldout:
        raise ValueError(f"{len(pairs):,} pairs are too few for two held-out parts of "
                         f"{n_heldout:,}; lower --heldout")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = [pairs[i] for i in order[:2 * n_heldout]]
    train = [pairs[i] for i in order[2 * n_heldout:]]
    seen = {s for s, _ in train}
    fresh = [p for p in held if p[0] not in seen]
    train += [p for p in held if p[0] in seen]
    return {"train": train, "valid": fresh[:len(fresh) // 2], "test": fresh[len(fresh) // 2:]}


# ----------------------------------------------------------------------------- WMT14 en-de

# (url, md5 or None, [(member basename, our file)]) per archive. MD5s: sacreBLEU's (wmt13, wmt14/full).
WMT14 = [
    ("http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz", None,
     [("europarl-v7.de-en.en", "train.europarl.en"), ("europarl-v7.de-en.de", "train.europarl.de")]),
    ("http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz", None,
     [("commoncrawl.de-en.en", "train.commoncrawl.en"), ("commoncrawl.de-en.de",
                                                         "train.commoncrawl.de")]),
    ("http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz", None,
     [("news-commentary-v9.de-en.en", "train.nc.en"), ("news-commentary-v9.de-en.de",
                                                       "train.nc.de")]),
    ("https://statmt.org/wmt13/test.tgz", "48eca5d02f637af44e85186847141f67",
     [("newstest2013-src.en.sgm", "valid.en.sgm"), ("newstest2013-src.de.sgm", "valid.de.sgm")]),
    ("https://statmt.org/wmt14/test-full.tgz", "a8cd784e006feb32ac6f3d9ec7eb389a",
     [("newstest2014-deen-src.en.sgm", "test.en.sgm"), ("newstest2014-deen-ref.de.sgm",
                                                        "test.de.sgm")]),
]
TRAIN_PARTS = ("europarl", "commoncrawl", "nc")


def _fetch_archive(url, md5, raw_dir, record, **kw):
    """The archive at raw_dir/<basename>: downloaded if absent, then checked against its md5 or
    the size/SHA-256 recorded at first download (record: url -> {size, sha256}, updated)."""
    path = os.path.join(raw_dir, os.path.basename(url))
    if not os.path.exists(path):
        download(url, path, md5=md5, **kw)
    elif _verify(path, md5=md5):                         # placed by hand, or left from before
        raise ValueError(f"{_verify(path, md5=md5)}. Delete it to download it again, or place a "
                         f"good copy there by hand from {url}")
    size, sha = os.path.getsize(path), file_digest(path, "sha256")
    known = record.get(url)
    if known and (known["size"], known["sha256"]) != (size, sha):
        raise ValueError(f"{path} ({size:,} bytes, sha256 {sha}) differs from the file first "
                         f"downloaded ({known['size']:,} bytes, sha256 {known['sha256']}); delete "
                         f"it to download it again, or place a good copy there by hand from {url}")
    record[url] = {"size": size, "sha256": sha}
    return path


def _extract(archive, members, out_dir):
    """Write the members (by basename) of a .tgz into out_dir; ValueError listing what is there."""
    with tarfile.open(archive, "r:gz") as tar:
        names = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        for base, ours in members:
            if base not in names:
                raise ValueError(f"{archive} has no file {base!r} (it has {sorted(names)[:20]}); "
                                 f"delete it and run again, or place the right archive by hand")
            with tar.extractfile(names[base]) as src, open(os.path.join(out_dir, ours + ".part"),
                                                            "wb") as dst:
                dst.write(src.read())
            os.replace(os.path.join(out_dir, ours + ".part"), os.path.join(out_dir, ours))


def read_sgm(path):
    """The sentences of a WMT 'fake SGML' file, as sacreBLEU extracts them: the text of each
    <seg ...>...</seg> line, outer spaces stripped and inner runs of spaces collapsed."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("<seg "):
                out.append(re.sub(r"\s+", " ", re.sub(r"<seg.*?>(.*)</seg>.*?", r"\1",
                                                      line).strip()))
    return out


def prepare_wmt14(data_dir, sources=WMT14, attempts=3, backoff=2.0, progress=True):
    """Download and prepare WMT14 en-de: data_dir/wmt14_en_de/{train,valid,test}.{en,de}, one
    raw sentence per line; returns {split: (en_path, de_path)}. Idempotent: a second call finds
    meta.json (written last) and returns at once. `sources` exists for tests (a local server)."""
    out_dir = os.path.join(data_dir, "wmt14_en_de")
    paths = {s: tuple(os.path.join(out_dir, f"{s}.{lang}") for lang in ("en", "de"))
             for s in ("train", "valid", "test")}
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        return paths
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    record_path = os.path.join(out_dir, "downloads.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    try:
        for url, md5, members in sources:
            archive = _fetch_archive(url, md5, raw_dir, record, attempts=attempts,
                                     backoff=backoff, progress=progress)
            _extract(archive, members, raw_dir)
    except DownloadError as e:
        names = ", ".join(os.path.basename(u) for u, _, _ in sources)
        raise DownloadError(f"{e}\nWMT14 needs these archives in {raw_dir}: {names}") from None
    finally:
        write_text(record_path, json.dumps(record, indent=1))
    counts = {}
    for lang in ("en", "de"):
        lines = [line for part in TRAIN_PARTS
                 for line in read_lines(os.path.join(raw_dir, f"train.{part}.{lang}"))]
        counts[f"train.{lang}"] = len(lines)
        write_text(paths["train"][lang == "de"], "\n".join(lines) + "\n")
        for split in ("valid", "test"):
            sents = read_sgm(os.path.join(raw_dir, f"{split}.{lang}.sgm"))
            counts[f"{split}.{lang}"] = len(sents)
            write_text(paths[split][lang == "de"], "\n".join(sents) + "\n")
    write_text(os.path.join(out_dir, "meta.json"), json.dumps(counts, indent=1))
    return paths


def write_text(path, text):
    """Atomically, through path.part and a rename: the file is whole or absent."""
    with open(path + ".part", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".part", path)


# ----------------------------------------------------------------------------- a real small corpus

DING_PATH = "/usr/share/trans/de-en"   # Debian package trans-de-en (Ding, GPL-2+)


def ding_sentence_pairs(path=DING_PATH, min_words=4):
    """English-German sentence pairs from the Ding dictionary (TU Chemnitz, Debian package
    trans-de-en): its example sentences, lines `German :: English` whose '|'-separated parts
    pair up. Kept: parts that are both full sentences (ending in . ? !) of >= min_words words,
    without dictionary markup ({m}, [Br.], ';' alternatives). About 16K pairs, deduplicated.
    Returns [(english, german)]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found. It comes from the Debian package trans-de-en: `apt-get install "
            f"trans-de-en`, or without installing: `apt-get download trans-de-en && dpkg-deb -x "
            f"trans-de-en_*.deb ding` and pass --data_path=ding/usr/share/trans/de-en")
    opener = gzip.open if path.endswith(".gz") else open
    pairs, seen = [], set()
    end = re.compile(r"[.?!]$")
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de, en = line.rstrip("\n").split(" :: ", 1)
            for d, e in zip(de.split("|"), en.split("|")):
                d, e = d.strip(), e.strip()
                if (end.search(d) and end.search(e) and min(len(d.split()), len(e.split()))
                        >= min_words and not re.search(r"[{}\[\];]", d + e) and e not in seen):
                    seen.add(e)
                    pairs.append((e, d))
    return pairs


# ----------------------------------------------------------------------------- tokenised data

def encode_pairs(pairs, tokenizer, max_len, long="skip"):
    """Token ids of (source, target) pairs, each side + EOS at most max_len tokens.
    long='skip' drops a longer pair, long='truncate' cuts it. Returns (list of (src, tgt) int
    arrays, number of pairs skipped or truncated)."""
    if long not in ("skip", "truncate"):
        raise ValueError(f"long={long!r} is not one of ('skip', 'truncate')")
    out, n_long = [], 0
    srcs = tokenizer.encode_many([s for s, _ in pairs])
    tgts = tokenizer.encode_many([t for _, t in pairs])
    for s_ids, t_ids in zip(srcs, tgts):
        if max(len(s_ids), len(t_ids)) + 1 > max_len:                   # + 1: EOS
            n_long += 1
            if long == "skip":
                continue
        s_ids, t_ids = s_ids[:max_len - 1] + [EOS], t_ids[:max_len - 1] + [EOS]
        out.append((np.array(s_ids, dtype=np.int32), np.array(t_ids, dtype=np.int32)))
    return out, n_long


def collate(examples, device="cpu"):
    """A batch from [(src_ids, tgt_ids)] (each ending in EOS): src (B, S) padded with PAD,
    tgt_in (B, T) = BOS + target, targets (B, T) = target with -100 at padding."""
    B = len(examples)
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples)
    src = torch.full((B, S), PAD, dtype=torch.long)
    tgt_in = torch.full((B, T), PAD, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (s, t) in enumerate(examples):
        src[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
        t = torch.from_numpy(t.astype(np.int64))
        targets[b, :len(t)] = t
        tgt_in[b, 0] = BOS
        tgt_in[b, 1:len(t)] = t[:-1]
    return _to(src, device), _to(tgt_in, device), _to(targets, device)


def length_batches(examples, max_tokens):
    """Index lists of batches of similar-length pairs, each at most max_tokens padded tokens
    (B * max(S, T)); sorting by length keeps padding small."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][1]), len(examples[i][0])))
    batches, cur, width = [], [], 0
    for i in order:
        w = max(width, len(examples[i][0]), len(examples[i][1]))
        if cur and w * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, w = [], max(len(examples[i][0]), len(examples[i][1]))
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


class ParallelStream(_Stream):
    """An infinite stream of training batches. batch(max_tokens) holds at most max_tokens padded
    tokens, B x max(S, T): as many pairs of similar length as fit (train.py's --max_tokens);
    batch k is one of the length-sorted batches for that budget, drawn by
    _generator(seed, _TRAIN, rank, k), so the stream resumes exactly from state_dict() and ranks
    draw different batches. seq_len: the longest pair (side + EOS), the least budget that holds
    every pair."""

    def __init__(self, examples, seq_len, seed=0, rank=0, world_size=1):
        self.examples, self.seq_len, self._batches = examples, seq_len, {}
        self.seed, self.rank, self.world_size, self.n_batches = seed, rank, world_size, 0

    def batch(self, max_tokens, device="cpu"):
        if max_tokens < self.seq_len:
            raise ValueError(f"max_tokens={max_tokens} padded tokens cannot hold a pair of "
                             f"seq_len={self.seq_len}; a batch is counted in tokens, not pairs")
        if max_tokens not in self._batches:
            self._batches[max_tokens] = length_batches(self.examples, max_tokens)
        batches = self._batches[max_tokens]
        j = int(torch.randint(len(batches), (1,), generator=self._next_generator()))
        return collate([self.examples[i] for i in batches[j]], device)


def real_tokens(batch):
    """The tokens of a collated batch (src, tgt_in, targets) that are not padding: source ids and
    scored targets, EOS included on both sides (what train.py's tok/s counts)."""
    src, _, targets = batch
    return int((src != PAD).sum()) + int((targets != IGNORE_INDEX).sum())


def load_parallel(dataset, data_dir="data", data_path=None, heldout=1000, seed=0):
    """Raw text pairs {'train', 'valid', 'test'} -> [(source, target)] and a name for caching.
    dataset 'wmt14': the prepared WMT14 files (downloaded if needed); 'parallel': data_path is
    FILE.tsv or SRC,TGT (two line-aligned files), heldout pairs each split off for valid/test."""
    if dataset == "wmt14":
        paths = prepare_wmt14(data_dir)
        splits = {k: read_aligned(*p, empty="skip" if k == "train" else "error")
                  for k, p in paths.items()}
        return splits, "wmt14_en_de"
    if dataset != "parallel":
        raise ValueError(f"dataset={dataset!r} is not one of ('wmt14', 'parallel')")
    if not data_path:
        raise ValueError("--dataset=parallel needs --data_path=FILE.tsv or --data_path=SRC,TGT")
    files = data_path.split(",")
    if len(files) > 2:
        raise ValueError(f"--data_path={data_path!r}: give FILE.tsv or SRC,TGT (two files)")
    pairs = read_aligned(*files) if len(files) == 2 else read_tsv(files[0])
    stat = [os.stat(f) for f in files]
    tag = hashlib.md5(repr([(os.path.abspath(f), s.st_size, s.st_mtime_ns)
                            for f, s in zip(files, stat)]).encode()).hexdigest()[:8]
    name = os.path.splitext(os.path.basename(files[0]))[0] + "_" + tag
    return split_heldout(pairs, heldout, seed), name


def encode_splits(splits, tokenizer, max_len):
    """Token ids of every split: long training pairs skipped, long held-out ones truncated
    (every held-out line must be translated and scored); the counts are printed."""
    out = {}
    for name, pairs in splits.items():
        long = "skip" if name == "train" else "truncate"
        out[name], n_long = encode_pairs(pairs, tokenizer, max_len, long)
        if n_long:
            print(f"{name}: {'skipped' if long == 'skip' else 'truncated'} {n_long:,} of "
                  f"{len(pairs):,} pairs longer than max_seq_len={max_len} tokens")
    return out


# ----------------------------------------------------------------------------- synthetic task

class ReverseTask(_Stream):
    """Synthetic transduction: translate a random string into its reverse. Strings of
    min_len..max_len symbols from 3..vocab_size-1, padded in a batch; the target's first token
    depends on the source's last real one, so the decoder must find it by cross-attention.
    Held-out strings are those with hash(string) % 10 == 0; training never draws one, so
    exact-match accuracy on them measures generalisation, not memory."""

    def __init__(self, vocab_size=20, min_len=4, max_len=24, seed=0, rank=0, world_size=1):
        if vocab_size < 5 or not 1 <= min_len <= max_len:
            raise ValueError(f"ReverseTask needs vocab_size >= 5 and 1 <= min_len <= max_len, "
                             f"got vocab_size={vocab_size}, min_len={min_len}, max_len={max_len}")
        self.vocab_size, self.min_len, self.max_len = vocab_size, min_len, max_len
        self.seed, self.rank, self.world_size, self.n_batches = seed, rank, world_size, 0
        self._w = torch.randint(1, 2**20, (max_len,), generator=torch.Generator().manual_seed(7))

    def _strings(self, n, g, heldout):
        out = []
        while len(out) < n:
            lens = torch.randint(self.min_len, self.max_len + 1, (n,), generator=g)
            x = torch.randint(3, self.vocab_size, (n, self.max_len), generator=g)
            x[torch.arange(self.max_len)[None] >= lens[:, None]] = PAD
            keep = ((x * self._w).sum(1) % 10 == 0) == heldout
            out += [row[:l].numpy() for row, l, k in zip(x, lens, keep) if k]
        return out[:n]

    def _examples(self, strings):
        eos = np.array([EOS])
        return [(np.concatenate([s, eos]), np.concatenate([s[::-1], eos])) for s in strings]

    def batch(self, max_tokens, device="cpu"):
        """max_tokens // (max_len + 1) training strings and their reverses, collated (see
        collate): a batch of max_tokens padded tokens whatever the lengths drawn."""
        n = max_tokens // (self.max_len + 1)
        if n < 1:
            raise ValueError(f"max_tokens={max_tokens} cannot hold a string of max_len + EOS = "
                             f"{self.max_len + 1} tokens")
        strings = self._strings(n, self._next_generator(), heldout=False)
        return collate(self._examples(strings), device)

    def heldout_set(self, n):
        """n held-out (source, target) id arrays, the same whatever was drawn before."""
        return self._examples(self._strings(n, _generator(self.seed, _VALID), heldout=True))


# ----------------------------------------------------------------------------- train.py's family

TRANSLATION_DATASETS = ("reverse", "parallel", "wmt14")


class TokenizedStream(ParallelStream):
    """ParallelStream that also keeps the tokenizer in its state_dict: the checkpoint then holds
    what translate.py needs, and --resume refuses a different tokenizer."""

    def __init__(self, tokenizer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer

    def state_dict(self):
        return {**super().state_dict(), "tokenizer": self.tokenizer.state()}

    def load_state_dict(self, state):
        if state.get("tokenizer") != self.tokenizer.state():
            raise SystemExit("error: --resume: the checkpoint was trained with another tokenizer "
                             "(other --tokenizer, --vocab_size or data)")
        super().load_state_dict(state)


def setup_translation(args, run):
    """train.py's setup_data for translation: (train stream, held-out data). The reverse task
    draws its strings; a corpus is read, and the tokenizer trained (sentencepiece) on rank 0
    while the other ranks wait, then found in its cache. Sets args.vocab_size to the
    tokenizer's."""
    if args.dataset == "reverse":
        task = ReverseTask(args.vocab_size, 4, args.seq_len - 1, args.seed, run.rank, run.world)
        return task, {"task": task}
    try:
        def prepare():
            splits, name = load_parallel(args.dataset, args.data_dir, args.data_path,
                                         args.heldout, args.seed)
            tok = build_tokenizer(args.tokenizer, splits["train"], args.data_dir, name,
                                  args.vocab_size)
            return splits, tok
        if run.rank == 0:
            splits, tok = prepare()
        if run.ddp:
            torch.distributed.barrier()
        if run.rank != 0:
            splits, tok = prepare()
    except (OSError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    args.vocab_size = tok.vocab_size
    data = encode_splits(splits, tok, args.seq_len)
    stream = TokenizedStream(tok, data["train"], args.seq_len, args.seed, run.rank, run.world)
    return stream, {**data, "text": splits, "tokenizer": tok}


# The second real corpus: a Bible in two languages, verse by verse. Debian ships SWORD modules of
# the King James Version (1769, English) and of the Reina-Valera 1909 (Spanish), both public
# domain, on one versification (KJV), so a verse key such as Matt.5.9 names the same verse in
# both. About 31K verses, ~25 words each: a corpus of the size this project's small recipe is
# for, archaic in register. pysword (MIT) reads the modules.
SWORD_PATH = "/usr/share/sword"
BIBLE_MODULES = ("engKJV2006eb", "spaRV1909eb")   # sword-text-kjv, sword-text-sparv


def sword_verses(module, sword_path=SWORD_PATH):
    """{'Book.chapter.verse': text} of one SWORD Bible module, markup stripped (pysword's
    clean=True), in canonical order."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise SystemExit("error: --dataset=bible reads SWORD modules with pysword: `pip install "
                         "pysword` (or `apt-get install python3-pysword`)") from None
    modules = SwordModules(sword_path)
    found = modules.parse_modules()
    if module not in found:
        raise FileNotFoundError(
            f"SWORD module {module!r} not found under {sword_path} (found: {sorted(found)}). "
            f"`apt-get install sword-text-kjv sword-text-sparv`, or without installing: "
            f"`apt-get download sword-text-kjv sword-text-sparv` and `dpkg-deb -x` each into one "
            f"folder, then pass --data_path=FOLDER/usr/share/sword")
    bible = modules.get_bible_from_module(module)
    verses = {}
    for books in bible.get_structure().get_books().values():
        for book in books:
            for chapter, n in enumerate(book.chapter_lengths, 1):
                for verse in range(1, n + 1):
                    text = bible.get(books=[book.osis_name], chapters=[chapter],
                                     verses=[verse], clean=True)
                    verses[f"{book.osis_name}.{chapter}.{verse}"] = text
    return verses


def align_verses(source, target):
    """[(source text, target text)] for the keys of `source` that `target` has too, in source's
    order: pilcrows (paragraph marks) removed, whitespace collapsed, pairs with an empty side
    dropped, repeated pairs kept once."""
    clean = lambda text: " ".join(text.replace("\u00b6", " ").split())
    pairs, seen = [], set()
    for key, text in source.items():
        pair = (clean(text), clean(target.get(key, "")))
        if all(pair) and pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def bible_verse_pairs(sword_path=SWORD_PATH, modules=BIBLE_MODULES):
    """English-Spanish verse pairs of the KJV and the Reina-Valera 1909 (see above): 30,919."""
    return align_verses(*(sword_verses(m, sword_path) for m in modules))


def translation_eval_batches(args, data, split, run, full):
    """This rank's share of a held-out split in batches of at most run.micro padded tokens: for
    the reverse task args.valid_size strings (the same every time), else the whole split (full
    or not: a split of a few thousand sentences costs a few training steps, and the best
    checkpoint is chosen on it)."""
    if args.dataset == "reverse":
        examples = data["task"].heldout_set(args.valid_size)
    else:
        examples = data[split]
    mine = examples[run.rank::run.world]
    return [collate([mine[i] for i in b]) for b in length_batches(mine, run.micro)]


def translation_metrics(args, nats, nll_nats, correct, count):
    """Per target token: the training loss (label-smoothed, as trained), the NLL of the targets
    (not smoothed: the number to compare and to choose checkpoints by) and its perplexity
    exp(nll), and the teacher-forced token accuracy (the next token given the true prefix: not a
    translation; translate.py --eval gives sacreBLEU)."""
    nll = nll_nats / count
    return {"loss": nats / count, "nll": nll, "ppl": math.exp(nll), "accuracy": correct / count}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("wmt14", "ding", "bible", "parallel"), required=True)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--data_path", default=None, help="ding: the Ding file; bible: the SWORD "
                   f"folder (default {SWORD_PATH}); parallel: FILE.tsv or SRC,TGT")
    args = p.parse_args()
    if args.dataset == "wmt14":
        print(json.dumps(prepare_wmt14(args.data_dir), indent=1))
    elif args.dataset in ("ding", "bible"):
        pairs, name, what = (
            (ding_sentence_pairs(args.data_path or DING_PATH), "ding_en_de.tsv",
             "English-German sentence pairs") if args.dataset == "ding" else
            (bible_verse_pairs(args.data_path or SWORD_PATH), "bible_en_es.tsv",
             "English-Spanish verse pairs (KJV, Reina-Valera 1909)"))
        out = os.path.join(args.data_dir, name)
        os.makedirs(args.data_dir, exist_ok=True)
        write_text(out, "".join(f"{source}\t{target}\n" for source, target in pairs))
        print(f"{len(pairs):,} {what} -> {out}")
    else:
        path = args.data_path or ""
        pairs = read_aligned(*path.split(",")) if "," in path else read_tsv(path)
        print(f"{len(pairs):,} pairs read from {path}")


if __name__ == "__main__":
    main()
