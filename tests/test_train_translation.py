"""Tests for translation through train.py: --dataset=reverse and --dataset=parallel train, save a
checkpoint that resumes exactly and that translate.py reads, and bad flags give clear errors.

    python -m pytest tests/test_train_translation.py -q        (about 20 s on two CPU cores)
"""
import dataclasses
import json

import pytest
import torch

import train
import translation.translate as translate
from translation.encdec import EncDecConfig

TINY = ['--device=cpu', '--n_layers=1', '--n_dec_layers=1', '--d_model=16', '--n_heads=2',
        '--d_ff=32', '--batch_size=4', '--warmup=2', '--log_interval=1', '--eval_interval=2',
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
    assert set(m) == {'loss', 'accuracy'} and "valid: loss" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (['--dataset=parallel'], '--dataset=parallel needs --data_path'),
    (['--dataset=reverse', '--seq_len=4'], '--seq_len >= 5'),
    (['--dataset=reverse', '--eval_only', '--eval_split=test'], 'one held-out set'),
    (['--dataset=reverse', '--n_dec_layers=0'], 'n_dec_layers=0'),
    (['--dataset=parallel', '--data_path=/nonexistent.tsv'], 'not found'),
])
def test_bad_translation_flags_give_clear_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv + [f'--out_dir={tmp_path}', '--device=cpu'])
    assert message in str(e.value.code) + capsys.readouterr().err
