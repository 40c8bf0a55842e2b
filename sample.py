"""AID-VAR sampling: npz files in the ADM evaluator format, image grids, scale-by-scale progressions.

    python sample.py --w 0 0.1 --progression       # tiny preset: shipped VAR + injector, paired baseline / guided
    accelerate launch sample.py --depth 16 --injector runs/injector/injector.safetensors --w 0 0.001   # 50k per w, all GPUs

Per w: samples_w{w}.npz (arr_0 uint8 NHWC, labels, tokens of every scale, preset, meta JSON of every setting) and
grid_w{w}.png. Batch b draws from a seed of (--seed, b) alone, so every w sees the same labels and seeds, and the
GPU count does not change the result; finished batches wait in .partial_w{w}/ and a rerun resumes. docs/sampling.md
has the details.
"""
import argparse
import contextlib
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torchvision.utils import make_grid, save_image

import checkpoints
import data
import models

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--depth', type=int, default=None, help='16/20/24/30: official VAR-d{depth}; default: the tiny preset')
p.add_argument('--ckpt_dir', type=str, default='checkpoints',
               help='folder of the official VAR / VQ-VAE checkpoints (real models; downloaded from the HF hub if missing)')
p.add_argument('--injector', type=str, default=None,
               help='injector.safetensors (or an older .pt) from train_injector.py (tiny preset default: the shipped '
                    'weights/tiny_injector.safetensors)')
p.add_argument('--random_init', action='store_true',
               help='random VAR / VQ-VAE (seed 0) and a random non-zero injector: tests and benchmarks only')
p.add_argument('--w', type=float, nargs='+', default=None,
               help="guidance weight(s), finite; several give one npz each from identical seeds (default: the injector's "
                    "w_train: 0.001 for the paper's real models, 0.1 for the shipped tiny injector). Negative or > 1 "
                    "runs with a warning")
p.add_argument('--validated_w', action='store_true',
               help="replace every guided --w by the injector's validated w (train_injector.py's verdict; 0 when the "
                    "guidance did not help)")
p.add_argument('--inject', choices=['input', 'head'], default=None, help="default: the injector's training setting")
p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance scale (the VAR evaluation protocol: 1.5)')
p.add_argument('--top_k', type=int, default=None, help='default: 900 (real models), the injector meta or 0 (tiny)')
p.add_argument('--top_p', type=float, default=None, help='default: 0.96 (real models), the injector meta or 0 (tiny)')
p.add_argument('--more_smooth', action='store_true', help="VAR's Gumbel-smoothed embeddings (off in the VAR eval protocol)")
p.add_argument('--seed', type=int, default=0, help='labels and batch seeds derive from it (a paired comparison needs the same)')
p.add_argument('--classes', type=int, nargs='+', default=None, help='default: every class')
p.add_argument('--num_per_class', type=int, default=None, help='default: 50 (real models: 50k in all), 10 (tiny)')
p.add_argument('--batch_size', type=int, default=50, help='per forward pass; part of the seeding, keep it fixed to resume')
p.add_argument('--out_dir', type=str, default='samples', help='folder of the npz files, grids and progression')
p.add_argument('--progression', action='store_true', help='also write progression.png (paper Figure 6)')
p.add_argument('--progression_n', type=int, default=4, help='samples (from different classes) in progression.png')
p.add_argument('--mixed_precision', choices=['no', 'bf16', 'fp16'], default=None,
               help='autocast dtype; default fp16 on GPU (the VAR demo), no on CPU')
p.add_argument('--cpu', action='store_true', help='run on CPU even if a GPU is present')
p.add_argument('--plant', choices=list(models.PLANT_STRENGTH), default=None,
               help='positive control: sample from the VAR with this planted error (as train_injector.py --plant)')
p.add_argument('--max_batches', type=int, default=None,
               help='debug: stop after computing this many new batches (leaves a resumable partial run)')
models.show_defaults(p)  # every --help line ends with its default

GRID_ROWS, GRID_COLS = 10, 8  # classes x samples per class in grid_w{w}.png
W_WARN = 1.0  # |w| above this gets a warning: the paper samples at 0.001, the tiny injector trains at 0.1


