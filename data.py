"""Data for the Reformer experiments: the duplication task, enwik8 and any local text file.

Implements the data side of Kitaev, Kaiser & Levskaya, "Reformer: The Efficient Transformer"
(ICLR 2020): the synthetic duplication task of Section 2 / Table 2, and byte-level enwik8 with
the Tensor2Tensor byte vocabulary (258 ids) that the authors' Trax configs use. The T2T split
was checked against tensor2tensor/data_generators/enwik8.py (it slices the decoded text as
data[:-10M] / data[-10M:-5M] / data[-5M:] characters).

Prepare the byte data once (downloads enwik8.zip, ~36 MB, if it is not in --data_dir):

    python data.py --dataset=enwik8 --data_dir=data                      # byte split 90M/5M/5M
    python data.py --dataset=enwik8 --data_dir=data --enwik8_split=t2t   # the paper's split
    python data.py --dataset=text --data_path=input.txt --seq_len=1024

Offline: fetch http://mattmahoney.net/dc/enwik8.zip elsewhere and put it in --data_dir by hand.

Use from Python (train.py does this):

    task = DuplicationTask(vocab_size=128, seq_len=1024, seed=0, rank=rank)
    x, y = task.batch(32)                              # (B, T) int64, y = -100 where not counted
    paths = prepare_enwik8('data', split='byte')       # {'train': .../train.bin, 'valid': ..., 'test': ...}
    train = ByteStream(paths['train'], seq_len=4096, seed=0, rank=rank)
    x, y = train.batch(8, 'cuda')                      # random windows, y = x shifted by one
    for x, y in ByteStream(paths['test'], 4096).iter_eval(8):   # every byte predicted once
        ...                                            # sum nats and counts, then bits_per_char()

Shape legend: B batch, T sequence length (time).
"""
import argparse
import hashlib
import json
import math
import os
import time
import zipfile
import zlib

import numpy as np
import requests
import torch
from tqdm import tqdm

IGNORE_INDEX = -100  # what F.cross_entropy skips by default: positions that are not scored

# enwik8 as published on http://mattmahoney.net/dc/text.html. The MD5 Mahoney publishes is that of
# the unzipped 100,000,000-byte file, not of the zip, so the zip is checked by size (before the
# .part file is renamed) and by the CRC-32 zipfile checks on reading, and the file inside by size
# and by that MD5. Nobody publishes an MD5 of the zip; pass md5= to download() if you have one.
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_SIZE = 36_445_475
ENWIK8_ZIP_MD5 = None
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
# Valid and test hold 5M units each; train is the rest. Units are bytes for the byte split
# (90M/5M/5M) and characters for T2T's (89,621,832/5M/5M characters; enwik8 has 99,621,832).
ENWIK8_HELDOUT = 5_000_000


# ----------------------------------------------------------------------------- tokenizer

class ByteTokenizer:
    """Tensor2Tensor's ByteTextEncoder: ids 0 (pad) and 1 (eos) are reserved, byte b is id b + 2.

    encode() gives the UTF-8 bytes of the text shifted by 2, so any str round-trips. decode()
    drops the reserved ids (T2T prints them as '<pad>'/'<EOS>' instead) and decodes invalid UTF-8
    with errors='replace', because a sampled model can emit any byte sequence.
    """
    vocab_size = 258
    PAD = 0
    EOS = 1
    OFFSET = 2

    def encode(self, text):
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"byte token ids must be in [0, {self.vocab_size}), got {ids}")
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", "replace")


# ----------------------------------------------------------------------------- randomness

def _generator(*keys):
    """A torch.Generator that is a pure function of the integer keys.

    SeedSequence hashes the keys, so (seed, rank) streams are unrelated rather than shifted copies
    of each other, as consecutive manual_seed(seed + rank) values could be.
    """
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


_TRAIN, _VALID = 0, 1  # first key after the seed, so training and validation streams never meet


