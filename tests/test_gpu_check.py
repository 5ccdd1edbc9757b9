"""gpu_check.py's own pieces on the CPU (the whole script is rehearsed with
`python -m experiments.gpu_check --device cpu --tiny`): the longest-length search stops at its
limit or at the first failure, and the archive collect() writes holds every step's output.

    python -m pytest tests/test_gpu_check.py
"""
import json
import tarfile

import experiments.gpu_check as gpu_check


def test_longest_doubles_until_the_limit():
    out = gpu_check.longest("cpu", "float32", 64, 256, layers=2)
    assert [r["length"] for r in out["rows"]] == [64, 128, 256]
    assert out["longest"] == 256 and out["reached_limit"]
    assert all(r["seconds"] > 0 and "error" not in r for r in out["rows"])


def test_longest_stops_at_the_first_failure(monkeypatch):
    import bench
    real = bench.lm_step

    def fails_beyond_128(spec, adamw=False):
        if spec["length"] > 128:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(spec, adamw)

    monkeypatch.setattr(bench, "lm_step", fails_beyond_128)
    out = gpu_check.longest("cpu", "float32", 64, 1024, layers=2)
    assert [r["length"] for r in out["rows"]] == [64, 128, 256]
    assert out["longest"] == 128 and not out["reached_limit"]
    assert "out of memory" in out["rows"][-1]["error"]


def test_collect_brings_back_the_json_and_one_archive(tmp_path):
    work, final = tmp_path / "work", tmp_path / "out"
    (work / "train").mkdir(parents=True)
    for name in ("summary.json", "speed.json", "speed.log"):
        (work / name).write_text(json.dumps({"name": name}))
    (work / "train" / "ckpt.pt").write_bytes(b"x" * 100)
    (work / "train" / "log.jsonl").write_text("{}\n")
    gpu_check.collect(str(work), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["gpu_check.tar.gz", "speed.json",
                                                       "summary.json"]
    names = tarfile.open(final / "gpu_check.tar.gz").getnames()
    assert "speed.log" in names and "train-log.jsonl" in names and "train" not in names


def test_read_longest_keeps_the_rows_of_a_search_cut_short(tmp_path):
    """A search killed at its time limit printed rows but no summary: the rows still count."""
    log = tmp_path / "longest.log"
    log.write_text('{"length": 65536, "seconds": 3.1}\nsome warning\n{"length": 131072, '
                   '"seconds": 7.9}\n')
    out = gpu_check.read_longest(str(log))
    assert out["longest"] == 131072 and len(out["rows"]) == 2 and out["reached_limit"]