def check_ws(ws):
    """Refuses non-finite guidance weights (SystemExit); warns about negative or very large ones."""
    bad = [w for w in ws if not math.isfinite(w)]
    if bad:
        raise SystemExit(f'--w {" ".join(map(str, bad))}: the guidance weight must be a finite number (e.g. --w 0 0.001).')
    for w in ws:
        if w < 0:
            print(f'[sample] warning: --w {w:g} is negative: the guidance is applied reversed (pushes towards what the '
                  f'discriminator rejects). Sampling anyway.', file=sys.stderr)
        elif w > W_WARN:
            print(f'[sample] warning: --w {w:g} is {w / 0.001:,.0f}x the paper\'s 0.001; the injector was trained for '
                  f'w near its w_train; far larger w push the tokens off the VAR\'s distribution. Sampling anyway.',
                  file=sys.stderr)


def resolve_args(argv=None):
    """(args, the preset of --depth): checked flags, --num_per_class filled in from the preset."""
    args = p.parse_args(argv)
    preset = models.resolve_preset(args.depth)
    if args.num_per_class is None:
        args.num_per_class = preset.num_per_class
    if args.num_per_class < 1 or args.batch_size < 1:
        raise SystemExit(f'--num_per_class and --batch_size must be >= 1, got {args.num_per_class} and {args.batch_size}')
    if args.seed < 0:
        raise SystemExit(f'--seed must be >= 0, got {args.seed}')
    if args.w is not None:  # before any folder is made or model loaded
        check_ws(args.w)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise SystemExit(f'--out_dir {args.out_dir} is a file, not a folder.')
    return args, preset


def w_tag(w: float) -> str:
    """File-name form of a guidance weight: 0.001 -> '0.001', 0.0 -> '0', 1e-05 -> '1e-05'."""
    return format(w, 'g')


def batch_seed(seed: int, b: int) -> int:
    """Generator seed of batch b: a function of (seed, b) only, so any batch can be recomputed alone."""
    return int(np.random.SeedSequence([seed, b]).generate_state(1, dtype=np.uint64)[0])


def class_major_labels(classes, num_per_class) -> np.ndarray:
    """(len(classes) * num_per_class,) int64: num_per_class copies of each class, in the given order."""
    return np.repeat(np.asarray(classes, dtype=np.int64), num_per_class)


def build_models(args, preset, device):
    """Frozen (vae, var) and, when needed, the injector with its meta."""
    # random: evaluate.py --random_init rebuilds the same VQ-VAE
    vae, var = checkpoints.load_frozen(preset, args.ckpt_dir, device, args.random_init, plant=args.plant)
    if args.random_init:
        injector = models.GuidanceInjector(var.C, var.patch_nums)
        nn.init.normal_(injector.proj_out.weight, std=0.1)  # an untrained injector outputs exactly 0; 0.1 moves tokens
        meta = dict(inject='input', w_train=0.001, source='random')
        return vae, var, models.frozen(injector, device), meta
    if args.w is not None and all(w == 0 for w in args.w) and not args.injector:
        return vae, var, None, dict(source='none')
    path = args.injector
    if path is None:
        if not preset.tiny:
            raise SystemExit('--injector is required with --depth (the injector.safetensors written by train_injector.py); '
                             'only --w 0 (plain VAR sampling) runs without one.')
        path = checkpoints.TINY_DIR / checkpoints.TINY_FILES['injector']
        if not Path(path).is_file():
            raise SystemExit(f'The shipped tiny injector {path} is missing: restore it with `git checkout -- weights/`, '
                             f'train one with `python train_injector.py` and pass --injector, or sample plain VAR with --w 0.')
    injector, meta = checkpoints.load_injector(path, var, device)
    var_sha256 = checkpoints.weights_sha256(var) if meta.get('var_sha256') else None
    if var_sha256 and meta['var_sha256'] != var_sha256:
        print(f'[sample] warning: {path} was trained on another VAR (weights sha256 {meta["var_sha256"][:16]}, this one '
              f'{var_sha256[:16]}{"; --plant " + str(args.plant) if args.plant else ""}): its guidance '
              f'was learnt for that model', file=sys.stderr)
    return vae, var, injector, dict(meta, source=str(path), sha256=data.sha256_file(path).hexdigest()[:16])


