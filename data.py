"""Data and files: the tiny preset's shapes, training data and its seeded order, ImageNet folders and reference
images, the npz writer and reader, sha256, atomic writes, progress bars."""
import hashlib
import json
import os
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------------------
# Shapes: the tiny preset's procedural, class-conditional image set

# Every shape is defined in canonical coordinates (u, v), v pointing up, and fits inside the
# unit disc; rendering maps it to a random centre, circumradius and rotation.
SHAPE_CLASSES = (
    'circle',    # rho <= 0.9
    'square',    # regular 4-gon, circumradius 1 (half side 0.707)
    'triangle',  # equilateral, circumradius 1 (inradius 0.5)
    'ring',      # annulus 0.55 <= rho <= 1: a circle with a hole, so holes must be drawn
    'cross',     # plus sign: two bars of half-width 0.28, half-length 0.95
    'star',      # pentagram outline (five-pointed star), outer radius 1, inner radius 0.382
    'hexagon',   # regular 6-gon, circumradius 1: close to a circle, needs corners right
    'heart',     # implicit heart (x^2+y^2-1)^3 - x^2 y^3 <= 0, rescaled into the unit disc
    'crescent',  # unit disc minus the disc of radius 0.8 centred at (0.45, 0)
    'diamond',   # rhombus |u|/0.55 + |v| <= 1: elongated, so it never looks like the square
)
_SUPERSAMPLE = 4
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Colours come from two small palettes (plus a little jitter) rather than the whole RGB cube: with
# uniform RGB the tiny VQ-VAE spent its whole CPU budget on colour and still came out two-tone, and the
# VAR then drew blobs. With a dozen colours the budget goes into the shapes, which is what the method and
# the metrics are about.
_FILL_PALETTE = np.array([[0.90, 0.15, 0.15], [0.15, 0.75, 0.20], [0.20, 0.35, 0.95], [0.95, 0.85, 0.15],
                          [0.85, 0.25, 0.85], [0.15, 0.85, 0.85], [0.98, 0.55, 0.10], [0.97, 0.97, 0.97],
                          [0.08, 0.08, 0.08]], dtype=np.float64)
_BG_PALETTE = np.array([[0.25, 0.28, 0.35], [0.55, 0.50, 0.42], [0.30, 0.42, 0.30], [0.72, 0.72, 0.70],
                        [0.45, 0.30, 0.35], [0.35, 0.48, 0.62]], dtype=np.float64)


def _inside_regular_polygon(u, v, n):
    """Regular n-gon, circumradius 1, a vertex on +u: intersection of n half-planes (no atan2: fast)."""
    apothem = np.float32(np.cos(np.pi / n))
    inside = None
    for k in range(n):
        phi = (2 * k + 1) * np.pi / n
        h = u * np.float32(np.cos(phi)) + v * np.float32(np.sin(phi)) <= apothem
        inside = h if inside is None else inside & h
    return inside


def _inside_star(u, v):
    # Pentagram (outer radius 1, tip on +v): the 5 edge lines have normals pointing at the tips and
    # distance cos(72deg) from the centre; the inner pentagon is inside all 5 half-planes, each
    # spike inside exactly 4, everything outside in at most 3.
    d = np.float32(np.cos(2 * np.pi / 5))
    count = np.zeros(u.shape, dtype=np.uint8)
    for k in range(5):
        phi = np.pi / 2 + 2 * np.pi * k / 5
        count += u * np.float32(np.cos(phi)) + v * np.float32(np.sin(phi)) <= d
    return count >= 4


