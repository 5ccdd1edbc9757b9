"""Tests for translation through train.py: --dataset=reverse and --dataset=parallel train, save a
checkpoint that resumes exactly and that translate.py reads, and bad flags give clear errors. The
bare --dataset=parallel is configs/parallel_small.args; a batch is --max_tokens tokens, and tok/s
counts the real ones; evals score the NLL without label smoothing, ckpt_best.pt follows its
minimum, and --average_last writes the parameter mean of the last evals.

    python -m pytest tests/test_train_translation.py -q        (about 30 s on two CPU cores)
"""
import dataclasses
import json
import math
import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import flags
import train
import translation.translate as translate
import translation.translation_data as td
from translation.encdec import EncDecConfig, ReformerEncDec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--device=cpu', '--n_layers=1', '--n_dec_layers=1', '--d_model=16', '--n_heads=2',
        '--d_ff=32', '--max_tokens=96', '--warmup=2', '--log_interval=1', '--eval_interval=2',
        '--valid_size=6', '--dropout=0.1']


def read_log(path):
    return [json.loads(line) for line in open(path)]


def corpus(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("".join(f"the {w} house {i}\tdas {w} Haus {i}\n" for i in range(12)
                            for w in ("red", "big", "old")), encoding="utf-8")
    return str(path)


def test_translation_flags_are_the_config_fields():
    args = train.parse_args(['--dataset=reverse'])
    for f in dataclasses.fields(EncDecConfig):
        assert hasattr(args, f.name) and f.metadata.get('help'), f.name
    assert train.model_config(args) == EncDecConfig(**{f.name: getattr(args, f.name)
                                                       for f in dataclasses.fields(EncDecConfig)})


def test_reverse_defaults_and_config():
    args = train.parse_args(['--dataset=reverse'])
    config = train.model_config(args)
    assert isinstance(config, EncDecConfig) and config.reversible and config.attn == 'full'
    assert (args.seq_len, args.max_seq_len, config.vocab_size) == (17, 17, 20)
    assert train.parse_args(['--dataset=reverse', '--d_model=32']).d_model == 32
    assert train.parse_args([]).d_model == 64 and train.parse_args([]).n_layers == 2   # the LM


def test_reverse_trains_resumes_exactly_and_reports_exact_match(tmp_path, capsys):
    flags = TINY + ['--dataset=reverse', '--seq_len=8', '--lr_schedule=rsqrt']
    train.main(flags + ['--max_steps=4', f'--out_dir={tmp_path / "whole"}'])
    assert "final held-out exact match:" in capsys.readouterr().out.splitlines()[-1]
    train.main(flags + ['--max_steps=2', f'--out_dir={tmp_path / "split"}'])
    train.main(flags + ['--max_steps=4', '--resume', f'--out_dir={tmp_path / "split"}'])
    losses = lambda d: [(r['step'], r['loss']) for r in read_log(tmp_path / d / 'log.jsonl')
                        if r['kind'] == 'train']
    assert losses('whole') == losses('split') and len(losses('whole')) == 4
    final = [r for r in read_log(tmp_path / 'whole' / 'log.jsonl') if r['kind'] == 'final']
    assert len(final) == 1 and 0 <= final[0]['exact_match'] <= 1
    a = torch.load(tmp_path / 'whole' / 'ckpt.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=False)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_parallel_corpus_trains_and_translate_reads_the_checkpoint(tmp_path, capsys):
    out = tmp_path / 'out'
    flags = TINY + ['--dataset=parallel', f'--data_path={corpus(tmp_path)}', '--heldout=4',
                    f'--data_dir={tmp_path}', '--tokenizer=bytes', '--seq_len=24',
                    '--max_steps=3', f'--out_dir={out}']
    last = train.main(flags)
    printed = capsys.readouterr().out
    assert "final valid sacreBLEU (greedy, first 6 pairs)" in printed
    assert 'valid_bleu_greedy' in last and 0 <= last['accuracy'] <= 1
    assert "vocab 259" in printed
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ckpt['data']['tokenizer'] == {'kind': 'bytes'}
    result = translate.main([f'--out_dir={out}', '--eval', '--beam_size=2'])
    assert result['n_sentences'] == 4 and result['step'] == 3
    with pytest.raises(SystemExit, match="vocab_size"):   # resume with another tokenizer
        train.main(flags[:-2] + ['--tokenizer=sentencepiece', '--vocab_size=400',
                                 '--max_steps=4', f'--out_dir={out}', '--resume'])


def test_eval_only_on_a_translation_checkpoint(tmp_path, capsys):
    out = tmp_path / 'out'
    flags = TINY + ['--dataset=reverse', '--seq_len=8', f'--out_dir={out}']
    train.main(flags + ['--max_steps=2'])
    capsys.readouterr()
    m = train.main(flags + ['--eval_only'])
    assert set(m) == {'loss', 'nll', 'ppl', 'accuracy'} and "valid: loss" in capsys.readouterr().out
    # --eval_checkpoint=best scores ckpt_best.pt: other weights, so another loss
    best = torch.load(out / 'ckpt_best.pt', weights_only=False)
    best['model'] = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in best['model'].items()}
    torch.save(best, out / 'ckpt_best.pt')
    b = train.main(flags + ['--eval_only', '--eval_checkpoint=best'])
    assert "ckpt_best.pt at step" in capsys.readouterr().out and b['loss'] != m['loss']
    with pytest.raises(SystemExit):
        train.main(flags + ['--eval_checkpoint=best'])


@pytest.mark.parametrize("argv, message", [
    (['--dataset=parallel'], '--dataset=parallel needs --data_path'),
    (['--dataset=reverse', '--seq_len=4'], '--seq_len >= 5'),
    (['--dataset=reverse', '--eval_only', '--eval_split=test'], 'one held-out set'),
    (['--dataset=reverse', '--n_dec_layers=0'], 'n_dec_layers=0'),
    (['--dataset=parallel', '--data_path=/nonexistent.tsv'], 'not found'),
    (['--dataset=parallel', '--data_path=x.tsv', '--batch_size=32'],
     '--batch_size=32 counts sequences, a language model\'s batch; a translation batch is '
     'counted in tokens: give --max_tokens'),
    (['--dataset=reverse', '--max_tokens=16'], 'fewer than one pair of --seq_len=17'),
    (['--dataset=reverse', '--max_tokens=0'], '--max_tokens must be >= 1'),
    (['--max_tokens=4096'], '--dataset=duplication trains a language model'),
    (['--dataset=reverse', '--average_last=-1'], '--average_last >= 0'),
])
def test_bad_translation_flags_give_clear_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv + [f'--out_dir={tmp_path}', '--device=cpu'])
    assert message in str(e.value.code) + capsys.readouterr().err