def verdict_line(inj_meta):
    """One line on what the injector's validation (train_injector.py) found; None without an injector."""
    if inj_meta.get('source') in ('none', 'random'):
        return None
    val = inj_meta.get('validation')
    if not val:
        return ('[sample] warning: this injector carries no validation (trained with --val_n 0, or before '
                'train_injector.py validated): whether its guidance helps is unknown')
    r = min(val['rows'], key=lambda r: r['FID'])
    found = (f'{val["net"]} FID {val["FID_w0"]:.2f} -> {r["FID"]:.2f} at w {r["w"]:g}, 95% [{r["ci95"][0]:+.2f}, '
             f'{r["ci95"][1]:+.2f}], {val["n"]} paired samples at step {val["step"]}')
    if val['verdict'] == 'helps':
        return f'[sample] the injector\'s validation: guidance helps ({found}); validated w = {val["validated_w"]:g}'
    return (f'[sample] warning: this injector did NOT help in its validation ({val["verdict"]}: {found}); '
            f'--validated_w samples at its validated w = {val["validated_w"]:g}')


def settings_of(args, preset, var, inj_meta, w, labels_N) -> dict:
    """Everything that determines the samples of one w (stored as the npz meta; a resume must match it)."""
    return dict(preset=preset.tag, random_init=args.random_init, w=w,
                inject=args.inject if w != 0 else None, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                seed=args.seed, classes=args.classes, num_per_class=args.num_per_class, batch_size=args.batch_size,
                n=int(len(labels_N)), patch_nums=list(var.patch_nums), vocab_size=var.V,
                injector=None if w == 0 else {k: inj_meta.get(k) for k in ('source', 'sha256', 'step', 'w_train')},
                mixed_precision=args.mixed_precision,
                plant=None if args.plant is None else [args.plant, None, 0])  # [kind, strength, seed]: the defaults


def settings_diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys[:4])


@torch.no_grad()
def sample_batch(var, hook, args, labels_B, g_seed, w, autocast):
    """One batch of samples. Returns (uint8 images (B, H, W, 3), tokens int16 (B, L)) as numpy arrays."""
    with autocast:
        img_B3HW, idx_Bl = var.autoregressive_infer_cfg(
            len(labels_B), labels_B, g_seed=g_seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
            more_smooth=args.more_smooth, guidance_hook=hook if w != 0 else None, guidance_w=w,
            inject=args.inject, ret_idx=True)
    img_B3HW = img_B3HW.float()
    if not torch.isfinite(img_B3HW).all():
        raise SystemExit(f'non-finite pixels in the batch with seed {g_seed} at w={w}: the guidance (or the '
                         f'mixed precision {args.mixed_precision}) overflowed; nothing was written for this batch.')
    img_BHW3 = data.to_uint8(img_B3HW)
    tokens_BL = torch.cat(idx_Bl, dim=1).to(torch.int16).cpu().numpy()
    return img_BHW3, tokens_BL


