"""What researchers expect around the scripts (issue 13): a clone that tests itself, trackers and config.json,
progress bars fit for log files, --help that shows every flag and the per-preset defaults, installable requirements."""
import ast
import json
import re
import subprocess

import pytest

import data
import evaluate
import models
import sample
import train_disc_probe
import train_injector as ti
from conftest import FAST, FIXTURES, REPO

SCRIPTS = {'train_injector.py': ti, 'sample.py': sample, 'evaluate.py': evaluate, 'train_disc_probe.py': train_disc_probe}


# ----------------------------------------------------------------------------- a clone passes its own tests

def test_fixtures_are_part_of_the_repository():
    assert FIXTURES == REPO / 'tests' / 'fixtures' and FIXTURES.is_dir()
    needed = ['var_tiny_parity.pt', 'var_state_manifest.json', 'weight_rule.py', 'fid_inception_parity.pt',
              'fid_inception_state_dict_manifest.json', 'weight_rule_inception.py', 'frechet_reference.pt', 'README.md']
    assert all((FIXTURES / f).is_file() for f in needed)
    readme = (FIXTURES / 'README.md').read_text()
    assert all(f in readme for f in needed[:-1])  # says how each file was made
    ignored = subprocess.run(['git', 'check-ignore', *needed], cwd=FIXTURES, capture_output=True, text=True)
    assert ignored.stdout == ''  # none of them is kept out of a commit by .gitignore
    sources = '\n'.join(p.read_text() for p in (REPO / 'tests').glob('*.py') if p.name != 'test_ecosystem.py')
    assert "'shared'" not in sources and '../shared' not in sources


def test_ci_tests_a_clone_with_nothing_beside_it():
    ci = (REPO / '.ci' / 'run').read_text()
    assert 'git clone' in ci and 'mktemp -d' in ci and '../shared' in ci
    assert 'pip install -q -r requirements.txt -c constraints.txt' in ci
    assert 'HF_HUB_OFFLINE=1 python -m pytest -q tests' in ci  # the README's test command
    assert 'HF_HUB_OFFLINE=1 python -m pytest -q tests' in (REPO / 'README.md').read_text()


def test_requirements_leave_torch_alone_and_constraints_pin_ci():
    req = (REPO / 'requirements.txt').read_text()
    assert re.search(r'^torch>=2\.3\s*$', req, re.M) and re.search(r'^torchvision>=0\.18\s*$', req, re.M)
    assert not re.search(r'^torch(vision)?==', req, re.M)
    pins = dict(line.split('==') for line in (REPO / 'constraints.txt').read_text().splitlines()
                if line and not line.startswith('#'))
    assert pins['torch'] == '2.14.1' and pins['torchvision'] == '0.29.1'  # the builds CI machines can install
    assert set(pins) <= {re.split(r'[<>=~ #]', l)[0] for l in req.splitlines() if l and not l.startswith('#')}


# ----------------------------------------------------------------------------- logging: config.json, trackers

@pytest.fixture(scope='module')
def instrumented_run(tmp_path_factory):
    """One 2-step run with --report_to tensorboard, recording the progress bars it makes."""
    out = tmp_path_factory.mktemp('tb')
    bars = []
    progress = data.progress

    def spy(*a, **kw):
        bar = progress(*a, **kw)
        bars.append(bar)
        return bar
    data.progress = spy
    try:
        ti.main(FAST + ['--max_steps', '2', '--out_dir', str(out), '--report_to', 'tensorboard'])
    finally:
        data.progress = progress
    return out, bars


def test_config_json_holds_the_resolved_settings(instrumented_run, tmp_path):
    out, _ = instrumented_run
    config = json.loads((out / 'config.json').read_text())
    tiny = models.PRESETS['tiny']
    assert config['lr_g'] == tiny['lr_g'] and config['lr_d'] == tiny['lr_d']  # resolved, not None
    assert config['global_batch_size'] == 4 and config['world'] == 1 and config['total_steps'] == 2
    assert config['report_to'] == 'tensorboard' and config['mixed_precision_used'] == 'no'
    assert not list(out.glob('.config.json.tmp*'))  # written through a temporary file
    # --report_to none (the default): config.json and log.jsonl, no tracker folder
    ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path)])
    assert json.loads((tmp_path / 'config.json').read_text())['report_to'] == 'none'
    assert not (tmp_path / ti.TRACKER_PROJECT).exists()
    assert len((tmp_path / 'log.jsonl').read_text().splitlines()) == 1


