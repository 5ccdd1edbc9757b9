"""Tests for translate.py: the BLEU pipeline (tokenise, detokenise, sacreBLEU against raw
references) gives sacreBLEU's own scores; the teacher-forced accuracy; translating a file and
--eval from a checkpoint, end to end on a tiny model; ckpt_best.pt unless --checkpoint says
otherwise, and the file used printed.

    python -m pytest tests/test_translate.py -q        (a few seconds)
"""
import json

import pytest
import sacrebleu
import torch

import translation.translate as translate
import translation.translation_data as td
from data import masked_accuracy
from translation.encdec import EOS, EncDecConfig, ReformerEncDec

REFS = ["The cat sat on a mat.", "Das ist ein kleines Haus, nicht wahr?", "Zwei Wörter."]
HYPS = ["The cat sat on the mat.", "Das ist ein kleines Haus?", "Zwei Wörter."]


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_bleu_pipeline_gives_sacrebleus_own_score(tmp_path, kind):
    pairs = [(h, r) for h, r in zip(HYPS, REFS)] * 20
    tok = td.build_tokenizer(kind, pairs, str(tmp_path), "toy", vocab_size=400)
    detok = [tok.decode(tok.encode(h) + [2]) for h in HYPS]          # through token ids
    assert detok == HYPS
    got = translate.sacrebleu_scores(detok, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    # known strings, numbers printed by sacreBLEU 2.x (`sacrebleu ref.txt < hyp.txt`)
    one = translate.sacrebleu_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert round(one["bleu"], 2) == 53.73 and round(one["chrf"], 2) == 72.08
    assert translate.sacrebleu_scores(REFS, REFS)["bleu"] == pytest.approx(100.0)


def tiny_model(vocab_size):
    torch.manual_seed(0)
    return ReformerEncDec(EncDecConfig(vocab_size=vocab_size, max_seq_len=64, n_layers=1,
                                       n_dec_layers=1, d_model=16, n_heads=2, d_ff=32))


def test_teacher_forced_accuracy_is_masked_argmax_accuracy():
    tok = td.TranslationByteTokenizer()
    examples, _ = td.encode_pairs(list(zip(HYPS, REFS)), tok, 64)
    model = tiny_model(tok.vocab_size)
    src, tgt_in, targets = td.collate(examples)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):                     # a few steps, so that some predictions are right
        opt.zero_grad()
        model(src, tgt_in, targets)[1].backward()
        opt.step()
    model.eval()
    correct, count = translate.teacher_forced_accuracy(model, examples, max_tokens=60)
    assert (correct, count) == masked_accuracy(model(src, tgt_in)[0], targets)
    assert count == sum(len(t) for _, t in examples) and correct > 0


def test_translate_file_and_eval_from_a_checkpoint(tmp_path, capsys):
    corpus = tmp_path / "c.tsv"
    corpus.write_text("".join(f"{s} {i}\t{t} {i}\n" for i in range(10)
                              for s, t in zip(HYPS, REFS)), encoding="utf-8")
    tok = td.TranslationByteTokenizer()
    model = tiny_model(tok.vocab_size)
    out = tmp_path / "run"
    out.mkdir()
    args = dict(dataset="parallel", data_dir=str(tmp_path), data_path=str(corpus), heldout=4,
                seed=0)
    torch.save({"model_args": model.config_dict(), "model": model.state_dict(), "step": 7,
                "data": {"tokenizer": tok.state()}, "args": args}, out / "ckpt.pt")
    src = tmp_path / "in.txt"
    src.write_text("Hello there.\n\nZwei.\n", encoding="utf-8")
    translate.main([f"--out_dir={out}", f"--input={src}", "--beam_size=2"])
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[-1] == ""        # one output line per input line
    want = translate.translate(model, tok, ["Hello there.", "", "Zwei."], beam_size=2)
    assert lines[:3] == want

    result = translate.main([f"--out_dir={out}", "--eval", "--beam_size=1"])
    printed = capsys.readouterr().out
    assert "signature: nrefs:1|case:mixed" in printed and "teacher-forced token accuracy" in printed
    assert result["n_sentences"] == 4 and 0 <= result["bleu"] <= 100
    assert json.load(open(out / "eval_test.json"))["step"] == 7