def _check_rank(seed, rank, world_size):
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _to(t, device):
    """Move a CPU batch to device; pinned memory lets the copy to a GPU overlap compute."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Stream:
    """An infinite stream whose batch k is drawn from _generator(seed, _TRAIN, rank, k).

    Why a counter and not the generator's state: train.py saves a checkpoint on rank 0 only, and
    a rank-0 RNG state loaded on every rank would make all ranks draw the same batches. The counter
    is the same on every rank, so any rank's state_dict resumes every rank exactly.
    """

    def _next_generator(self):
        g = _generator(self.seed, _TRAIN, self.rank, self.n_batches)
        self.n_batches += 1
        return g

    def state_dict(self):
        return {"n_batches": self.n_batches}

    def load_state_dict(self, state):
        self.n_batches = int(state["n_batches"])


# ----------------------------------------------------------------------------- duplication task

class DuplicationTask(_Stream):
    """The duplication task of the paper (Section 2, "Analysis on a synthetic task", Table 2): copy a random string.

    A sequence is s = [0, w, 0, w] of length T = seq_len, with |w| = T/2 - 1 symbols drawn
    uniformly from 1..vocab_size-1. Language-model convention, x = s and y[t] = s[t+1]:

        y[t] = -100        for t <  T/2   (predicting the first w and the second 0: not learnable)
        y[t] = s[t+1]      for T/2 <= t <= T-2   (the second copy of w: exactly |w| targets)
        y[T-1] = -100      (there is no next token)

    so the loss and masked_accuracy() count exactly the predictions of the copy s[T/2+1:].
    Training batches come from an infinite stream fixed by (seed, rank, batch index); valid_set()
    is drawn from its own stream, so it does not depend on the rank or on how many batches were
    drawn (with vocab 128 and |w| = 511, a training sequence equal to a valid one never happens).
    """

    def __init__(self, vocab_size=128, seq_len=1024, seed=0, rank=0, world_size=1):
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"seq_len must be even and >= 4 for '0 w 0 w', got {seq_len}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (symbol 0 plus at least one), got {vocab_size}")
        _check_rank(seed, rank, world_size)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_batches = 0

    def _sample(self, n, generator):
        half = self.seq_len // 2
        w = torch.randint(1, self.vocab_size, (n, half - 1), generator=generator)  # (B, T/2-1)
        zero = torch.zeros(n, 1, dtype=torch.long)
        s = torch.cat([zero, w, zero, w], dim=1)  # (B, T)
        y = torch.full_like(s, IGNORE_INDEX)
        y[:, half:-1] = s[:, half + 1:]  # only the second copy of w is scored
        return s, y

    def batch(self, batch_size, device="cpu"):
        x, y = self._sample(batch_size, self._next_generator())
        return _to(x, device), _to(y, device)

    def valid_set(self, n_sequences, seed=None, device="cpu"):
        """A fixed validation set: the same for every rank and whatever has been drawn before."""
        seed = self.seed if seed is None else seed
        x, y = self._sample(n_sequences, _generator(seed, _VALID))
        return _to(x, device), _to(y, device)


def masked_accuracy(logits, targets):
    """(n_correct, n_counted) of argmax predictions, over the targets that are not -100.

    logits (B, T, V), targets (B, T). Returns Python ints so callers can sum over batches and
    ranks before dividing (a mean of per-batch means would weight small batches wrongly).
    """
    mask = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & mask
    return int(correct.sum()), int(mask.sum())


def bits_per_char(total_nats, total_count):
    """Mean cross-entropy in bits: nats / count / ln 2.

    The count is of byte tokens, so this is bits per byte (what the paper calls bits/dim). On
    enwik8 papers call it bits per character, the convention this follows; with the T2T split a
    non-ASCII character is several bytes, so it is still per byte, not per Unicode character.
    """
    total_nats, total_count = float(total_nats), float(total_count)
    if total_count <= 0:
        raise ValueError(f"bits_per_char needs a positive count of targets, got {total_count}")
    return total_nats / total_count / math.log(2)


# ----------------------------------------------------------------------------- download

class DownloadError(RuntimeError):
    """A download that failed or did not verify; the message says what to do by hand."""


def _verify(path, size=None, md5=None):
    """None if the file at path has the expected size and MD5 (each optional), else why not."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"{path} has {actual:,} bytes, expected {size:,}"
    if md5 is not None and file_digest(path) != md5:
        return f"{path} has the wrong MD5 (expected {md5})"
    return None