# ----------------------------------------------------------------------------- the bare command

def test_bare_parallel_is_the_small_corpus_recipe_and_help_names_it():
    bare = vars(train.parse_args(['--dataset=parallel', '--data_path=x.tsv']))
    path = os.path.join(ROOT, flags.SMALL_CORPUS_ARGS)
    assert vars(train.parse_args([f'@{path}', '--data_path=x.tsv'])) == bare
    config = train.model_config(train.parse_args(['--dataset=parallel', '--data_path=x.tsv']))
    assert (config.n_layers, config.n_dec_layers, config.d_model, config.vocab_size) == (
        3, 3, 256, 8000)
    assert (bare['max_tokens'], bare['batch_size'], bare['max_steps']) == (4096, None, 1200)
    assert flags.SMALL_CORPUS_ARGS in ' '.join(flags.build_parser().format_help().split())
    wmt = vars(train.parse_args([f'@{ROOT}/configs/wmt14_reversible_base.args']))
    assert (wmt['max_tokens'], wmt['batch_size']) == (128 * 256, None)


class FixedStream:
    def __init__(self, batch):
        self.batch_ = batch

    def batch(self, n, device):
        return self.batch_


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_tok_s_counts_real_source_and_target_tokens(grad_accum):
    """forward_backward returns the step's tokens as the family counts them: for translation
    the source and target tokens that are not padding, not the padded budget."""
    ex, _ = td.encode_pairs([("a b", "x"), ("a b c d e", "x y z")], td.TranslationByteTokenizer(),
                            24)
    batch = td.collate(ex)                                       # padded: 2 x 10 src, 2 x 6 tgt
    real = sum(len(s) + len(t) for s, t in ex)                   # 4 + 2 + 10 + 6
    model = ReformerEncDec(EncDecConfig(vocab_size=259, n_layers=1, n_dec_layers=1, d_model=16,
                                        n_heads=2, d_ff=32))
    args = train.parse_args(['--dataset=reverse', f'--grad_accum={grad_accum}'])
    run = train.Run(False, 0, 0, 1, 'cpu', args.max_tokens // grad_accum)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    _, tokens = train.forward_backward(model, FixedStream(batch), scaler, nullcontext(), args, run,
                                       train.TRANSLATION.count_tokens)
    assert tokens == grad_accum * real == grad_accum * 22 and batch[0].numel() == 20
    assert train.TRANSLATION.tokens_name == 'real_src_tgt_tokens_per_s'
    assert train.LANGUAGE_MODEL.count_tokens((torch.zeros(3, 5), None)) == 15


def test_parallel_logs_real_token_rate_and_the_token_budget(tmp_path, capsys):
    out = tmp_path / 'out'
    train.main(TINY + ['--dataset=parallel', f'--data_path={corpus(tmp_path)}', '--heldout=4',
                       f'--data_dir={tmp_path}', '--tokenizer=bytes', '--seq_len=24',
                       '--max_steps=2', f'--out_dir={out}'])
    assert "tokens per step: at most 96 padded (B x max(S, T))" in capsys.readouterr().out
    rows = [r for r in read_log(out / 'log.jsonl') if r['kind'] == 'train']
    assert all(r['real_src_tgt_tokens_per_s'] > 0 and 'tokens_per_s' not in r for r in rows)


# ----------------------------------------------------------------------------- best and averaged

