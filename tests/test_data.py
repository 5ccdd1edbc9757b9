"""Tests for data.py: tokenizer, duplication task, byte streams, bits per char, download, preparation.

    python -m pytest tests/test_data.py -q

The download tests run against a threaded http.server on 127.0.0.1 (port 0) serving a small zip
that the test builds; nothing touches the internet and no dataset ships with the repo.
"""
import hashlib
import io
import math
import os
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import data
from data import (ByteStream, ByteTokenizer, DownloadError, DuplicationTask, bits_per_char,
                  download, masked_accuracy, prepare_dataset, prepare_enwik8, prepare_text)

FAST = dict(attempts=2, backoff=0.0, progress=False)  # retries without the real-world waits


# ----------------------------------------------------------------------------- tokenizer

@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(2 <= i < tok.vocab_size for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tokenizer_matches_t2t_byte_encoder():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.PAD, tok.EOS) == (258, 0, 1)
    assert tok.encode("hi") == [ord("h") + 2, ord("i") + 2]
    assert tok.encode("é") == [0xC3 + 2, 0xA9 + 2]  # two UTF-8 bytes
    assert tok.encode("\x00\xff")[0] == 2 and max(tok.encode("\U0010ffff")) <= 257


def test_tokenizer_decode_drops_reserved_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    assert tok.decode([0, ord("a") + 2, 1, ord("b") + 2]) == "ab"
    assert tok.decode(torch.tensor([ord("a") + 2, 0xFF + 2])) == "a\ufffd"  # 0xFF is never UTF-8
    with pytest.raises(ValueError, match="258"):
        tok.decode([258])


# ----------------------------------------------------------------------------- duplication task

def test_duplication_structure_and_mask():
    T, V = 16, 5
    x, y = DuplicationTask(vocab_size=V, seq_len=T, seed=3).batch(64)
    half = T // 2
    assert x.shape == y.shape == (64, T) and x.dtype == y.dtype == torch.int64
    assert (x[:, 0] == 0).all() and (x[:, half] == 0).all()
    assert torch.equal(x[:, 1:half], x[:, half + 1:])  # 0 w 0 w
    w = x[:, 1:half]
    assert w.min() >= 1 and w.max() <= V - 1 and set(w.unique().tolist()) == set(range(1, V))
    # scored exactly at t = T/2 .. T-2, where y[t] = x[t+1] is the copy of w
    assert (y[:, :half] == -100).all() and (y[:, -1] == -100).all()
    assert torch.equal(y[:, half:-1], x[:, half + 1:])
    assert torch.equal(y[:, half:-1], w)
    assert int((y != -100).sum(1).unique()) == half - 1


def test_duplication_deterministic_and_different_per_rank():
    a = DuplicationTask(seq_len=32, seed=1, rank=0, world_size=2)
    b = DuplicationTask(seq_len=32, seed=1, rank=0, world_size=2)
    c = DuplicationTask(seq_len=32, seed=1, rank=1, world_size=2)
    d = DuplicationTask(seq_len=32, seed=2, rank=0, world_size=2)
    xa1, xa2 = a.batch(4)[0], a.batch(4)[0]
    assert torch.equal(xa1, b.batch(4)[0]) and torch.equal(xa2, b.batch(4)[0])
    assert not torch.equal(xa1, xa2)  # an infinite stream, not one batch repeated
    assert not torch.equal(xa1, c.batch(4)[0]) and not torch.equal(xa1, d.batch(4)[0])


def test_duplication_valid_set_fixed_regardless_of_rank_and_draws():
    a = DuplicationTask(seq_len=32, seed=1, rank=0, world_size=2)
    b = DuplicationTask(seq_len=32, seed=1, rank=1, world_size=2)
    for _ in range(3):
        b.batch(8)
    va, vb = a.valid_set(16), b.valid_set(16)
    assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert not torch.equal(va[0], a.valid_set(16, seed=5)[0])
    assert not torch.equal(va[0][:8], DuplicationTask(seq_len=32, seed=1).batch(8)[0])
    assert torch.equal(va[1][:, 16:-1], va[0][:, 17:])