def file_digest(path, algorithm="md5", chunk=1 << 22):
    """The hex digest of a file, read in 4 MB blocks (the archives are hundreds of MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_once(url, part, timeout, progress):
    """Stream url into part with a progress bar; returns (bytes written, Content-Length or None)."""
    n = 0
    with requests.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        length = r.headers.get("Content-Length")
        length = int(length) if length is not None else None
        bar = tqdm(total=length, unit="B", unit_scale=True, desc=os.path.basename(url),
                   disable=not progress)
        with open(part, "wb") as f, bar:
            for block in r.iter_content(chunk_size=1 << 20):
                f.write(block)
                n += len(block)
                bar.update(len(block))
    return n, length


def download(url, dest, size=None, md5=None, attempts=3, backoff=2.0, timeout=60, progress=True):
    """Download url to dest, or raise DownloadError; dest only ever appears complete and verified.

    The bytes go to dest + '.part', renamed to dest only once the size (expected size and the
    server's Content-Length) and MD5 (when given) match, so an interrupted run never leaves a
    file that looks finished. Failures are retried `attempts` times in all, sleeping
    backoff * 2**i seconds between them; a stale .part is overwritten (no resume).
    """
    part = dest + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    error = None
    for i in range(attempts):
        if i:
            time.sleep(backoff * 2 ** (i - 1))
        try:
            n, length = _fetch_once(url, part, timeout, progress)
            if length is not None and n != length:
                raise DownloadError(f"truncated: got {n:,} of {length:,} bytes")
            bad = _verify(part, size, md5)
            if bad:
                raise DownloadError(bad)
            os.replace(part, dest)  # atomic: dest appears only now, complete and verified
            return dest
        except (requests.RequestException, DownloadError) as e:
            error = e
        finally:
            if os.path.exists(part):
                os.remove(part)
    raise DownloadError(
        f"could not download {url} after {attempts} attempts; last error: {error}\n"
        f"If this machine is offline, download {url} on one that is not and place it by hand at "
        f"{dest}" + (f" ({size:,} bytes)" if size else "") + ", then run again.")


# ----------------------------------------------------------------------------- preparing splits

def _write_atomic(path, data):
    """Write bytes (or a uint8 array) through a .part file so a crash leaves no half-written split."""
    with open(path + ".part", "wb") as f:
        f.write(memoryview(data))
    os.replace(path + ".part", path)


def _load_meta(out_dir, source):
    """The split paths if out_dir holds a finished preparation of this source, else None."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    paths = {k: os.path.join(out_dir, f"{k}.bin") for k in ("train", "valid", "test")}
    sizes_ok = all(os.path.exists(p) and os.path.getsize(p) == meta["sizes"][k]
                   for k, p in paths.items())
    return paths if meta.get("source") == source and sizes_ok else None


def _write_splits(out_dir, source, splits):
    """Write train/valid/test .bin files, then meta.json last: its presence marks completion."""
    os.makedirs(out_dir, exist_ok=True)
    for name, data in splits.items():
        _write_atomic(os.path.join(out_dir, f"{name}.bin"), data)
    meta = {"source": source, "sizes": {k: len(v) for k, v in splits.items()}}
    _write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1).encode())
    return {k: os.path.join(out_dir, f"{k}.bin") for k in splits}


def _heldout_split(seq, n):
    """train = all but the last 2n units, valid = the n before the last n, test = the last n."""
    return {"train": seq[:-2 * n], "valid": seq[-2 * n:-n], "test": seq[-n:]}


def _read_enwik8(zip_path, url, member_size, member_md5):
    """The bytes of the file 'enwik8' inside zip_path, checked; a clear error if anything is off."""
    fix = (f"Delete {zip_path} and run again to download it, or place a good copy there by hand "
           f"(from {url}).")
    try:
        with zipfile.ZipFile(zip_path) as z:
            if "enwik8" not in z.namelist():
                raise ValueError(f"{zip_path} has no file named 'enwik8' (it has {z.namelist()}). {fix}")
            raw = z.read("enwik8")  # zipfile checks the CRC-32 here, so damaged data raises
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{zip_path} is not a valid enwik8 zip ({e}). {fix}") from None
    if member_size is not None and len(raw) != member_size:
        raise ValueError(f"'enwik8' in {zip_path} has {len(raw):,} bytes, expected {member_size:,}. {fix}")
    if member_md5 is not None and hashlib.md5(raw).hexdigest() != member_md5:
        raise ValueError(f"'enwik8' in {zip_path} has the wrong MD5 (expected {member_md5}). {fix}")
    return raw


def _split_enwik8(raw, split, n, zip_path):
    if len(raw) <= 2 * n:
        raise ValueError(f"'enwik8' in {zip_path} has {len(raw):,} bytes, too few for two held-out "
                         f"splits of {n:,}")
    if split == "byte":
        return _heldout_split(raw, n)
    # T2T splits the decoded text by characters, then encodes each part back to UTF-8 bytes.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"'enwik8' in {zip_path} is not valid UTF-8 ({e}); the t2t split needs text") from None
    return {k: v.encode("utf-8") for k, v in _heldout_split(text, n).items()}