def _inside_shape(cls, u, v):
    """Boolean inside-mask of class `cls` at canonical coordinates u, v (same-shape float arrays)."""
    name = SHAPE_CLASSES[cls]
    if name == 'circle':
        return u * u + v * v <= 0.81
    if name == 'square':
        return _inside_regular_polygon(u, v, 4)
    if name == 'triangle':
        # vertex on +v (rotate the +u-vertex polygon by 90 degrees)
        return _inside_regular_polygon(v, -u, 3)
    if name == 'ring':
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if name == 'cross':
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == 'star':
        return _inside_star(u, v)
    if name == 'hexagon':
        return _inside_regular_polygon(u, v, 6)
    if name == 'heart':
        # the raw curve spans x in [-1.14, 1.14], y in [-1, 1.24]; centre (0, 0.15), radius 1.32
        x2, y = (u * 1.32) ** 2, v * 1.32 + 0.15
        t = x2 + y * y - 1
        return t * t * t <= x2 * y * y * y
    if name == 'crescent':
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.64)
    if name == 'diamond':
        return np.abs(u) / 0.55 + np.abs(v) <= 1.0
    raise ValueError(f'unknown shape class {cls}')


def make_shapes(n, seed, size=32, chunk=256):
    """Generate the procedural shapes data set: one anti-aliased shape on a soft background.

    Args:
        n: number of images. seed: int, fully determines the output. size: image side in pixels.
        chunk: images rendered at once (memory only; the output does not depend on it).
    Returns:
        images: uint8 ndarray (n, size, size, 3) in [0, 255].
        labels: int64 ndarray (n,), balanced over the 10 SHAPE_CLASSES (counts differ by <= 1).
    """
    rng = np.random.default_rng(seed)
    K = len(SHAPE_CLASSES)
    labels = rng.permutation(np.arange(n) % K).astype(np.int64)

    # All per-image parameters are drawn up front so the result is independent of `chunk`.
    radius = rng.uniform(0.2, 0.4, n) * size                 # circumradius: 40-80% of the side
    margin = radius + 0.5
    cy = margin + rng.uniform(0, 1, n) * (size - 2 * margin)  # bounding disc fully inside
    cx = margin + rng.uniform(0, 1, n) * (size - 2 * margin)
    theta = rng.uniform(0, 2 * np.pi, n)
    # Background base / fill colours: palette entries + jitter, resampled until the luminance gap is
    # large, so the shape stays readable while the background itself is low-contrast.
    def draw_colours(m):
        b = _BG_PALETTE[rng.integers(0, len(_BG_PALETTE), m)] + rng.uniform(-0.04, 0.04, (m, 3))
        f = _FILL_PALETTE[rng.integers(0, len(_FILL_PALETTE), m)] + rng.uniform(-0.04, 0.04, (m, 3))
        return b, f
    base, fill = draw_colours(n)
    bad = np.abs((fill - base) @ _LUMA) < 0.25
    while bad.any():
        base[bad], fill[bad] = draw_colours(int(bad.sum()))
        bad = np.abs((fill - base) @ _LUMA) < 0.25
    grad_delta = rng.uniform(-0.08, 0.08, (n, 3))        # colour gradient: base -/+ delta
    grad_angle = rng.uniform(0, 2 * np.pi, n)
    tex_freq = rng.uniform(1.5, 4.0, n)                  # faint stripes, cycles per image
    tex_angle = rng.uniform(0, 2 * np.pi, n)
    tex_phase = rng.uniform(0, 2 * np.pi, n)

    # pixel-centre grids in pixel units: full-res for the background, supersampled for coverage
    pix = (np.arange(size, dtype=np.float32) + 0.5)
    sub = (np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    f32 = lambda a: a.astype(np.float32)[:, None, None]
    # Render in class-sorted order so every chunk holds a few contiguous same-class runs
    # (slices, not fancy-index copies of the big supersampled arrays).
    order = np.argsort(labels, kind='stable')
    S = size * _SUPERSAMPLE
    for s in range(0, n, chunk):
        ids = order[s:s + chunk]
        m, lab = len(ids), labels[ids]
        # background: linear colour ramp + faint sinusoidal texture (same on all channels)
        yy, xx = (pix[None, :, None] - size / 2) / size, (pix[None, None, :] - size / 2) / size
        ramp = 2 * (np.cos(f32(grad_angle[ids])) * xx + np.sin(f32(grad_angle[ids])) * yy)
        tex = 0.03 * np.sin(2 * np.pi * f32(tex_freq[ids]) *
                            (np.cos(f32(tex_angle[ids])) * xx + np.sin(f32(tex_angle[ids])) * yy)
                            + f32(tex_phase[ids]))
        bg_mHW3 = (base[ids, None, None, :].astype(np.float32)
                   + ramp[..., None] * grad_delta[ids, None, None, :].astype(np.float32)
                   + tex[..., None])
        # coverage: inside-test on the 4x supersampled grid, averaged down (anti-aliasing).
        # Rotate by -theta and scale to the unit disc; image y points down, canonical v up.
        # Factors are folded into the small (m,1,S)/(m,S,1) terms: one full-size op per coordinate.
        dy = sub[None, :, None] - f32(cy[ids])
        dx = sub[None, None, :] - f32(cx[ids])
        a_, b_ = f32(np.cos(theta[ids]) / radius[ids]), f32(np.sin(theta[ids]) / radius[ids])
        u = (a_ * dx) - (b_ * dy)
        v = (-b_ * dx) - (a_ * dy)
        inside = np.empty((m, S, S), dtype=bool)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(lab)) + 1, [m]])
        for r0, r1 in zip(starts[:-1], starts[1:]):
            inside[r0:r1] = _inside_shape(int(lab[r0]), u[r0:r1], v[r0:r1])
        # sum each run of 4 horizontal sub-samples: read the 4 bytes as one uint32; multiplying by
        # 0x01010101 adds all four bytes into the top byte (numpy reduces tiny axes slowly)
        counts = (inside.view(np.uint32) * np.uint32(0x01010101)) >> np.uint32(24)
        counts = counts.astype(np.uint8)
        counts = counts.reshape(m, size, _SUPERSAMPLE, size).sum(2, dtype=np.uint8)
        cov_mHW1 = counts[..., None].astype(np.float32) / _SUPERSAMPLE ** 2
        img = bg_mHW3 * (1 - cov_mHW1) + fill[ids, None, None, :].astype(np.float32) * cov_mHW1
        # clip only guards the background ramp/texture overshooting [0, 1] by a few levels
        images[ids] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, labels