def test_duplication_state_dict_resumes_exactly():
    a = DuplicationTask(seq_len=32, seed=7, rank=1, world_size=2)
    a.batch(4)
    state = a.state_dict()
    expected = a.batch(4)
    b = DuplicationTask(seq_len=32, seed=7, rank=1, world_size=2)
    b.load_state_dict(state)
    got = b.batch(4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("kwargs", [dict(seq_len=15), dict(seq_len=2), dict(vocab_size=1),
                                    dict(rank=2, world_size=2), dict(seed=-1)])
def test_duplication_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DuplicationTask(**kwargs)


def test_masked_accuracy_ignores_masked_positions():
    targets = torch.tensor([[-100, 2, 1, -100]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 0] = logits[0, 1, 2] = logits[0, 2, 0] = logits[0, 3, 1] = 1.0
    assert masked_accuracy(logits, targets) == (1, 2)  # position 1 right, position 2 wrong
    x, y = DuplicationTask(vocab_size=7, seq_len=12).batch(3)
    perfect = torch.nn.functional.one_hot(y.clamp(min=0), 7).float()
    assert masked_accuracy(perfect, y) == (15, 15)


def test_bits_per_char():
    assert bits_per_char(math.log(2) * 10, 10) == pytest.approx(1.0)
    assert bits_per_char(torch.tensor(3.0), torch.tensor(2)) == pytest.approx(1.5 / math.log(2))
    assert bits_per_char(math.log(258), 1) == pytest.approx(math.log2(258))
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0)


# ----------------------------------------------------------------------------- byte streams

def _bin(tmp_path, n, name="split.bin"):
    path = str(tmp_path / name)
    raw = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    raw.tofile(path)
    return path, raw.astype(np.int64) + 2


def test_byte_stream_windows(tmp_path):
    path, tokens = _bin(tmp_path, 500)
    stream = ByteStream(path, seq_len=32, seed=0)
    assert isinstance(stream.data, np.memmap)
    x, y = stream.batch(16)
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        i = next(i for i in range(len(tokens) - 32) if (tokens[i:i + 32] == row_x).all())
        assert (tokens[i + 1:i + 33] == row_y).all()


def test_byte_stream_reaches_both_ends(tmp_path):
    path, tokens = _bin(tmp_path, 40)
    x, y = ByteStream(path, seq_len=8).batch(2000)
    assert (x[:, 0] == tokens[0]).any() and (y[:, -1] == tokens[-1]).any()


def test_byte_stream_deterministic_per_rank_and_resumable(tmp_path):
    path, _ = _bin(tmp_path, 1000)
    a = ByteStream(path, 16, seed=0, rank=0, world_size=2)
    b = ByteStream(path, 16, seed=0, rank=1, world_size=2)
    first = a.batch(8)[0]
    assert torch.equal(first, ByteStream(path, 16, seed=0, rank=0, world_size=2).batch(8)[0])
    assert not torch.equal(first, b.batch(8)[0])
    state = a.state_dict()
    expected = a.batch(8)[0]
    c = ByteStream(path, 16, seed=0, rank=0, world_size=2)
    c.load_state_dict(state)
    assert torch.equal(c.batch(8)[0], expected)


@pytest.mark.parametrize("n, T, B, world", [(33, 8, 3, 1), (34, 8, 2, 1), (9, 8, 4, 1),
                                            (101, 10, 3, 2), (100, 7, 2, 3), (50, 16, 8, 4),
                                            (50, 16, 1, 3)])
def test_iter_eval_predicts_every_byte_once(tmp_path, n, T, B, world):
    path, tokens = _bin(tmp_path, n)
    stream = ByteStream(path, seq_len=T)
    counts = np.zeros(n, dtype=int)
    n_batches = []
    for rank in range(world):
        batches = list(stream.iter_eval(B, rank=rank, world_size=world))
        n_batches.append(len(batches))
        for x, y in batches:
            assert x.shape == y.shape and x.shape[1] == T and x.shape[0] <= B
            for row_x, row_y in zip(x.numpy(), y.numpy()):
                scored = row_y != -100
                m = int(scored.sum())
                assert scored[:m].all()  # the scored targets come first, padding after
                if m == 0:
                    continue
                a = next(a for a in range(0, n, T) if (tokens[a:a + m] == row_x[:m]).all()
                         and (tokens[a + 1:a + m + 1] == row_y[:m]).all())
                counts[a + 1:a + m + 1] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()
    assert len(set(n_batches)) == 1  # equal batch counts, so DDP ranks stay in step


def test_byte_stream_errors_name_the_file(tmp_path):
    path, _ = _bin(tmp_path, 8)
    with pytest.raises(ValueError, match=r"split\.bin.*8 bytes.*9"):
        ByteStream(path, seq_len=8)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        ByteStream(str(tmp_path / "missing.bin"), seq_len=8)


# ----------------------------------------------------------------------------- local HTTP server

class _Server:
    """Routes path -> bytes; '/truncated' promises 1000 more bytes than it sends, then hangs up."""

    def __init__(self):
        self.routes, self.hits = {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.routes.get(self.path.replace("/truncated", ""))
                if body is None:
                    self.send_error(404)
                    return
                extra = 1000 if self.path.startswith("/truncated") else 0
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _unreachable_url():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


def test_download_writes_part_then_renames(server, tmp_path, monkeypatch):
    body = os.urandom(5000)
    server.routes["/f.zip"] = body
    dest = str(tmp_path / "sub" / "f.zip")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((src, dst, os.path.getsize(src), os.path.exists(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", spy)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.zip.part").write_bytes(b"stale half of an old download")
    md5 = hashlib.md5(body).hexdigest()
    assert download(server.url + "/f.zip", dest, size=5000, md5=md5, **FAST) == dest
    assert seen == [(dest + ".part", dest, 5000, False)]  # complete .part, dest absent until then
    assert open(dest, "rb").read() == body and not os.path.exists(dest + ".part")


@pytest.mark.parametrize("size, md5, why", [(5000, "0" * 32, "MD5"), (4999, None, "4,999")],
                         ids=["md5", "size"])
def test_download_bad_checksum_or_size_leaves_nothing(server, tmp_path, size, md5, why):
    server.routes["/f.zip"] = os.urandom(5000)
    dest = str(tmp_path / "f.zip")
    with pytest.raises(DownloadError, match=why) as e:
        download(server.url + "/f.zip", dest, size=size, md5=md5, **FAST)
    assert server.url + "/f.zip" in str(e.value) and "by hand" in str(e.value)
    assert len(server.hits) == 2  # retried
    assert os.listdir(tmp_path) == []


def test_download_truncated_response_fails_after_retries(server, tmp_path):
    server.routes["/f.zip"] = os.urandom(5000)
    dest = str(tmp_path / "f.zip")
    with pytest.raises(DownloadError, match="after 3 attempts") as e:
        download(server.url + "/truncated/f.zip", dest, attempts=3, backoff=0.0, progress=False)
    assert server.url + "/truncated/f.zip" in str(e.value)
    assert server.hits == ["/truncated/f.zip"] * 3
    assert os.listdir(tmp_path) == []


def test_download_checks_content_length_itself(tmp_path, monkeypatch):
    """urllib3 < 2 hands over a short body without complaint; the length check must catch it."""
    class ShortResponse:
        headers = {"Content-Length": "100"}
        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None
        raise_for_status = lambda self: None
        iter_content = lambda self, chunk_size: iter([b"x" * 60])

    monkeypatch.setattr(data.requests, "get", lambda url, **kw: ShortResponse())
    with pytest.raises(DownloadError, match="truncated: got 60 of 100"):
        download("http://example.invalid/f.zip", str(tmp_path / "f.zip"), **FAST)
    assert os.listdir(tmp_path) == []


def test_download_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url + "/nothing.zip", str(tmp_path / "f.zip"), **FAST)
    assert os.listdir(tmp_path) == []


def test_download_unreachable_names_url_and_manual_fix(tmp_path):
    url = _unreachable_url()
    dest = str(tmp_path / "enwik8.zip")
    with pytest.raises(DownloadError) as e:
        prepare_enwik8(str(tmp_path), url=url, **FAST)
    message = str(e.value)
    assert url in message and "by hand" in message and dest in message
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- enwik8

# ASCII with 2-, 3- and 4-byte characters sprinkled in, so the t2t split (by characters) and
# the byte split differ, as they do on the real enwik8.
TEXT = "".join(f"<page id={i}> caf\u00e9 \u65e5\u672c \U0001f600 text {i * i}\n" for i in range(120))
RAW = TEXT.encode("utf-8")
HELD = 300


def _zip(member=RAW, name="enwik8", method=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        z.writestr(name, member)
    return buf.getvalue()


def _prepare(server, tmp_path, split="byte", zip_bytes=None, **kw):
    zip_bytes = _zip() if zip_bytes is None else zip_bytes
    server.routes["/enwik8.zip"] = zip_bytes
    args = dict(url=server.url + "/enwik8.zip", size=len(zip_bytes), md5=hashlib.md5(zip_bytes).hexdigest(),
                member_size=len(RAW), member_md5=hashlib.md5(RAW).hexdigest(), n_heldout=HELD, **FAST)
    args.update(kw)
    return prepare_enwik8(str(tmp_path), split=split, **args)


def _read(paths):
    return {k: open(p, "rb").read() for k, p in paths.items()}


def test_enwik8_byte_split(server, tmp_path):
    splits = _read(_prepare(server, tmp_path, "byte"))
    assert splits == {"train": RAW[:-600], "valid": RAW[-600:-300], "test": RAW[-300:]}
    assert os.path.exists(tmp_path / "enwik8.zip") and server.hits == ["/enwik8.zip"]


def test_enwik8_t2t_split_is_by_characters(server, tmp_path):
    splits = _read(_prepare(server, tmp_path, "t2t"))
    assert splits == {k: v.encode() for k, v in
                      {"train": TEXT[:-600], "valid": TEXT[-600:-300], "test": TEXT[-300:]}.items()}
    assert len(splits["test"]) > HELD  # multi-byte characters: not the byte split
    assert b"".join(splits.values()) == RAW


def test_enwik8_is_idempotent_and_works_offline(server, tmp_path, monkeypatch):
    paths = _prepare(server, tmp_path)
    mtimes = {k: os.stat(p).st_mtime_ns for k, p in paths.items()}
    assert _prepare(server, tmp_path, url=_unreachable_url()) == paths
    assert {k: os.stat(p).st_mtime_ns for k, p in paths.items()} == mtimes
    # the other split is built from the zip already there, without the network
    assert _read(_prepare(server, tmp_path, "t2t", url=_unreachable_url()))["test"] == TEXT[-300:].encode()
    assert server.hits == ["/enwik8.zip"]


def test_enwik8_zip_placed_by_hand_is_used(server, tmp_path):
    (tmp_path / "enwik8.zip").write_bytes(_zip())
    paths = _prepare(server, tmp_path, url=_unreachable_url())
    assert _read(paths)["test"] == RAW[-300:] and server.hits == []


def test_enwik8_wrong_size_zip_by_hand(server, tmp_path):
    (tmp_path / "enwik8.zip").write_bytes(_zip()[:-10])
    with pytest.raises(ValueError, match="enwik8.zip.*bytes, expected.*Delete it"):
        _prepare(server, tmp_path, url=_unreachable_url())


def _damaged_zip():
    """A stored (uncompressed) zip with one byte of the member flipped: only the CRC-32 can tell."""
    z = bytearray(_zip(method=zipfile.ZIP_STORED))
    z[z.index(RAW[:50]) + 100] ^= 0xFF
    return bytes(z)


@pytest.mark.parametrize("zip_bytes, why", [
    (b"this is not a zip file at all" * 10, "not a valid enwik8 zip"),
    (_damaged_zip(), "CRC"),
    (_zip(name="other.txt"), "no file named 'enwik8'"),
    (_zip(member=RAW[:-1]), "bytes, expected"),
], ids=["not-a-zip", "bad-crc", "no-enwik8-member", "short-member"])
def test_enwik8_corrupt_zip_gives_clear_error_and_no_splits(server, tmp_path, zip_bytes, why):
    with pytest.raises(ValueError, match=why) as e:
        _prepare(server, tmp_path, zip_bytes=zip_bytes, member_md5=None)
    assert "enwik8.zip" in str(e.value) and "Delete" in str(e.value)
    assert not os.path.exists(tmp_path / "enwik8_byte")


def test_enwik8_member_md5_mismatch(server, tmp_path):
    with pytest.raises(ValueError, match="wrong MD5"):
        _prepare(server, tmp_path, member_md5="0" * 32)
    assert not os.path.exists(tmp_path / "enwik8_byte")


def test_enwik8_defaults_are_the_published_numbers():
    assert data.ENWIK8_URL == "http://mattmahoney.net/dc/enwik8.zip"
    assert (data.ENWIK8_ZIP_SIZE, data.ENWIK8_SIZE) == (36_445_475, 100_000_000)
    assert data.ENWIK8_MD5 == "a1fa5ffddb56f4953e226637dabbb36a" and data.ENWIK8_HELDOUT == 5_000_000
    with pytest.raises(ValueError, match="split"):
        prepare_enwik8("unused", split="bytes")


# ----------------------------------------------------------------------------- local text file

def test_text_split_90_5_5(tmp_path):
    src = tmp_path / "book.txt"
    raw = os.urandom(2000)
    src.write_bytes(raw)
    paths = prepare_text(str(src), str(tmp_path / "out"), seq_len=16)
    assert _read(paths) == {"train": raw[:1800], "valid": raw[1800:1900], "test": raw[1900:]}
    assert ByteStream(paths["valid"], seq_len=16).batch(2)[0].shape == (2, 16)
    mtimes = [os.stat(p).st_mtime_ns for p in paths.values()]
    assert prepare_text(str(src), str(tmp_path / "out"), seq_len=16) == paths
    assert [os.stat(p).st_mtime_ns for p in paths.values()] == mtimes
    src.write_bytes(raw[::-1] + b"more")  # the file changed: the splits are rebuilt
    assert _read(prepare_text(str(src), str(tmp_path / "out")))["test"] == (raw[::-1] + b"more")[-100:]


def test_text_missing_empty_or_too_short(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.*--data_path"):
        prepare_text(str(tmp_path / "nope.txt"), str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        prepare_text(str(empty), str(tmp_path))
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 339)
    with pytest.raises(ValueError, match=r"short.txt has 339 bytes.*at least 340"):
        prepare_text(str(short), str(tmp_path), seq_len=16)
    assert not any(p.name.startswith("text_") for p in tmp_path.iterdir())
    short.write_bytes(b"x" * 340)
    assert prepare_text(str(short), str(tmp_path), seq_len=16)


def test_prepare_dataset_dispatch(tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(b"y" * 400)
    assert prepare_dataset("text", str(tmp_path), str(src), seq_len=4) == prepare_text(str(src), str(tmp_path))
    with pytest.raises(ValueError, match="--data_path"):
        prepare_dataset("text", str(tmp_path))
    with pytest.raises(ValueError, match="duplication"):
        prepare_dataset("duplication", str(tmp_path))
