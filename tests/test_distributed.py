"""train_injector.py on several GPUs / nodes (issue 13): per-rank loader seeds, one --resume decision for all ranks,
downloads once, accelerate's mixed-precision settings honoured, no fp16 without loss scaling."""
from pathlib import Path

import pytest
import torch

import data
import train_injector as ti
from conftest import FAST


class CropLike(torch.utils.data.Dataset):
    """Stands in for ImageFolder + RandomCrop: the 'crop offset' comes from torch's global RNG, as torchvision's does."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        return torch.randint(0, 10 ** 9, (1,)), i


def _batches(rank, start=0, num_workers=0, world=2, epoch=0):
    torch.manual_seed(0)  # what main() leaves behind on every rank (build_everything seeds the global RNG)
    return [(off.flatten().tolist(), idx.tolist())
            for off, idx in data.epoch_batches(CropLike(), epoch, start, 4, rank, world, seed=0, num_workers=num_workers)]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_ranks_get_different_random_crops(num_workers):
    b0, b1 = _batches(0, num_workers=num_workers), _batches(1, num_workers=num_workers)
    assert b0[0][1] != b1[0][1]  # different images (the sharded permutation)
    offsets0 = {o for off, _ in b0 for o in off}
    offsets1 = {o for off, _ in b1 for o in off}
    assert not offsets0 & offsets1  # and independent crops: no rank repeats another's random stream


@pytest.mark.parametrize('num_workers', [0, 2])
def test_mid_epoch_resume_sees_the_same_crops(num_workers):
    full = _batches(1, num_workers=num_workers)
    torch.manual_seed(123)  # a resumed process has another global RNG state
    resumed = [(off.flatten().tolist(), idx.tolist())
               for off, idx in data.epoch_batches(CropLike(), 0, 2, 4, 1, 2, seed=0, num_workers=num_workers)]
    assert resumed == full[2:]
    assert _batches(1, num_workers=num_workers, epoch=1) != full  # a new epoch, new crops


def test_the_loader_does_not_touch_the_global_rng():
    torch.manual_seed(7)
    list(data.epoch_batches(CropLike(), 0, 0, 4, 0, 2, seed=0, num_workers=0))
    after = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1))


class StubAcc:
    """What load_resume needs of an Accelerator, as seen by one rank of a 2-process run."""

    def __init__(self, rank, main_decision, seen_by_rank):
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
        self.main_decision, self.seen_by_rank = main_decision, seen_by_rank


@pytest.fixture
def two_ranks(monkeypatch):
    """broadcast_object_list / gather_object of a 2-process run: rank 0's decision reaches everyone."""
    state = {}

    def broadcast(box, from_process=0):
        box[0] = state['acc'].main_decision if not state['acc'].is_main_process else box[0]

    def gather(obj):
        return [(r, ok) for r, ok in state['acc'].seen_by_rank.items()]
    monkeypatch.setattr(ti, 'broadcast_object_list', broadcast)
    monkeypatch.setattr(ti, 'gather_object', gather)
    return state


def test_resume_auto_follows_the_main_process(tmp_path, two_ranks):
    """Rank 1's own out_dir has no last.pt (another node's disk): it still resumes what rank 0 found, and when it
    cannot see that file every rank stops with one message (instead of rank 1 starting at step 0 and hanging)."""
    nfs = tmp_path / 'nfs'
    nfs.mkdir()
    (nfs / 'last.pt').write_bytes(b'x')
    args, _ = ti.resolve_args(FAST + ['--resume', 'auto', '--out_dir', str(tmp_path / 'local_to_rank1')])
    two_ranks['acc'] = StubAcc(1, (None, str(nfs / 'last.pt')), {0: True, 1: True})
    with pytest.raises(SystemExit) as e:  # rank 1 reads rank 0's file (here not a real checkpoint: it says so)
        ti.load_resume(args, Path(args.out_dir), two_ranks['acc'])
    assert f'{nfs / "last.pt"} (1 bytes) is not a readable checkpoint' in str(e.value)
    two_ranks['acc'] = StubAcc(1, (None, str(tmp_path / 'node0_only' / 'last.pt')), {0: True, 1: False})
    with pytest.raises(SystemExit, match=r'rank\(s\) \[1\] cannot see'):
        ti.load_resume(args, Path(args.out_dir), two_ranks['acc'])
    # the main process refuses (an earlier run without --resume): every rank gets the same message
    two_ranks['acc'] = StubAcc(1, ('[AID-VAR] X already holds a run; continue it with --resume auto', None), {})
    with pytest.raises(SystemExit, match='--resume auto'):
        ti.load_resume(ti.resolve_args(FAST)[0], Path(args.out_dir), two_ranks['acc'])