def test_eval_scores_the_nll_without_label_smoothing():
    ex, _ = td.encode_pairs([("a b", "x"), ("a b c d e", "x y z")], td.TranslationByteTokenizer(),
                            24)
    src, tgt_in, y = td.collate(ex)
    for ff_chunks in (1, 2):   # 2: the loss in chunks, without logits
        torch.manual_seed(0)
        model = ReformerEncDec(EncDecConfig(vocab_size=259, n_layers=1, n_dec_layers=1,
                                            d_model=16, n_heads=2, d_ff=32, ff_chunks=ff_chunks,
                                            label_smoothing=0.1))
        nats, nll, correct, count = train.evaluate(model, [(src, tgt_in, y)], 'cpu',
                                                   nullcontext(), 0, accuracy=True)
        logits = model.eval()(src, tgt_in)[0]
        assert count == 8                                        # 1 + 5 bytes, 2 EOS
        assert nll == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                    reduction='sum').item(), rel=1e-6)
        assert nats == pytest.approx(8 * F.cross_entropy(
            logits.flatten(0, 1), y.flatten(), label_smoothing=0.1).item(), rel=1e-6)
        assert abs(nats - nll) > 1e-2   # not the same number: the smoothed loss is not an NLL
        m = td.translation_metrics(None, nats, nll, correct, count)
        assert m['nll'] == nll / 8 and m['ppl'] == math.exp(nll / 8)
    model.config.label_smoothing = 0.0
    nats, nll, _, _ = train.evaluate(model, [(src, tgt_in, y)], 'cpu', nullcontext(), 0, True)
    assert nll == nats


def parallel_flags(tmp_path, out, *extra):
    return TINY + ['--dataset=parallel', f'--data_path={corpus(tmp_path)}', '--heldout=4',
                   f'--data_dir={tmp_path}', '--tokenizer=bytes', '--seq_len=24',
                   '--label_smoothing=0.1', f'--out_dir={out}', *extra]


def test_best_checkpoint_follows_the_unsmoothed_nll(tmp_path, monkeypatch):
    """The scripted evals put the smoothed loss's minimum at step 6 (also the last step) and the
    NLL's at step 4: ckpt_best.pt is step 4's weights."""
    script = iter([(3.0, 2.5), (2.9, 1.8), (2.0, 2.2)])   # (loss, nll) at steps 2, 4, 6

    def validate(*a):
        loss, nll = next(script)
        return {'loss': loss, 'nll': nll, 'ppl': math.exp(nll), 'accuracy': 0.5}
    monkeypatch.setattr(train, 'validate', validate)
    out = tmp_path / 'out'
    train.main(parallel_flags(tmp_path, out, '--max_steps=6', '--average_last=3'))
    best = torch.load(out / 'ckpt_best.pt', weights_only=False)
    at_4 = torch.load(out / 'ckpt_eval_4.pt', weights_only=False)
    assert best['step'] == 4 and best['valid']['nll'] == 1.8
    assert all(torch.equal(best['model'][k], at_4['model'][k]) for k in best['model'])
    assert best['data']['tokenizer'] == {'kind': 'bytes'}   # what translate.py needs


def test_average_last_keeps_n_evals_and_writes_their_mean(tmp_path, capsys):
    out = tmp_path / 'out'
    train.main(parallel_flags(tmp_path, out, '--max_steps=6', '--average_last=2'))
    assert "ckpt_avg.pt: the parameter mean of the evals at steps [4, 6]" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob('ckpt_eval_*.pt')) == ['ckpt_eval_4.pt',
                                                                 'ckpt_eval_6.pt']
    a, b, avg = (torch.load(out / f, weights_only=False) for f in
                 ('ckpt_eval_4.pt', 'ckpt_eval_6.pt', 'ckpt_avg.pt'))
    assert avg['averaged_steps'] == [4, 6] and avg['step'] == 6
    for k in avg['model']:
        assert torch.equal(avg['model'][k], (a['model'][k] + b['model'][k]) / 2), k
    assert not torch.equal(a['model']['lm_head.weight'], b['model']['lm_head.weight'])
    result = translate.main([f'--out_dir={out}', '--eval', '--beam_size=1', '--checkpoint=avg'])
    assert result['checkpoint'] == str(out / 'ckpt_avg.pt') and result['averaged_steps'] == [4, 6]


def test_resume_reproduces_the_best_kept_and_averaged_checkpoints(tmp_path):
    whole, split = tmp_path / 'whole', tmp_path / 'split'
    train.main(parallel_flags(tmp_path, whole, '--max_steps=8', '--average_last=2'))
    train.main(parallel_flags(tmp_path, split, '--max_steps=5', '--average_last=2'))
    train.main(parallel_flags(tmp_path, split, '--max_steps=8', '--average_last=2', '--resume'))
    names = sorted(p.name for p in whole.glob('ckpt*.pt'))
    assert names == sorted(p.name for p in split.glob('ckpt*.pt'))
    assert {'ckpt_best.pt', 'ckpt_avg.pt', 'ckpt_eval_6.pt', 'ckpt_eval_8.pt'} <= set(names)
    for name in names:
        a = torch.load(whole / name, weights_only=False)
        b = torch.load(split / name, weights_only=False)
        assert a['step'] == b['step'], name
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model']), name