def prepare_enwik8(data_dir, split="byte", url=ENWIK8_URL, size=ENWIK8_ZIP_SIZE, md5=ENWIK8_ZIP_MD5,
                   member_size=ENWIK8_SIZE, member_md5=ENWIK8_MD5, n_heldout=ENWIK8_HELDOUT,
                   attempts=3, backoff=2.0, progress=True):
    """Download (if needed) and split enwik8; returns {'train', 'valid', 'test'} -> .bin paths.

    split='byte': bytes [0, 90M) / [90M, 95M) / [95M, 100M), the split most LM papers use.
    split='t2t': Tensor2Tensor's, used by the paper: the text decoded as UTF-8 and cut by
    characters into 89,621,832 / 5,000,000 / 5,000,000, each part encoded back to bytes.
    The .bin files hold raw bytes (uint8); ByteStream adds 2 to get token ids, since ids go up to
    257 and would not fit a uint8. Files go to data_dir/enwik8_<split>/; a second call finds
    meta.json (written last) and reuses them. url/size/md5/member_*/n_heldout exist for tests.
    Under torchrun call it on rank 0 and barrier: ranks preparing at once would share one .part.
    """
    if split not in ("byte", "t2t"):
        raise ValueError(f"enwik8 split must be 'byte' or 't2t', got {split!r}")
    out_dir = os.path.join(data_dir, f"enwik8_{split}")
    source = f"enwik8 {split} split, {n_heldout} held out"
    paths = _load_meta(out_dir, source)
    if paths:
        return paths
    zip_path = os.path.join(data_dir, "enwik8.zip")
    if os.path.exists(zip_path):  # downloaded earlier or placed by hand: check it, never overwrite
        bad = _verify(zip_path, size, md5)
        if bad:
            raise ValueError(f"{bad}. Delete it and run again to download it, or place a good copy "
                             f"there by hand (from {url}).")
    else:
        download(url, zip_path, size, md5, attempts=attempts, backoff=backoff, progress=progress)
    raw = _read_enwik8(zip_path, url, member_size, member_md5)
    return _write_splits(out_dir, source, _split_enwik8(raw, split, n_heldout, zip_path))