def for_png(x_N3HW):
    """Tiny-preset images (32 px) are upscaled (nearest) to 64 px or more so PNG viewers show them."""
    f = -(-64 // x_N3HW.shape[-1])
    return F.interpolate(x_N3HW, scale_factor=f, mode='nearest') if f > 1 else x_N3HW


def save_labelled(grid_3HW, path, titles, scale_names):
    """progression.png: the tile grid (blocks of len(scale_names) columns, a white column between blocks) under a
    header naming each block (titles) and each column (the scale whose token prefix it decodes, e.g. '4x4')."""
    from PIL import Image, ImageDraw, ImageFont
    K = len(scale_names)
    pitch = (grid_3HW.shape[-1] - 1) // (len(titles) * (K + 1) - 1)  # tile + 1 px padding
    font = ImageFont.load_default(size=max(10, pitch // 5))
    line = font.size + 4
    img = Image.new('RGB', (grid_3HW.shape[-1], grid_3HW.shape[-2] + 2 * line), 'white')
    img.paste(Image.fromarray(grid_3HW.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()), (0, 2 * line))
    draw = ImageDraw.Draw(img)
    for j, title in enumerate(titles):
        x0 = 1 + j * (K + 1) * pitch
        draw.text((x0 + 2, 2), title, fill='black', font=font)
        for k, name in enumerate(scale_names):
            draw.text((x0 + k * pitch + pitch // 2, line + 2), name, fill='black', font=font, anchor='ma')
    with data.atomic_path(path) as tmp:
        img.save(tmp, format='PNG')


def grid_indices(labels_N, classes):
    """Indices of the first GRID_COLS samples of each of the first GRID_ROWS classes, row-major."""
    rows = [np.flatnonzero(labels_N == c)[:GRID_COLS] for c in list(dict.fromkeys(classes))[:GRID_ROWS]]
    return np.concatenate(rows), max(len(r) for r in rows)


def merge(out_path, part_dir, n_batches, labels_N, settings, grid_path, grid_idx, grid_cols):
    """Streams the partial batches into out_path (npz) and writes the grid PNG from them."""
    files = [part_dir / f'batch_{b:05d}.npz' for b in range(n_batches)]
    tokens = []
    for path in files:  # npz members load lazily: this reads the small token arrays only
        with np.load(path) as f:
            tokens.append(f['tokens'])
    with np.load(files[0]) as f:
        H, W = f['arr_0'].shape[1:3]
    grid, grid_set = {}, set(grid_idx.tolist())

    def arr_0_parts():
        start = 0
        for path in files:
            with np.load(path) as f:
                arr = f['arr_0']
            for i in grid_set.intersection(range(start, start + len(arr))):
                grid[i] = arr[i - start]
            start += len(arr)
            yield arr
    data.save_npz(out_path, {'labels': labels_N, 'tokens': np.concatenate(tokens), 'preset': np.array(settings['preset']),
                             'meta': np.array(json.dumps(settings, sort_keys=True))},
                  arr_0_parts=((len(labels_N), H, W, 3), np.uint8, arr_0_parts()))
    imgs = torch.from_numpy(np.stack([grid[i] for i in grid_idx])).permute(0, 3, 1, 2).float().div(255)
    save_image(for_png(imgs), grid_path, nrow=grid_cols, padding=1)


@torch.no_grad()
def progression(path, vae, var, hook, args, labels_N, ws, out_dir, autocast):
    """progression.png: one row per sample (up to --progression_n, from classes spread over --classes); for
    every w (w = 0, the baseline, first) a block of K images: the image decoded from the token prefix of
    scales 0..k, k = 0..K-1. Same seeds in every block, so the blocks differ only by the guidance."""
    classes = list(dict.fromkeys(args.classes))
    pick_cls = list(dict.fromkeys(classes[int(i)] for i in np.linspace(0, len(classes) - 1, args.progression_n).round()))
    picks = np.array([np.flatnonzero(labels_N == c)[0] for c in pick_cls])
    ws_prog = sorted(set([0.0] + list(ws)))
    bs, blocks = args.batch_size, []
    for w in ws_prog:
        npz = out_dir / f'samples_w{w_tag(w)}.npz'
        if npz.is_file():
            with np.load(npz) as f:
                tokens_nL = f['tokens'][picks]
        else:  # the baseline was not asked for: recompute just the batches holding the picks
            tok = {}
            for b in sorted(set((picks // bs).tolist())):
                labels_B = torch.from_numpy(labels_N[b * bs:(b + 1) * bs]).to(var.lvl_1L.device)
                tok[b] = sample_batch(var, hook, args, labels_B, batch_seed(args.seed, b), w, autocast())[1]
            tokens_nL = np.stack([tok[i // bs][i % bs] for i in picks])
        idx_Bl = list(torch.from_numpy(tokens_nL.astype(np.int64)).to(var.lvl_1L.device).split(
            [pn * pn for pn in var.patch_nums], dim=1))
        blocks.append(torch.stack(vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=False), dim=1).float())  # (n, K, 3, H, W)
    rows_nWK3HW = torch.stack(blocks, dim=1).add(1).div(2)
    n, nw, K = rows_nWK3HW.shape[:3]
    # a white tile between the w blocks of a row
    gap_nW13HW = torch.ones_like(rows_nWK3HW[:, :, :1])
    tiles = torch.cat([rows_nWK3HW, gap_nW13HW], dim=2).flatten(1, 2)[:, :-1]      # (n, nw*(K+1)-1, 3, H, W)
    grid_3HW = make_grid(for_png(tiles.flatten(0, 1)), nrow=tiles.shape[1], padding=1)
    titles = [f'w = {w:g} (baseline: the frozen VAR)' if w == 0 else f'w = {w:g} (guided)' for w in ws_prog]
    save_labelled(grid_3HW, path, titles, [f'{pn}x{pn}' for pn in var.patch_nums])
    print(f'[sample] {path}: {n} samples (classes {pick_cls}) x scales 0..{K - 1}, blocks w = {ws_prog}')


def main(argv=None):
    args, preset = resolve_args(argv)
    # cpu=True on a GPU-less machine lets torchrun-style launches (accelerate launch --multi_gpu) use gloo on the CPU
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    device = accelerator.device
    if args.mixed_precision is None:
        args.mixed_precision = 'fp16' if device.type == 'cuda' else 'no'
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.mixed_precision, torch.bfloat16)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.mixed_precision != 'no')

    with accelerator.main_process_first():  # downloads happen once; the other ranks then read the files
        vae, var, injector, inj_meta = build_models(args, preset, device)
    if args.w is None:
        args.w = [inj_meta.get('w_train', 0.001)]
    line = verdict_line(inj_meta) if any(w != 0 for w in args.w) else None
    if line and accelerator.is_main_process:
        print(line, file=sys.stderr if 'warning' in line else sys.stdout)
    if args.validated_w:
        if not (inj_meta.get('validation') or {}).get('rows'):
            raise SystemExit('--validated_w: this injector has no validation verdict (train_injector.py --val_n N writes one)')
        args.w = [w if w == 0 else inj_meta['validation']['validated_w'] for w in args.w]
    if args.inject is None:
        args.inject = inj_meta.get('inject', 'input')
    # real models: the VAR evaluation protocol; tiny: the values tuned with the injector, when its file records them
    tuned = inj_meta if preset.tiny else {}
    if args.top_k is None:
        args.top_k = tuned.get('top_k', preset.top_k)
    if args.top_p is None:
        args.top_p = tuned.get('top_p', preset.top_p)
    if args.classes is None:
        args.classes = list(range(var.num_classes))
    bad = [c for c in args.classes if not 0 <= c < var.num_classes]
    if bad:
        raise SystemExit(f'--classes {bad} out of range: this VAR has classes 0..{var.num_classes - 1}')
    hook = models.make_guidance_hook(var, injector) if injector is not None else None
    ws = list(dict.fromkeys(float(w) for w in args.w))
    labels_N = class_major_labels(args.classes, args.num_per_class)
    out_dir = Path(args.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    # one sampling run per folder at a time (the main process holds the lock; the other ranks are its own)
    with data.folder_lock(out_dir, 'another sample.py') if accelerator.is_main_process else contextlib.nullcontext():
        return sample_into(args, preset, accelerator, vae, var, injector, inj_meta, hook, ws, labels_N, out_dir, autocast)


def sample_into(args, preset, accelerator, vae, var, injector, inj_meta, hook, ws, labels_N, out_dir, autocast):
    """The sampling of main() into out_dir: finished files kept, partial runs resumed, then merged."""
    rank, world, device, bs = accelerator.process_index, accelerator.num_processes, accelerator.device, args.batch_size
    n_batches = -(-len(labels_N) // bs)
    if accelerator.is_main_process:
        print(f'[sample] {preset.label}'
              f'{" (random init)" if args.random_init else ""}: {len(labels_N)} samples ({len(args.classes)} classes x '
              f'{args.num_per_class}), w = {ws}, cfg {args.cfg}, top_k {args.top_k}, top_p {args.top_p}, '
              f'more_smooth {args.more_smooth}, seed {args.seed}, {n_batches} batches of {bs} on {world} process(es)')

    jobs = []  # (w, settings, partial folder, final npz)
    for w in ws:
        settings = settings_of(args, preset, var, inj_meta, w, labels_N)
        final = out_dir / f'samples_w{w_tag(w)}.npz'
        if final.is_file():
            try:
                with np.load(final) as f:
                    old = json.loads(str(f['meta'])) if 'meta' in f.files else {}
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise SystemExit(f'{final} exists but is not a readable npz ({type(e).__name__}: it was cut off?); '
                                 f'delete it to sample it again.') from None
            if old != settings:
                raise SystemExit(f'{final} exists but was sampled with other settings ({settings_diff(old, settings)}); '
                                 f'use another --out_dir or delete it.')
            if accelerator.is_main_process:
                print(f'[sample] {final} is complete with these settings: not recomputed')
            continue
        part_dir = out_dir / f'.partial_w{w_tag(w)}'
        if accelerator.is_main_process and not (part_dir / 'settings.json').is_file():
            data.atomic_save(json.dumps(settings, sort_keys=True, indent=1), part_dir / 'settings.json')
        accelerator.wait_for_everyone()
        old = json.loads((part_dir / 'settings.json').read_text())
        if old != settings:
            raise SystemExit(f'{part_dir} holds an unfinished run with other settings ({settings_diff(old, settings)}); '
                             f'rerun with those settings to finish it, or delete the folder.')
        jobs.append((w, settings, part_dir, final))

    todo = [(job, b) for job in jobs for b in range(rank, n_batches, world)
            if not (job[2] / f'batch_{b:05d}.npz').is_file()]
    done_before = sum(1 for job in jobs for b in range(rank, n_batches, world)) - len(todo)
    if done_before and accelerator.is_main_process:
        print(f'[sample] resuming: {done_before} finished batches found')
    if args.max_batches is not None:
        todo = todo[:args.max_batches]
    try:
        for (w, _, part_dir, _), b in data.progress(todo, desc='sample', unit='batch',
                                                      disable=not accelerator.is_main_process, dynamic_ncols=True):
            labels_B = torch.from_numpy(labels_N[b * bs:(b + 1) * bs]).to(device)
            img_BHW3, tokens_BL = sample_batch(var, hook, args, labels_B, batch_seed(args.seed, b), w, autocast())
            data.save_npz(part_dir / f'batch_{b:05d}.npz', {'arr_0': img_BHW3, 'tokens': tokens_BL})
    except KeyboardInterrupt:
        raise SystemExit(f'\n[sample] interrupted: the finished batches are kept in {out_dir}/.partial_w*; the same '
                         f'command resumes from them.') from None
    accelerator.wait_for_everyone()

    written = {}
    if accelerator.is_main_process:
        grid_idx, grid_cols = grid_indices(labels_N, args.classes)
        for w, settings, part_dir, final in jobs:
            missing = [b for b in range(n_batches) if not (part_dir / f'batch_{b:05d}.npz').is_file()]
            if missing:
                print(f'[sample] w={w}: {n_batches - len(missing)} of {n_batches} batches done in {part_dir}; '
                      f'rerun the same command to resume')
                continue
            grid = out_dir / f'grid_w{w_tag(w)}.png'
            merge(final, part_dir, n_batches, labels_N, settings, grid, grid_idx, grid_cols)
            shutil.rmtree(part_dir)
            print(f'[sample] wrote {final} ({len(labels_N)} samples) and {grid}')
        written = {w: out_dir / f'samples_w{w_tag(w)}.npz' for w in ws}
        if args.progression and all(path.is_file() for path in written.values()):
            progression(out_dir / 'progression.png', vae, var, hook, args, labels_N, ws, out_dir, autocast)
    # no barrier after the merge: it can outlast a collective timeout on 50k files; the other ranks just end
    return written


if __name__ == '__main__':
    main()