def to_signed(img_NHW3_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range every model here takes."""
    return img_NHW3_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(img_B3HW_01: torch.Tensor) -> np.ndarray:
    """Sampler images (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), by truncation in float32, as the VAR and ADM
    samplers write their npz files."""
    return img_B3HW_01.float().mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes set as a Dataset; generated once in __init__, no augmentation.

    Items: (img float32 tensor (3, size, size) in [-1, 1], label int in [0, 10)).
    """

    def __init__(self, n, seed, size=32):
        images, labels = make_shapes(n, seed, size)
        self.images_NHW3 = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    @classmethod
    def from_npz(cls, path):
        """The same in-memory dataset from an npz with arr_0 (N, H, W, 3) uint8 and labels (N,)."""
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f'--data_path {path}: no such npz file.')
        with np.load(path, allow_pickle=False) as f:
            if 'arr_0' not in f.files or 'labels' not in f.files:
                raise SystemExit(f'--data_path {path} has {f.files}; training needs arr_0 (images) and labels.')
            ds = cls.__new__(cls)
            ds.images_NHW3, ds.labels = torch.from_numpy(f['arr_0']), torch.from_numpy(f['labels']).long()
        return ds

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img_3HW = to_signed(self.images_NHW3[i:i + 1])[0]
        return img_3HW, int(self.labels[i])


@contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` and renames it onto `path` when the block ends without an error (else
    deletes it), so a kill mid-write never leaves a broken file. Every file written here goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder, what):
    """Holds folder/.lock (with this process's pid) for the block: a second process on the same folder stops with one
    line instead of racing the first; a lock left by a process that no longer runs is taken over."""
    path = Path(folder) / '.lock'
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)  # raises when no such process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:  # a live process of another user
                pass
            raise SystemExit(f'{folder} is in use by {what} (process {pid}, {path}); wait for it, or use another '
                             f'folder. If no such process runs, delete {path}.') from None
    else:
        raise SystemExit(f'could not take the lock {path}')
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def atomic_save(obj, path):
    """Writes obj to path through atomic_path: str as text, bytes as they are, anything else with torch.save."""
    with atomic_path(path) as tmp:
        if isinstance(obj, str):
            tmp.write_text(obj)
        elif isinstance(obj, bytes):
            tmp.write_bytes(obj)
        else:
            torch.save(obj, tmp)


def build_train_data(depth: Optional[int], data_path=None, n_tiny=20000, tiny_seed=0):
    """Training images: the shapes set (tiny preset), ImageNet's train/ folder (official VAR transform), or, for
    either preset, the images and labels of an npz file (sample.py's format: e.g. a VAR's own samples as data)."""
    if data_path is not None and str(data_path).endswith('.npz'):
        return ShapesDataset.from_npz(data_path)
    if depth is None:
        if data_path is not None:
            raise SystemExit(f'--data_path {data_path} is for the real models (--depth 16/20/24/30); the tiny preset '
                             f'trains on generated shapes (--n_tiny) or on an npz file (--data_path X.npz), so a folder '
                             f'would be ignored. Drop it, or add --depth.')
        return ShapesDataset(n_tiny, seed=tiny_seed)
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    root = Path(data_path or '') / 'train'
    if data_path is None or not root.is_dir():
        raise SystemExit(f'ImageNet not found: --data_path must be a folder with train/ (and val/) class subfolders; '
                         f'looked for {root.resolve() if data_path else "(no --data_path given)"}.')
    if not any(p.is_dir() for p in root.iterdir()):
        raise SystemExit(f'{root} has no class subfolders: it is empty or not an ImageNet layout (train/<wnid>/*.JPEG).')
    reso = 256
    tf = T.Compose([T.Resize(round(1.125 * reso), interpolation=T.InterpolationMode.LANCZOS), T.RandomCrop(reso),
                    T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # -> [-1, 1]
    return ImageFolder(str(root), transform=tf)


# ----------------------------------------------------------------------------------------------------------
# npz files (the ADM evaluator format)

def sha256_file(path, h=None, chunk=1 << 22):
    """Feeds a file's bytes to h (a new sha256 if None) and returns h: `sha256_file(p).hexdigest()`."""
    h = h or hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def _npy_header(f, dtype, shape):
    np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             'fortran_order': False, 'shape': tuple(shape)})


def save_npz(path, arrays: dict, arr_0_parts=None):
    """np.savez-compatible, uncompressed npz with fixed zip timestamps (same content -> same bytes), written
    to a temporary file and renamed (a kill never leaves a half-written npz).

    arrays: name -> array. arr_0_parts: optional (shape, dtype, iterable of C-contiguous arrays) streamed
    into 'arr_0' in order, so a 50k x 256 x 256 x 3 file is never held in memory.
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
        def member(name):
            return zf.open(zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0)), 'w', force_zip64=True)
        if arr_0_parts is not None:
            shape, dtype, parts = arr_0_parts
            with member('arr_0') as f:
                _npy_header(f, dtype, shape)
                written = 0
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    f.write(part.tobytes())
                    written += len(part)
                if written != shape[0]:
                    raise RuntimeError(f'arr_0: streamed {written} rows, header says {shape[0]}')
        for name, arr in arrays.items():
            with member(name) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def first_line(e: Exception) -> str:
    """'TypeName: the first line of the message' (at most 200 characters) of an exception, for one-line errors."""
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


def refuse(path, reason: str):
    """A bad input file: one-line SystemExit naming it."""
    raise SystemExit(f'{path}: {reason}')


NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def npz_array(path, name: str) -> np.ndarray:
    """One member of an npz file; memory-mapped when stored uncompressed (np.savez, sample.py), so a
    50k x 256 x 256 x 3 file is read batch by batch. Compressed members are loaded whole."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f'{name}.npy')
        stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:
        if info.file_size > 1 << 30:  # a compressed member cannot be memory-mapped
            print(f'[data] {path}: {name} is compressed; inflating {info.file_size / 2**30:.1f} GiB into memory (an '
                  f'uncompressed npz, as np.savez and sample.py write it, is read batch by batch)', flush=True)
        return _np_load_member(path, name)
    with open(path, 'rb') as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b'PK\x03\x04':
            refuse(path, f'corrupt zip: no local header for {name}.npy')
        n_name, n_extra = struct.unpack('<HH', local[26:30])
        data_start = info.header_offset + 30 + n_name + n_extra
        fh.seek(data_start)
        try:
            version = np.lib.format.read_magic(fh)
        except ValueError as e:
            refuse(path, f'{name}.npy is not a .npy array ({e})')
        if version not in NPY_HEADER_READERS:
            return _np_load_member(path, name)
        try:
            shape, fortran, dtype = NPY_HEADER_READERS[version](fh)
        except ValueError as e:
            refuse(path, f'{name}.npy has an unreadable header ({e})')
        offset = fh.tell()
    if dtype.hasobject:
        refuse(path, f'{name} holds Python objects (pickled), not a numeric array')
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    # the header's shape must fit in the member: a memmap past it would fail (or read the next member's bytes)
    need, have = int(np.prod(shape)) * dtype.itemsize, max(info.file_size - (offset - data_start), 0)
    if need > have:
        rows = f', {have // (need // shape[0])} of {shape[0]} rows' if len(shape) > 1 else ''
        refuse(path, f'{name} is truncated or corrupt: its header promises shape {tuple(shape)} ({need:,} bytes) but the '
                    f'file holds {have:,} bytes of it{rows}; write the file again')
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape, order='F' if fortran else 'C')


def _np_load_member(path, name) -> np.ndarray:
    """A compressed (or unusual) npz member, loaded whole; a corrupt one ends in a one-line SystemExit."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return f[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        refuse(path, f'{name} cannot be read ({first_line(e)}); '
                    f'the file is truncated or corrupt')


def npz_keys(path) -> list:
    """Member names of an npz, or a one-line SystemExit if it is not one."""
    path = Path(path)
    if not path.is_file():
        refuse(path, 'no such file')
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
    except zipfile.BadZipFile as e:  # not an npz at all: say so instead of a zipfile traceback
        refuse(path, f'not a readable .npz file ({e})')


def npz_header(path, name: str) -> tuple:
    """(shape, dtype) of one npz member from its .npy header alone: a compressed member is not inflated."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f'{name}.npy') as f:
            version = np.lib.format.read_magic(f)
            if version not in NPY_HEADER_READERS:  # rare (.npy 3.0): read the member itself
                arr = _np_load_member(path, name)
                return arr.shape, arr.dtype
            shape, _, dtype = NPY_HEADER_READERS[version](f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        refuse(path, f'{name}.npy has an unreadable header ({first_line(e)})')
    return tuple(shape), dtype


def check_images(path, shape, dtype, what='arr_0') -> None:
    """uint8 NHWC RGB, square (from the header; only a small float array is read, to count its NaNs), or a one-line
    SystemExit saying what is wrong."""
    if dtype != np.uint8:
        nan = ''
        if np.issubdtype(dtype, np.floating) and np.prod(shape) * dtype.itemsize < 1 << 30:  # small: say if NaN
            n_nan = int(np.isnan(np.asarray(npz_array(path, what))).sum())
            nan = f' and contains {n_nan} NaN values' if n_nan else ''
        refuse(path, f'{what} has dtype {dtype}{nan}; expected uint8 images 0..255 '
                    f'(convert [0, 1] floats with (x * 255).astype(np.uint8), as sample.py does)')
    if len(shape) != 4 or shape[-1] != 3:
        hint = ' (looks like NCHW: transpose to NHWC)' if len(shape) == 4 and shape[1] == 3 else ''
        refuse(path, f'{what} has shape {tuple(shape)}; expected (N, H, W, 3) RGB images{hint}')
    if shape[1] != shape[2]:
        refuse(path, f'{what} images are {shape[1]}x{shape[2]}; expected square images')


def load_samples(path, images=True) -> dict:
    """A sample npz -> dict(images (N,H,W,3) uint8 (memmap; None with images=False: headers and the small members
    only, nothing inflated), shape of arr_0, labels (N,) int64 or None, tokens (N,L) or None, preset str or None,
    meta dict or None). Bad files end in a one-line SystemExit."""
    keys = npz_keys(path)
    if 'arr_0' not in keys:
        refuse(path, f"no 'arr_0' array (keys: {', '.join(keys) or 'none'}); a sample file holds uint8 images "
                    f"(N, H, W, 3) in arr_0, as sample.py and the ADM samplers write it")
    if 'mu' in keys:
        refuse(path, "has a 'mu' key: the ADM evaluator would take this sample file for precomputed reference "
                    "statistics; is it a reference batch? Pass it to --ref instead")
    shape, dtype = npz_header(path, 'arr_0')
    check_images(path, shape, dtype)
    n = shape[0]
    if n < 2:
        refuse(path, f'{n} sample(s): FID, IS and precision / recall need at least 2 (ideally 50,000)')
    images = npz_array(path, 'arr_0') if images else None
    out = dict(images=images, shape=shape, labels=None, tokens=None, preset=None, meta=None)
    lab_key = 'labels' if 'labels' in keys else 'arr_1' if 'arr_1' in keys else None  # arr_1: guided-diffusion
    if lab_key:
        labels = np.asarray(npz_array(path, lab_key))
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            refuse(path, f'{lab_key} has shape {labels.shape} and dtype {labels.dtype}; expected ({n},) integer class labels')
        out['labels'] = labels.astype(np.int64)
    if 'tokens' in keys:
        out['tokens'] = npz_array(path, 'tokens')
    if 'preset' in keys:
        out['preset'] = str(np.asarray(npz_array(path, 'preset')))
    if 'meta' in keys:
        out['meta'] = json.loads(str(np.asarray(npz_array(path, 'meta'))))
    return out


# ----------------------------------------------------------------------------------------------------------
# Progress bars

PROGRESS_MININTERVAL_PIPE = 30.0  # seconds between updates when the output is a log file or a pipe


def progress_mininterval(file=None) -> float:
    """tqdm's default 0.1 s on a terminal; 30 s when the output is not a tty (a log gets a line per update)."""
    import sys
    file = file if file is not None else sys.stderr
    try:
        tty = file.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        tty = False
    return 0.1 if tty else PROGRESS_MININTERVAL_PIPE


def progress(*args, **kwargs):
    """tqdm with mininterval = progress_mininterval(its output): every progress bar of the scripts goes through here."""
    from tqdm import tqdm
    kwargs.setdefault('mininterval', progress_mininterval(kwargs.get('file')))
    return tqdm(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Training data order: seeded, sharded by rank, exact on resume (train_injector.py)

def derived_seed(*parts) -> int:
    """A 63-bit seed from integers (seed, epoch, rank or sample index...): independent streams per tuple."""
    return int(np.random.SeedSequence([int(x) for x in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededItems(torch.utils.data.Dataset):
    """dataset[i] with torch's RNG seeded from (seed, epoch, i) for the call (restored afterwards): the random
    crop of a sample depends only on which sample it is in which epoch, not on the rank, the loader process
    that reads it or the step a resumed run started at."""

    def __init__(self, dataset, seed, epoch):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, self.epoch, i))
            return self.dataset[i]


def epoch_batches(dataset, epoch, start, per_device, rank, world, seed, num_workers):
    """Batches of one epoch from `start` (in steps): a seeded permutation, sharded by rank (exact resume).

    Random transforms (ImageNet's random crop) are seeded per sample from (seed, epoch, index) (SeededItems),
    and the loader's own generator from (seed, epoch, rank), never from the global RNG (which is the same on
    every rank after torch.manual_seed(args.seed)): ranks see different crops, and a resumed run, mid-epoch
    included, sees the crops of the uninterrupted one.
    """
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    global_bs = per_device * world
    steps = len(dataset) // global_bs
    idx = perm[:steps * global_bs].view(steps, world, per_device)[start:, rank].flatten().tolist()
    if isinstance(dataset, ShapesDataset):  # in-memory: no loader processes needed
        for i in range(0, len(idx), per_device):
            j = torch.tensor(idx[i:i + per_device])
            yield to_signed(dataset.images_NHW3[j]), dataset.labels[j]
        return
    loader = torch.utils.data.DataLoader(SeededItems(dataset, seed, epoch), batch_size=per_device, sampler=idx,
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(derived_seed(seed, epoch, rank)))
    yield from loader


# ----------------------------------------------------------------------------------------------------------
# Reference images for evaluate.py: fresh shapes, an image folder, or an npz (images and / or stored mu / sigma)

REF_SHAPES_SEED = 1000  # held out: pretrain_tiny.py trains on seed 0 and validates on seed 1
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')


def center_crop_arr(pil_image, image_size):
    """ADM's reference preprocessing (guided-diffusion image_datasets.py): BOX-halve while the short side
    is >= 2x the target, BICUBIC-resize the short side to image_size, centre crop. Returns uint8 (S, S, 3)."""
    from PIL import Image
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


def load_reference(spec: str, resolution: int, ref_n: int) -> dict:
    """evaluate.py's --ref: 'shapes' (ref_n fresh shapes, seed REF_SHAPES_SEED), an image folder (center_crop_arr)
    or an npz. Returns dict(images uint8 (N, S, S, 3) or None, stats {'mu', 'sigma'} or None, hash (sha256 hex of
    the content), desc (one line)); a bad reference is a one-line SystemExit."""
    from PIL import Image
    if spec == 'shapes':
        if ref_n < 2:
            raise SystemExit(f'--ref_n must be >= 2, got {ref_n}')
        images, _ = make_shapes(ref_n, seed=REF_SHAPES_SEED, size=resolution)
        key = f'shapes|n={ref_n}|seed={REF_SHAPES_SEED}|size={resolution}'  # generated deterministically
        return dict(images=images, stats=None, hash=hashlib.sha256(key.encode()).hexdigest(),
                    desc=f'{ref_n} shapes (seed {REF_SHAPES_SEED})')
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob('*') if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if len(files) < 2:
            raise SystemExit(f'--ref {path}: an image folder needs at least 2 images ({", ".join(IMAGE_EXTS)}), '
                             f'found {len(files)}')
        h = hashlib.sha256(f'folder|size={resolution}'.encode())
        images = np.empty((len(files), resolution, resolution, 3), dtype=np.uint8)
        for i, f in enumerate(progress(files, desc='reference images', unit='img')):
            h.update(str(f.relative_to(path)).encode())
            sha256_file(f, h)
            with Image.open(f) as im:
                images[i] = center_crop_arr(im.convert('RGB'), resolution)
        return dict(images=images, stats=None, hash=h.hexdigest(), desc=f'{len(files)} images from {path}')
    if path.suffix != '.npz' and not path.is_file():
        raise SystemExit(f"--ref {spec}: not 'shapes', an existing .npz file, or an image folder")
    keys = npz_keys(path)
    images = stats = None
    if 'arr_0' in keys:
        check_images(path, *npz_header(path, 'arr_0'))
        images = npz_array(path, 'arr_0')
        if images.shape[1] != resolution:
            refuse(path, f'reference images are {images.shape[1]}x{images.shape[2]} but the samples are '
                        f'{resolution}x{resolution}')
    if 'mu' in keys and 'sigma' in keys:  # ADM rule: a reference npz with `mu` carries whole-dataset statistics
        stats = dict(mu=np.asarray(npz_array(path, 'mu'), dtype=np.float64),
                     sigma=np.asarray(npz_array(path, 'sigma'), dtype=np.float64))
    if images is None and stats is None:
        refuse(path, f"neither reference images (arr_0) nor statistics (mu, sigma) (keys: {', '.join(keys)})")
    n = len(images) if images is not None else 0
    return dict(images=images, stats=stats, hash=sha256_file(path).hexdigest(),
                desc=f'{path.name} ({n} images{", stored mu/sigma" if stats else ""})')