def prepare_text(path, data_dir, seq_len=1):
    """Split a local file 90/5/5 by bytes into data_dir/text_<name>/; returns the .bin paths.

    Each of valid and test (5% each) must hold one full window of seq_len + 1 bytes, so the file
    needs at least 20 * (seq_len + 1) bytes. The source is read through np.memmap (no RAM), and
    the splits are rebuilt when the file's size or modification time changes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} not found; check --data_path")
    n = os.path.getsize(path)
    if n == 0:
        raise ValueError(f"text file {path} is empty; point --data_path at a file with text in it")
    minimum = 20 * (seq_len + 1)
    if n < minimum:
        raise ValueError(
            f"text file {path} has {n:,} bytes, too short: split 90/5/5, valid and test each need "
            f"seq_len + 1 = {seq_len + 1} bytes, so the file needs at least {minimum:,}. "
            f"Use a longer file or a smaller --seq_len.")
    stat = os.stat(path)
    source = f"{os.path.abspath(path)} {stat.st_size} {stat.st_mtime_ns}"
    out_dir = os.path.join(data_dir, "text_" + os.path.splitext(os.path.basename(path))[0])
    paths = _load_meta(out_dir, source)
    if paths:
        return paths
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return _write_splits(out_dir, source, _heldout_split(raw, n // 20))


def prepare_dataset(dataset, data_dir="data", data_path=None, enwik8_split="byte", seq_len=1):
    """The .bin paths for --dataset=enwik8 or --dataset=text (the duplication task has no files)."""
    if dataset == "enwik8":
        return prepare_enwik8(data_dir, enwik8_split)
    if dataset == "text":
        if not data_path:
            raise ValueError("--dataset=text needs --data_path=FILE")
        return prepare_text(data_path, data_dir, seq_len)
    raise ValueError(f"no files to prepare for dataset {dataset!r}; expected 'enwik8' or 'text'")


# ----------------------------------------------------------------------------- reading splits

class ByteStream(_Stream):
    """Token windows from a .bin split, read through np.memmap so the corpus stays on disk.

    batch(): B random windows, x = tokens[i:i+T] and y = tokens[i+1:i+T+1], token = byte + 2.
    iter_eval(): consecutive windows that predict every byte of the split but the first once.
    """

    def __init__(self, bin_path, seq_len, seed=0, rank=0, world_size=1):
        _check_rank(seed, rank, world_size)
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"{bin_path} not found; prepare it first, e.g. "
                                    f"python data.py --dataset=enwik8 --data_dir=DIR")
        n = os.path.getsize(bin_path)
        if n < seq_len + 1:
            raise ValueError(f"{bin_path} has {n:,} bytes, fewer than one window of seq_len + 1 = "
                             f"{seq_len + 1:,}; use more data or a smaller --seq_len")
        self.data = np.memmap(bin_path, dtype=np.uint8, mode="r")
        self.bin_path, self.seq_len = bin_path, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_batches = 0

    def _tokens(self, a, b):
        return torch.from_numpy(self.data[a:b].astype(np.int64)) + ByteTokenizer.OFFSET

    def batch(self, batch_size, device="cpu"):
        T = self.seq_len
        starts = torch.randint(0, len(self.data) - T, (batch_size,), generator=self._next_generator())
        window = np.stack([self.data[i:i + T + 1] for i in starts.tolist()])  # (B, T+1) uint8
        # gather as bytes, then widen once: int64 temporaries per row cost more than the reads
        x = torch.from_numpy(window[:, :-1].astype(np.int64)) + ByteTokenizer.OFFSET  # (B, T)
        y = torch.from_numpy(window[:, 1:].astype(np.int64)) + ByteTokenizer.OFFSET  # (B, T)
        return _to(x, device), _to(y, device)

    def n_eval_windows(self):
        """Windows of T targets that cover the N - 1 predictable bytes: ceil((N - 1) / T)."""
        return -(-(len(self.data) - 1) // self.seq_len)

    def _eval_window(self, k):
        """Window k predicts bytes kT+1 .. kT+T; past the end: x = PAD, y = -100 (not counted)."""
        T, a = self.seq_len, k * self.seq_len
        x = torch.full((T,), ByteTokenizer.PAD, dtype=torch.long)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        m = max(0, min(a + T + 1, len(self.data)) - a - 1)  # targets in this window
        if m:
            x[:m], y[:m] = self._tokens(a, a + m), self._tokens(a + 1, a + m + 1)
        return x, y

    def iter_eval(self, batch_size, rank=0, world_size=1, device="cpu"):
        """Yield (x, y) batches, (B, T), covering rank's share of the split's windows.

        Rank r takes windows r, r + world_size, ...; every rank yields the same number of batches
        (the short ranks get all-padding windows), because a DDP forward can synchronise across
        ranks and a rank that stopped early would hang the rest. The final partial window pads
        x with PAD after its real tokens and y with -100; under causal attention the padding
        comes after every scored position, so it changes nothing. Each window starts without
        context (no memory across windows), as in T2T's evaluation. Sum the nats and the counts
        of y != -100 over batches and ranks, then call bits_per_char once.
        """
        _check_rank(0, rank, world_size)
        per_rank = -(-self.n_eval_windows() // world_size)
        mine = [rank + j * world_size for j in range(per_rank)]
        for i in range(0, per_rank, batch_size):
            xs, ys = zip(*(self._eval_window(k) for k in mine[i:i + batch_size]))
            yield _to(torch.stack(xs), device), _to(torch.stack(ys), device)  # (B, T) each


# ----------------------------------------------------------------------------- command line

def main():
    p = argparse.ArgumentParser(description="Download and split the byte datasets ahead of training.")
    p.add_argument("--dataset", choices=["enwik8", "text"], default="enwik8", help="which corpus to prepare")
    p.add_argument("--data_dir", default="data", help="where enwik8.zip and the .bin splits live")
    p.add_argument("--data_path", default=None, help="the local file for --dataset=text")
    p.add_argument("--enwik8_split", choices=["byte", "t2t"], default="byte",
                   help="byte: 90M/5M/5M bytes; t2t: the paper's split by characters")
    p.add_argument("--seq_len", type=int, default=1, help="text: each split must hold seq_len + 1 bytes")
    args = p.parse_args()
    try:
        paths = prepare_dataset(args.dataset, args.data_dir, args.data_path, args.enwik8_split, args.seq_len)
    except (OSError, ValueError, DownloadError) as e:  # a bad file or no network: the message says the fix
        raise SystemExit(f"error: {e}")
    for name, path in paths.items():
        print(f"{name:5s} {os.path.getsize(path):>12,} bytes  {path}")


if __name__ == "__main__":
    main()
