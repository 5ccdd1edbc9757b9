"""Tests for sample.py: a briefly trained checkpoint (duplication and text) samples reproducibly
from --seed, with the trained or another attention; the bad inputs give clear errors or notes.

    python -m pytest tests/test_sample.py        # a few seconds
"""
import pytest

import sample
import train

TINY = ['--device=cpu', '--seq_len=32', '--n_layers=1', '--d_model=16', '--n_heads=2', '--d_ff=32',
        '--bucket_size=4', '--n_hashes=2', '--batch_size=4', '--valid_size=8', '--max_steps=2',
        '--eval_interval=2', '--eval_iters=1']


@pytest.fixture(scope='module')
def dup(tmp_path_factory):
    out = tmp_path_factory.mktemp('dup')
    train.main(TINY + ['--vocab_size=8', f'--out_dir={out}'])
    return str(out)


@pytest.fixture(scope='module')
def text(tmp_path_factory):
    out = tmp_path_factory.mktemp('text')
    (out / 'input.txt').write_text('to be or not to be, that is the question. ' * 40)
    train.main(TINY + ['--dataset=text', f'--data_path={out / "input.txt"}', f'--data_dir={out}',
                       f'--out_dir={out}'])
    return str(out)


def test_duplication_samples_are_reproducible_and_show_the_copy(dup, capsys):
    a = sample.main([f'--out_dir={dup}', '--seed=3'])
    out = capsys.readouterr().out
    assert a == sample.main([f'--out_dir={dup}', '--seed=3'])
    assert len(a) == 2 and all(len(c) == 15 for c in a)    # |w| = T/2 - 1 symbols each
    assert out.count('w:') == 2 and out.count('copy:') == 2 and 'symbols copied right' in out
    given = sample.main([f'--out_dir={dup}', '--start=1 2 3', '--attn=full', '--num_samples=1'])
    assert len(given[0]) == 3 and all(0 <= s < 8 for s in given[0])


def test_text_samples_are_reproducible(text, capsys):
    flags = [f'--out_dir={text}', '--start=to be', '--max_new_tokens=20', '--top_k=5']
    a = sample.main(flags)
    assert a == sample.main(flags) and all(s.startswith('to be') for s in a)
    assert a != sample.main(flags + ['--seed=2'])   # 2 x 20 bytes from 5 choices: never equal
    assert sample.main(flags + ['--n_hashes=4', '--num_samples=1'])


def test_a_start_longer_than_max_seq_len_keeps_the_last_tokens(text, capsys):
    sample.main([f'--out_dir={text}', '--start=' + 'x' * 100, '--max_new_tokens=3'])
    assert 'the model sees only the last 32' in capsys.readouterr().out


@pytest.mark.parametrize('flags, message', [
    (['--out_dir=/nonexistent'], 'no checkpoint at /nonexistent/ckpt.pt'),
    (['--attn=bogus'], "attn='bogus'.*is not one of"),
    (['--start=a b'], 'takes symbol ids'),
    (['--start=0 9'], 'need symbols in 1..7'),
])
def test_bad_inputs(dup, flags, message):
    with pytest.raises(SystemExit, match=message):
        sample.main([f'--out_dir={dup}', *flags])