def test_tensorboard_gets_every_step(instrumented_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = instrumented_run
    events = EventAccumulator(str(out / ti.TRACKER_PROJECT))
    events.Reload()
    log = [json.loads(l) for l in (out / 'log.jsonl').read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars('loss_D')] == [(r['step'], pytest.approx(r['loss_D'])) for r in log]
    assert 'g_norm_per_scale_4' in events.Tags()['scalars']
    hparams = list((out / ti.TRACKER_PROJECT).glob('*/hparams.yml'))
    assert hparams and 'lr_g' in hparams[0].read_text()


def test_missing_tracker_package_is_one_line(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, '__import__',
                        lambda name, *a, **kw: (_ for _ in ()).throw(ImportError(name)) if name == 'wandb' else real_import(name, *a, **kw))
    with pytest.raises(SystemExit, match='pip install wandb'):
        ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path), '--report_to', 'wandb'])


# ----------------------------------------------------------------------------- progress bars

def test_progress_bars_update_rarely_when_not_a_terminal(instrumented_run):
    _, bars = instrumented_run
    assert bars and all(b.mininterval == data.PROGRESS_MININTERVAL_PIPE == 30 for b in bars)  # pytest captures: no tty

    class Tty:
        def isatty(self):
            return True
    assert data.progress_mininterval(Tty()) == 0.1


def test_a_log_file_gets_a_few_bar_lines_not_one_per_step(tmp_path, capsys):
    """set_postfix refreshes the bar by default, past mininterval: the first version wrote a line every step."""
    ti.main(FAST + ['--max_steps', '6', '--context', 'teacher', '--out_dir', str(tmp_path)])
    assert capsys.readouterr().err.count('AID-VAR:') <= 3  # the opening line, the closing one (and one 30 s tick)


@pytest.mark.parametrize('script', [*SCRIPTS, 'pretrain_tiny.py'])
def test_every_bar_goes_through_data_progress(script):
    """No script builds a tqdm bar of its own: data.progress sets the interval (30 s into a log, 0.1 s on a tty)."""
    tree = ast.parse((REPO / script).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'tqdm']
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == 'tqdm']


# ----------------------------------------------------------------------------- --help

@pytest.mark.parametrize('script', SCRIPTS)
def test_every_flag_has_a_help_text(script):
    parser = SCRIPTS[script].p
    missing = [a.option_strings or a.dest for a in parser._actions if not (a.help or '').strip()]
    assert not missing, missing


# the per-preset defaults of train_injector.py, written out (real models, tiny preset) as --help prints them
HELP_DEFAULTS = dict(lr_g=('1e-06', '0.001'), lr_d=('1e-06', '0.002'), global_batch_size=('256', '16'),
                     w_train=('0.001', '0.1'), r1_gamma=('0.2', '0.0'), top_k=('900', '0'),
                     max_steps=('not set', '150'), epochs=('2', 'not set'))


def test_help_shows_the_per_preset_defaults():
    text = ' '.join(ti.p.format_help().split())
    for key, (real, tiny) in HELP_DEFAULTS.items():
        # the option's own entry (the usage line has '[--key KEY]'), then the first default note after it
        start = text.index(f'--{key} {key.upper()} ')
        got = re.search(r'\(default: real models [^)]*\)', text[start:]).group(0)
        assert got == f'(default: real models {real}, tiny preset {tiny})', (key, got)
        # and the values the presets apply are the ones the help announces
        for preset, shown in (('real', real), ('tiny', tiny)):
            value = models.PRESETS[preset][key]
            assert (value is None) if shown == 'not set' else (value == float(shown)), (key, preset, value)
    text = ' '.join(sample.p.format_help().split())
    assert '50 (real models' in text and '10 (tiny)' in text and '900 (real models)' in text
    text = ' '.join(train_disc_probe.p.format_help().split())
    assert '(default: real models 900, tiny preset 0)' in text