@pytest.mark.parametrize("beam_size", [1, 3])
def test_min_len_reaches_every_hypothesis(beam_size):
    """translate_examples passes min_len to the decoder: no hypothesis is shorter."""
    tok = td.TranslationByteTokenizer()
    examples, _ = td.encode_pairs(list(zip(HYPS, REFS)), tok, 64)
    model = tiny_model(tok.vocab_size).eval()
    with torch.no_grad():   # EOS is the argmax everywhere: the final LayerNorm outputs its
        model.ln_f.weight.zero_()          # bias (ones), and only EOS's output row is not zero
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOS] = 1.0
    for min_len in (0, 7):
        hyps = translate.translate_examples(model, examples, beam_size=beam_size,
                                            min_len=min_len)
        assert [len(h) for h in hyps] == [min_len] * len(hyps)


def save_weights(model, path, step, **extra):
    torch.save({"model_args": model.config_dict(), "model": model.state_dict(), "step": step,
                "data": {"tokenizer": td.TranslationByteTokenizer().state()}, **extra}, path)


def test_best_checkpoint_unless_told_otherwise_and_says_which(tmp_path, capsys):
    tok = td.TranslationByteTokenizer()
    last, best = tiny_model(tok.vocab_size), tiny_model(tok.vocab_size)
    torch.manual_seed(1)
    best.load_state_dict({k: torch.randn_like(v) for k, v in best.state_dict().items()})
    save_weights(last, tmp_path / "ckpt.pt", 9)
    save_weights(best, tmp_path / "ckpt_best.pt", 6, valid={"loss": 3.0, "nll": 2.5})
    save_weights(last, tmp_path / "other.pt", 3)
    for choice, want, step, said in [
            (None, best, 6, "ckpt_best.pt: step 6, valid nll 2.5000"),   # the default
            ("best", best, 6, "ckpt_best.pt: step 6"),
            ("last", last, 9, "ckpt.pt: step 9"),
            (str(tmp_path / "other.pt"), last, 3, "other.pt: step 3")]:
        flag = [f"--checkpoint={choice}"] if choice else []
        model, _, ckpt = translate.load(str(tmp_path), checkpoint=choice or "best")
        assert ckpt["step"] == step
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in model.state_dict().items())
        assert f"using {tmp_path}" in capsys.readouterr().err
        src = tmp_path / "in.txt"
        src.write_text("Zwei.\n", encoding="utf-8")
        translate.main([f"--out_dir={tmp_path}", f"--input={src}", "--beam_size=1", *flag])
        printed = capsys.readouterr()
        assert said in printed.err and printed.out == translate.translate(
            want.eval(), tok, ["Zwei."], beam_size=1)[0] + "\n"
    (tmp_path / "ckpt_best.pt").unlink()   # a run from before ckpt_best.pt: the last, said so
    translate.load(str(tmp_path))
    assert f"has no ckpt_best.pt; using {tmp_path / 'ckpt.pt'}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--average_last=N writes it"):
        translate.load(str(tmp_path), checkpoint="avg")
    with pytest.raises(FileNotFoundError, match="--checkpoint is best, last, avg or the path"):
        translate.load(str(tmp_path), checkpoint="bset")


def test_missing_or_wrong_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        translate.load(str(tmp_path))
    torch.save({"model_args": {}, "model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a checkpoint of a translation corpus"):
        translate.load(str(tmp_path))


def test_exact_match_counts_whole_sequences(monkeypatch):
    task = td.ReverseTask(vocab_size=20, min_len=2, max_len=5)
    held = task.heldout_set(6)
    answers = [t.tolist()[:-1] for _, t in held]            # the targets without EOS
    monkeypatch.setattr(translate, "translate_examples", lambda *a, **k: answers)
    assert translate.exact_match(None, held) == 1.0
    answers[2] = answers[2][:-1]                            # one token short
    answers[4] = answers[4] + [5]                           # one token long
    assert translate.exact_match(None, held) == pytest.approx(4 / 6)