def test_resume_decision_on_the_main_process(tmp_path, two_ranks):
    (tmp_path / 'last.pt').write_bytes(b'x')
    two_ranks['acc'] = StubAcc(0, None, {0: True, 1: True})
    args, _ = ti.resolve_args(FAST + ['--resume', 'auto', '--out_dir', str(tmp_path)])
    with pytest.raises(SystemExit) as e:  # the main process found OUT_DIR/last.pt (not a real checkpoint here)
        ti.load_resume(args, tmp_path, two_ranks['acc'])
    assert f'{tmp_path / "last.pt"} (1 bytes) is not a readable checkpoint' in str(e.value)
    assert ti.load_resume(ti.resolve_args(FAST + ['--resume', 'auto'])[0], tmp_path / 'empty', two_ranks['acc']) == (None, None)


def test_models_are_built_with_the_main_process_first(tmp_path, monkeypatch):
    """Checkpoint / DINO downloads happen on the main process first (accelerator.main_process_first)."""
    from contextlib import contextmanager

    from accelerate import Accelerator
    inside, seen = [], []
    original = Accelerator.main_process_first

    @contextmanager
    def recording(self):
        with original(self):
            inside.append(True)
            yield
            inside.pop()
    build = ti.build_everything

    def spy(*a, **kw):
        seen.append(bool(inside))
        return build(*a, **kw)
    monkeypatch.setattr(Accelerator, 'main_process_first', recording)
    monkeypatch.setattr(ti, 'build_everything', spy)
    ti.main(FAST + ['--max_steps', '1', '--out_dir', str(tmp_path)])
    assert seen == [True]


# ----------------------------------------------------------------------------- mixed precision

@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)  # the other tests' Accelerators start from scratch again


def test_accelerate_launch_mixed_precision_is_honoured(monkeypatch, fresh_accelerate_state):
    """`accelerate launch --mixed_precision bf16` / `accelerate config` reach the script as ACCELERATE_MIXED_PRECISION:
    with no --mixed_precision flag, Accelerator must be left to read it."""
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    assert ti.resolve_mixed_precision(None) is None
    assert ti.make_accelerator(ti.resolve_args(FAST)[0]).mixed_precision == 'bf16'


def test_the_flag_wins_over_accelerate_config(monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    assert ti.make_accelerator(ti.resolve_args(FAST + ['--mixed_precision', 'no'])[0]).mixed_precision == 'no'


def test_default_without_flag_or_launcher(monkeypatch):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    assert ti.resolve_mixed_precision(None) == ('bf16' if torch.cuda.is_available() else 'no')


def test_fp16_training_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:  # not a choice of the flag
        ti.resolve_args(FAST + ['--mixed_precision', 'fp16'])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'fp16')  # accelerate launch --mixed_precision fp16
    with pytest.raises(SystemExit, match='fp16 mixed precision is not supported for training.*loss scaling'):
        ti.resolve_mixed_precision(None)
    help_text = ti.p.format_help()
    assert 'No fp16' in help_text and 'loss' in help_text


def test_docs_say_why_gradients_are_synchronised_by_hand():
    doc = (Path(ti.__file__).parent / 'docs' / 'training.md').read_text()
    assert 'D.requires_grad_(False)' in doc and 'find_unused_parameters' in doc and 'StyleGAN-T' in doc
    assert 'docs/training.md' in ti.__doc__ and 'find_unused_parameters' in ti.sync_grads.__doc__
