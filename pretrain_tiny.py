"""Pretrain the tiny preset from scratch on the shapes data: the VQ-VAE, the VAR, the feature network, the judge.

Writes into --out_dir (a run folder; the shipped weights/ only through --ship): tiny_vae.pt (multi-scale VQ-VAE),
tiny_var.pt (class-conditional VAR, EMA weights), tiny_featnet.pt (a small ViT classifier, the tiny preset's DINO /
Inception stand-in), tiny_judge.pt (a CNN classifier trained apart from the feature network, the network every method
decision on the tiny preset is read on), pretrain_*.png for a look, and MANIFEST.json (sha256, size, command, seeds,
metrics, wall time per file); weights are fp16 state_dicts. --stage all trains the four in turn, --stage X one (a
later one loads the earlier ones' files); the feature network needs neither VQ-VAE nor VAR, so a second shell may run
--stage featnet on the same --out_dir beside --stage vae, then var. --resume continues bit-identically from
out_dir/resume_<stage>.pt, --stop_after N ends a session. Recipe, pilots and costs: docs/pretrain_tiny.md.

    python pretrain_tiny.py                                  # everything, into runs/pretrain_tiny
    python pretrain_tiny.py --stage judge --ship             # the judge, then copied into weights/ (+ MANIFEST)
    python pretrain_tiny.py --out_dir runs/tiny_v2 [--resume]      # another run folder
"""
import argparse
import fcntl
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

import checkpoints
import data
import features
import iscs
import models

parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
parser.add_argument('--stage', default='all', choices=['all', 'vae', 'var', 'featnet', 'judge'],
                    help='what to train: all = VQ-VAE, VAR on its tokens, feature network, judge, one after another')
parser.add_argument('--preset', default=models.TINY_PRESET, choices=sorted(models.TINY_PRESETS),
                    help='architecture (models.TINY_PRESETS); default: the one weights/ holds')
parser.add_argument('--out_dir', default='runs/pretrain_tiny', help='run folder (never the shipped weights/: see --ship)')
parser.add_argument('--ship', action='store_true', help=f'at the end, copy the files this run trained into {checkpoints.TINY_DIR} '
                    '(replacing the shipped ones) and merge their MANIFEST.json entries')
parser.add_argument('--resume', action='store_true',
                    help='continue each stage from out_dir/resume_<stage>.pt; stages that finished are skipped')
parser.add_argument('--ckpt_min', type=float, default=5.0, help='write the resume checkpoint every this many minutes')
parser.add_argument('--stop_after', type=int, default=0,
                    help='end the session (with a checkpoint) after this many steps, all stages together; see --resume')
parser.add_argument('--n_train', type=int, default=60000, help='training images (make_shapes(n_train, train_seed))')
parser.add_argument('--n_val', type=int, default=2000, help='held-out images (make_shapes(n_val, val_seed))')
parser.add_argument('--train_seed', type=int, default=0, help='make_shapes seed of the training images')
parser.add_argument('--val_seed', type=int, default=1, help='make_shapes seed of the held-out images')
parser.add_argument('--seed', type=int, default=0, help='torch seed (init, batches, code re-seeding)')
# 1 thread by default: on 2 shared cores, 2 OpenMP threads spin against the other jobs and ran 8x slower (measured)
parser.add_argument('--threads', type=int, default=1, help='torch threads')
# VQ-VAE
parser.add_argument('--vae_steps', type=int, default=3500, help='VQ-VAE training steps')
parser.add_argument('--vae_bs', type=int, default=16, help='VQ-VAE batch size')
parser.add_argument('--vae_lr', type=float, default=2e-3, help='VQ-VAE peak learning rate (AdamW, warm-up + cosine)')
parser.add_argument('--vae_loss', default='l1', choices=['l1', 'mse'], help='VQ-VAE reconstruction loss')
parser.add_argument('--dead_window', type=int, default=50, help='re-seed codes unused over this many steps')
parser.add_argument('--dead_until', type=float, default=0.8, help='stop re-seeding after this fraction of the steps')
parser.add_argument('--vae_eval_every', type=int, default=500, help='val metrics every this many steps (0: at the end)')
# VAR
parser.add_argument('--var_steps', type=int, default=10000, help='VAR training steps')
parser.add_argument('--var_bs', type=int, default=32, help='VAR batch size')
parser.add_argument('--var_lr', type=float, default=3e-3, help='VAR peak learning rate (AdamW, warm-up + cosine)')
parser.add_argument('--var_wd', type=float, default=0.05, help='VAR weight decay')
parser.add_argument('--var_clip', type=float, default=2.0, help='VAR gradient-norm clip')
parser.add_argument('--var_ema', type=float, default=0.999, help='EMA decay of the shipped VAR weights (0: no EMA)')
parser.add_argument('--var_eval_every', type=int, default=1000, help='VAR val loss / accuracy every this many steps')
parser.add_argument('--var_init', default='',
                    help='start the VAR from these weights (a tiny_var.pt of the same --preset) instead of a random '
                         'init: a warm restart with a fresh optimizer, warm-up and cosine schedule of --var_steps')
parser.add_argument('--warmup', type=float, default=0.05, help='warm-up fraction of the steps (VAE, VAR, featnet)')
# sampling for the grid / the sample score
parser.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance of the sample grid and score')
parser.add_argument('--top_k', type=int, default=0, help='top-k of the sample grid and score (0: off)')
parser.add_argument('--top_p', type=float, default=0.0, help='top-p of the sample grid and score (0: off)')
parser.add_argument('--score_n', type=int, default=1000, help='VAR samples the finished feature network classifies')
# feature network
parser.add_argument('--fn_steps', type=int, default=6000, help='feature network training steps')
parser.add_argument('--fn_bs', type=int, default=64, help='feature network batch size')
parser.add_argument('--fn_lr', type=float, default=1e-3, help='feature network peak learning rate')
parser.add_argument('--fn_n_train', type=int, default=60000, help='its training images (train_seed)')
# the judge (models.build_judge): a CNN trained apart from the feature network, on shapes of its own seed
parser.add_argument('--judge_steps', type=int, default=4000, help='judge training steps')
parser.add_argument('--judge_bs', type=int, default=128, help='judge batch size')
parser.add_argument('--judge_lr', type=float, default=2e-3, help='judge peak learning rate')
parser.add_argument('--judge_n_train', type=int, default=30000, help='judge training images (make_shapes(n, judge_data_seed))')
parser.add_argument('--judge_data_seed', type=int, default=5, help="its training shapes' seed (not --train_seed)")
models.show_defaults(parser)  # every --help line ends with its default


# ----------------------------------------------------------------------------------------------------------
# helpers: schedule, data, shipped files, manifest

def set_lr(opt, step, total, peak, warmup):
    """Linear warm-up (the first warmup fraction of total steps) then cosine decay to 1% of the peak."""
    warm = max(1, int(warmup * total))
    t = (step - warm) / max(1, total - warm)
    for g in opt.param_groups:
        g['lr'] = peak * (step + 1) / warm if step < warm else peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def batch_ids(step, n, bs, seed):
    """The minibatch of a step, (bs,) ids in [0, n): each epoch is a permutation of its own seed (no iterator state)."""
    epoch, i = divmod(step, n // bs)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * bs:(i + 1) * bs]


def data_info(args, **override):  # the data and seeds of every stage's MANIFEST.json entry
    return dict(train_images=args.n_train, train_seed=args.train_seed, val_images=args.n_val, val_seed=args.val_seed,
                torch_seed=args.seed) | override


def shapes(n, seed):
    """make_shapes(n, seed) as tensors: (images (N, H, W, 3) uint8, labels (N,) int64)."""
    t0 = time.time()
    img_NHW3, lab_N = (torch.from_numpy(a) for a in data.make_shapes(n, seed))
    print(f'[data] {n} shapes (seed {seed}) in {time.time() - t0:.0f}s')
    return img_NHW3, lab_N


def load_file(model, out_dir, name):
    path = out_dir / checkpoints.TINY_FILES[name]
    return checkpoints.load_checked(model, checkpoints.load_state_dict_file(path), path, f'the tiny preset {name}')


def update_manifest(out_dir, update):
    """Read, update(manifest) in place, write: MANIFEST.json keeps the other files' entries. Under an exclusive flock
    on out_dir, so two stages run side by side on one out_dir (two shells) never drop each other's entry."""
    path, fd = out_dir / 'MANIFEST.json', os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while the other process updates; closing the fd releases it
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        update(manifest)
        data.atomic_save(json.dumps(manifest, indent=2, sort_keys=True) + '\n', path)
    finally:
        os.close(fd)


def ship(args, out_dir, stage, model, wall, metrics_fn, info):
    """Writes the stage's file (floats in fp16), its MANIFEST.json entry and its done marker. The model is reloaded
    from the fp16 weights first, so metrics_fn() measures what ships."""
    model.requires_grad_(False)
    sd = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().clone()
          for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    metrics = metrics_fn()
    print(f'[{stage}] {wall / 60:.1f} min; (fp16 weights) {metrics}')
    path = out_dir / checkpoints.TINY_FILES[stage]
    data.atomic_save(sd, path)
    sha = data.sha256_file(path).hexdigest()
    arch = {k: v for k, v in models.TINY_PRESETS[args.preset].items() if (k == 'featnet') == (stage == 'featnet')}
    arch = 'models.build_judge' if stage == 'judge' else arch.get('featnet', arch)
    entry = dict(sha256=sha, size_bytes=path.stat().st_size, command=args.command, torch_version=torch.__version__,
                 preset=args.preset, arch=arch, stage=stage, wall_time_s=round(wall),
                 metrics=metrics, **info)
    update_manifest(out_dir, lambda manifest: manifest.update({path.name: entry}))
    data.atomic_save(dict(stage=stage, done=True, sha256=sha), resume_path(out_dir, stage))


# ----------------------------------------------------------------------------------------------------------
# resuming: every stage writes out_dir/resume_<stage>.pt (model, optimiser, EMA, RNG, step, loop state) every
# --ckpt_min minutes, and a small "done" marker once its file is written

_ckpt = {}  # the session's last checkpoint time and step count (for --stop_after), set by main()


def resume_path(out_dir, stage):
    return out_dir / f'resume_{stage}.pt'


def load_resume(args, out_dir, stage):
    """The stage's checkpoint (dict) under --resume, else None."""
    path = resume_path(out_dir, stage)
    if not (args.resume and path.is_file()):
        return None
    return checkpoints.torch_load(path, 'resume checkpoint', f'Delete it to start the {stage} stage afresh.')


def stage_done(args, out_dir, stage):
    """--resume: the stage finished before and its file is still the one it wrote."""
    ck, path = load_resume(args, out_dir, stage), out_dir / checkpoints.TINY_FILES[stage]
    done = bool(ck and ck.get('done') and path.is_file() and data.sha256_file(path).hexdigest() == ck['sha256'])
    if done:
        print(f'[{stage}] finished in an earlier session: {path}')
    return done


def restore(args, out_dir, stage, model, opt, gen=None, **fresh):
    """--resume: loads resume_<stage>.pt into model, opt, gen and torch's RNG and returns its loop state (the keys of
    fresh: step, wall, ...); fresh itself when there is no checkpoint."""
    ck = load_resume(args, out_dir, stage)
    if not ck:
        return fresh
    if ck.get('done'):  # stage_done() said the file no longer matches: retraining would silently replace it
        raise SystemExit(f'[{stage}] finished in an earlier session, but {out_dir / checkpoints.TINY_FILES[stage]} is missing '
                         f'or changed since; restore it, or delete {resume_path(out_dir, stage)} to train the stage again.')
    model.load_state_dict(ck['model'])
    opt.load_state_dict(ck['opt'])
    if gen is not None:
        gen.set_state(ck['gen'])
    torch.set_rng_state(ck['rng'])
    print(f'[{stage}] resuming at step {ck["step"]}')
    return {k: ck[k] for k in fresh}


def after_step(args, out_dir, stage, step, state):
    """Called after every training step (step = steps done): writes the checkpoint when due (state() gives the
    stage's part of it) and ends the session (SystemExit 0) after --stop_after steps."""
    _ckpt['steps'] += 1
    stop = args.stop_after and _ckpt['steps'] >= args.stop_after
    if stop or time.time() - _ckpt['last'] >= 60 * args.ckpt_min:
        ck = dict(stage=stage, step=step, rng=torch.get_rng_state(), **state())
        data.atomic_save(ck, resume_path(out_dir, stage))
        _ckpt['last'] = time.time()
    if stop:
        print(f'\n[{stage}] --stop_after {args.stop_after}: stopped at step {step}; continue with --resume')
        sys.exit(0)


# ----------------------------------------------------------------------------------------------------------
# stage 1: VQ-VAE

@torch.no_grad()
def scale_residuals(quant, f_BChw):
    """The inputs the quantizer sees at every scale (the multi-scale residuals), flattened: list of (N_si, C)."""
    B, C, H, W = f_BChw.shape
    SN, f_rest, out = len(quant.v_patch_nums), f_BChw.clone(), []
    for si, pn in enumerate(quant.v_patch_nums):
        z = F.interpolate(f_rest, size=(pn, pn), mode='area') if si != SN - 1 else f_rest
        out.append(z.permute(0, 2, 3, 1).reshape(-1, C))
        idx_N = quant._nearest_code(out[-1])
        h = quant.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2)
        f_rest = f_rest - quant.phi(si, SN)(F.interpolate(h, size=(H, W), mode='bicubic') if si != SN - 1 else h)
    return out


@torch.no_grad()
def eval_vae(vae, va_img, bs=250):
    """Val MSE (images in [-1, 1], clamped decode from the tokens) and per-scale codebook usage / perplexity."""
    vae.eval()
    SN, V = len(vae.patch_nums), vae.vocab_size
    hits_SV, se, n = torch.zeros(SN, V), 0.0, 0
    for i in range(0, len(va_img), bs):
        x = data.to_signed(va_img[i:i + bs])
        idx_ls = vae.img_to_idxBl(x)
        rec = vae.idxBl_to_img(idx_ls, last_one=True)
        se += F.mse_loss(rec, x, reduction='sum').item()
        n += x.numel()
        for si, idx in enumerate(idx_ls):
            hits_SV[si] += torch.bincount(idx.flatten(), minlength=V).float()
    p_SV = hits_SV / hits_SV.sum(1, keepdim=True)
    ppl_S = torch.exp(-(p_SV * p_SV.clamp_min(1e-12).log()).sum(1))
    return dict(val_mse=se / n, used_per_scale=[int(u) for u in (hits_SV > 0).sum(1)],
                perplexity_per_scale=[round(float(p), 1) for p in ppl_S], used_total=int((hits_SV.sum(0) > 0).sum()))


def train_vae(args, out_dir, tr_img, va_img):
    torch.manual_seed(args.seed)
    vae, _ = models.build_tiny(init=True, preset=args.preset)
    vae.train()
    vae.requires_grad_(True)  # built in test_mode (eval, frozen): switch both back on for training
    quant = vae.quantize
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    V = vae.vocab_size
    st = restore(args, out_dir, 'vae', vae, opt, gen, step=0, hits_V=torch.zeros(V), wall=0.0)
    start, hits_V, t0 = st['step'], st['hits_V'], time.time() - st['wall']  # wall time over all sessions
    pbar = data.progress(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc='vae', file=sys.stdout)
    for step in pbar:
        set_lr(opt, step, args.vae_steps, args.vae_lr, args.warmup)
        x_B3HW = data.to_signed(tr_img[batch_ids(step, len(tr_img), args.vae_bs, args.seed)])
        f_BChw = vae.quant_conv(vae.encoder(x_B3HW))
        f_hat_BChw, vq_loss, idx_ls = quant(f_BChw)
        rec_B3HW = vae.decoder(vae.post_quant_conv(f_hat_BChw))
        rec_loss = F.l1_loss(rec_B3HW, x_B3HW) if args.vae_loss == 'l1' else F.mse_loss(rec_B3HW, x_B3HW)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        for idx in idx_ls:
            hits_V += torch.bincount(idx.flatten(), minlength=V).float()
        if (step + 1) % args.dead_window == 0:
            dead = (hits_V == 0).nonzero().flatten()
            n_reseed = len(dead) if step < args.dead_until * args.vae_steps else 0
            if n_reseed:
                # re-seed from residuals of all scales pooled: most positions live at the fine scales, so
                # that is where new codes get used; small noise keeps twins from staying identical
                z_NC = torch.cat(scale_residuals(quant, f_BChw.detach()))
                pick = torch.randint(len(z_NC), (len(dead),), generator=gen)
                quant.embedding.weight.data[dead] = z_NC[pick] + 0.01 * torch.randn(len(dead), z_NC.shape[1])
            pbar.set_postfix_str(f'rec {rec_loss.item():.4f} vq {vq_loss.item():.4f} '
                                 f'used {int((hits_V > 0).sum())}/{V} reseeded {n_reseed}')
            hits_V.zero_()
        if args.vae_eval_every and (step + 1) % args.vae_eval_every == 0 and step + 1 < args.vae_steps:
            print(f'\n[vae] step {step + 1}: val {eval_vae(vae, va_img)}')
            vae.train()
        after_step(args, out_dir, 'vae', step + 1, lambda: dict(
            model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), hits_V=hits_V, wall=time.time() - t0))
    ship(args, out_dir, 'vae', vae, time.time() - t0, lambda: eval_vae(vae, va_img),
         dict(steps=args.vae_steps, batch=args.vae_bs, lr=args.vae_lr, loss=f'{args.vae_loss} + vq', **data_info(args)))
    with torch.no_grad():  # originals (top) over reconstructions (bottom), for a quick look
        x = data.to_signed(va_img[:16])
        rec = vae.img_to_reconstructed_img(x, last_one=True)
        save_image(F.interpolate(torch.cat([x, rec]).add(1).div(2), scale_factor=4, mode='nearest'),
                   out_dir / 'pretrain_vae_recon.png', nrow=16)


# ----------------------------------------------------------------------------------------------------------
# stage 2: VAR

@torch.no_grad()
def tokenize(vae, img_u8, bs=500):
    """All images (N, H, W, 3) uint8 tensor -> tokens (N, L) int64, scales concatenated."""
    return torch.from_numpy(features.encode_tokens(vae, img_u8.numpy(), batch_size=bs))


def cached_tokens(args, out_dir, vae, vae_sha, tr_img, va_img):
    """Tokens of the train and val images (tokenize), kept in out_dir/resume_var_tokens.pt until the VAR ships, so a
    resumed session skips re-tokenising (~6 min on one core); reused only for the same VQ-VAE and data."""
    path, key = resume_path(out_dir, 'var_tokens'), dict(vae_sha256=vae_sha, **data_info(args))
    ck = load_resume(args, out_dir, 'var_tokens')
    if ck and ck['key'] == key:
        print(f'[var] tokens from {path}')
        return ck['tr'].long(), ck['va'].long()
    tr_tok, va_tok = tokenize(vae, tr_img), tokenize(vae, va_img)
    data.atomic_save(dict(key=key, tr=tr_tok.short(), va=va_tok.short()), path)
    return tr_tok, va_tok


def var_input(var, tok_BL):
    """Teacher forcing: the tokens of all scales (B, L) -> the VAR's input (B, L - first_l, Cvae)."""
    return var.vae.quantize.idxBl_to_var_input(list(tok_BL.split([pn * pn for pn in var.patch_nums], dim=1)))


@torch.no_grad()
def var_token_acc(var, tok_NL, lab_N, bs=250):
    """Teacher-forced token accuracy per scale (no class dropout)."""
    var.eval()
    hit_L, n = torch.zeros(var.L), 0
    for i in range(0, len(tok_NL), bs):
        tok_BL = tok_NL[i:i + bs]
        hit_L += (var(lab_N[i:i + bs], var_input(var, tok_BL)).argmax(-1) == tok_BL).float().sum(0)
        n += len(tok_BL)
    return [round(hit_L[b:e].sum().item() / n / (e - b), 3) for b, e in var.begin_ends]


@torch.no_grad()
def swap_ema(var, ema_P):
    """Exchanges the VAR's weights with the EMA's (no-op without EMA); twice restores them exactly."""
    for p, e in zip(var.parameters(), ema_P or []):
        tmp = p.detach().clone()
        p.copy_(e)
        e.copy_(tmp)


def train_var(args, out_dir, tr_img, tr_lab, va_img, va_lab):
    torch.manual_seed(args.seed)
    vae, var = models.build_tiny(init=True, preset=args.preset)
    load_file(vae, out_dir, 'vae')  # var.vae *is* this object, so the VAR now sees the trained VQ-VAE
    vae_sha = data.sha256_file(out_dir / checkpoints.TINY_FILES['vae']).hexdigest()
    vae.eval().requires_grad_(False)
    init_sha = None
    if args.var_init:  # checked before tokenising; the EMA below starts from these weights too
        checkpoints.load_checked(var, checkpoints.load_state_dict_file(args.var_init), args.var_init,
                            f'a tiny VAR of the preset {args.preset} (--var_init)')
        init_sha = data.sha256_file(args.var_init).hexdigest()
    tr_tok, va_tok = cached_tokens(args, out_dir, vae, vae_sha, tr_img, va_img)
    print(f'[var] tokens: train {tuple(tr_tok.shape)}, val {tuple(va_tok.shape)}; '
          f'{sum(p.numel() for p in var.parameters()) / 1e6:.2f}M parameters')
    # no weight decay on norms/biases/embeddings-like 1-D params and the position tables (official VAR does the same)
    decays = lambda n, p: p.ndim >= 2 and 'pos_' not in n and 'emb' not in n
    params = list(var.named_parameters())
    opt = torch.optim.AdamW([dict(params=[p for n, p in params if decays(n, p)], weight_decay=args.var_wd),
                             dict(params=[p for n, p in params if not decays(n, p)], weight_decay=0.0)],
                            lr=args.var_lr, betas=(0.9, 0.95))
    ema_P = [p.detach().clone() for p in var.parameters()] if args.var_ema else None
    st = restore(args, out_dir, 'var', var, opt, step=0, wall=0.0, ema_loss=None, ema_acc=None, ema=None,
                 vae_sha256=vae_sha)
    if st['vae_sha256'] != vae_sha:
        raise SystemExit(f'{resume_path(out_dir, "var")} continues a VAR trained on another VQ-VAE than '
                         f'{out_dir / checkpoints.TINY_FILES["vae"]}; delete it (or run without --resume)')
    for e, e_ck in zip(ema_P or [], st['ema'] or []):
        e.copy_(e_ck)
    start, ema_loss, ema_acc, t0 = st['step'], st['ema_loss'], st['ema_acc'], time.time() - st['wall']
    var.train()  # class dropout on: the unconditional branch of CFG is learnt here
    pbar = data.progress(range(start, args.var_steps), initial=start, total=args.var_steps, desc='var', file=sys.stdout)
    for step in pbar:
        set_lr(opt, step, args.var_steps, args.var_lr, args.warmup)
        ids = batch_ids(step, len(tr_tok), args.var_bs, args.seed)
        tok_BL, lab_B = tr_tok[ids], tr_lab[ids]
        with torch.no_grad():
            x_BLCv = var_input(var, tok_BL)
        logits_BLV = var(lab_B, x_BLCv)
        loss = F.cross_entropy(logits_BLV.reshape(-1, var.V), tok_BL.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), args.var_clip)
        opt.step()
        if ema_P is not None:  # the usual warm-up: the EMA starts short and lengthens to --var_ema
            torch._foreach_lerp_(ema_P, [p.detach() for p in var.parameters()],
                                 1 - min(args.var_ema, (1 + step) / (10 + step)))
        acc = (logits_BLV.argmax(-1) == tok_BL).float().mean().item()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        pbar.set_postfix_str(f'loss {ema_loss:.3f} acc {ema_acc:.3f}')
        if (step + 1) % args.var_eval_every == 0 and step + 1 < args.var_steps:
            swap_ema(var, ema_P)  # the weights that will ship
            print(f'\n[var] step {step + 1}: loss {ema_loss:.3f}, '
                  f'val token acc per scale {var_token_acc(var, va_tok, va_lab)}')
            swap_ema(var, ema_P)
            var.train()
        after_step(args, out_dir, 'var', step + 1, lambda: dict(
            model=var.state_dict(), opt=opt.state_dict(), ema=ema_P, vae_sha256=vae_sha,
            wall=time.time() - t0, ema_loss=ema_loss, ema_acc=ema_acc))
    wall = time.time() - t0
    swap_ema(var, ema_P)
    n_tr = min(len(tr_tok), 2000)
    ship(args, out_dir, 'var', var, wall, lambda: dict(
        train_token_acc_per_scale=var_token_acc(var, tr_tok[:n_tr], tr_lab[:n_tr]),
        val_token_acc_per_scale=var_token_acc(var, va_tok, va_lab), final_train_loss=round(ema_loss, 4)),
        dict(steps=args.var_steps, batch=args.var_bs, lr=args.var_lr, weight_decay=args.var_wd, grad_clip=args.var_clip,
             ema=args.var_ema, vae_sha256=vae_sha, **data_info(args),
             **({'init_sha256': init_sha} if init_sha else {})))
    resume_path(out_dir, 'var_tokens').unlink(missing_ok=True)
    with torch.no_grad():  # 10 samples per class, a row per class, fixed seed (4x nearest)
        var.eval()
        img_B3HW = var.autoregressive_infer_cfg(100, torch.arange(10).repeat_interleave(10), g_seed=0, cfg=args.cfg,
                                                top_k=args.top_k, top_p=args.top_p)
        save_image(F.interpolate(img_B3HW, scale_factor=4, mode='nearest'), out_dir / 'pretrain_samples.png',
                   nrow=10, padding=2, pad_value=1.0)
    print(f'[var] samples (cfg {args.cfg}, top_k {args.top_k}, top_p {args.top_p}) -> {out_dir}/pretrain_samples.png')


# ----------------------------------------------------------------------------------------------------------
# stage 3: feature network

@torch.no_grad()
def featnet_acc(net, x_B3HW, lab_B, bs=250):
    net.eval()
    pred = torch.cat([features.vit_cls(net, x_B3HW[i:i + bs])[1].argmax(-1) for i in range(0, len(x_B3HW), bs)])
    return (pred == lab_B).float().mean().item()


def train_featnet(args, out_dir, va_img, va_lab):
    torch.manual_seed(args.seed)
    tr_img, tr_lab = shapes(args.fn_n_train, args.train_seed)
    net = models.build_featnet(args.preset)
    opt = torch.optim.AdamW(net.parameters(), lr=args.fn_lr, betas=(0.9, 0.999), weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    st = restore(args, out_dir, 'featnet', net, opt, gen, step=0, wall=0.0, ema_loss=None)
    start, ema_loss, t0 = st['step'], st['ema_loss'], time.time() - st['wall']
    net.train()
    pbar = data.progress(range(start, args.fn_steps), initial=start, total=args.fn_steps, desc='featnet',
                         file=sys.stdout)
    for step in pbar:
        set_lr(opt, step, args.fn_steps, args.fn_lr, args.warmup)
        ids = batch_ids(step, len(tr_img), args.fn_bs, args.seed)
        x_B3HW = data.to_signed(tr_img[ids])
        # mirror half the batch: every class is mirror-symmetric up to rotation, so labels stay right
        flip_B = torch.rand(len(ids), generator=gen) < 0.5
        x_B3HW = torch.where(flip_B[:, None, None, None], x_B3HW.flip(-1), x_B3HW)
        # [0, 1] with the ViT's mean / std, exactly as the projected discriminator feeds it
        loss = F.cross_entropy(net(models.vit_normalize(net, x_B3HW.add(1).div(2))), tr_lab[ids], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        pbar.set_postfix_str(f'loss {ema_loss:.3f}')
        after_step(args, out_dir, 'featnet', step + 1, lambda: dict(
            model=net.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), wall=time.time() - t0,
            ema_loss=ema_loss))
    ship(args, out_dir, 'featnet', net, time.time() - t0,
         lambda: dict(val_acc=round(featnet_acc(net, data.to_signed(va_img), va_lab), 4)),
         dict(steps=args.fn_steps, batch=args.fn_bs, lr=args.fn_lr, **data_info(args, train_images=args.fn_n_train)))


# stage 4: the judge

@torch.no_grad()
def judge_metrics(net, va_img, va_lab):
    """Held-out accuracy, and the FID of 1,000 fresh shapes (seed 7) against evaluate.py's reference (10,000 shapes,
    seed data.REF_SHAPES_SEED) on the judge's features: the floor of its FID at this sample count."""
    net.eval()
    acc = (torch.cat([net(data.to_signed(va_img[i:i + 500])).argmax(-1) for i in range(0, len(va_img), 500)]) == va_lab)
    fresh, _ = data.make_shapes(1000, seed=7)
    ref, _ = data.make_shapes(10000, seed=data.REF_SHAPES_SEED)
    stats = [iscs.feature_stats(features.judge_features(x, net, progress=False)[0]) for x in (fresh, ref)]
    return dict(val_acc=round(acc.float().mean().item(), 4), fid_1000_fresh_shapes=round(iscs.frechet_distance(*stats[0], *stats[1]), 3))


def train_judge(args, out_dir, va_img, va_lab):
    torch.manual_seed(args.seed)
    tr_img, tr_lab = shapes(args.judge_n_train, args.judge_data_seed)
    net = models.build_judge()
    opt = torch.optim.AdamW(net.parameters(), lr=args.judge_lr, betas=(0.9, 0.999), weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    st = restore(args, out_dir, 'judge', net, opt, gen, step=0, wall=0.0)
    start, t0 = st['step'], time.time() - st['wall']
    net.train()
    pbar = data.progress(range(start, args.judge_steps), initial=start, total=args.judge_steps, desc='judge', file=sys.stdout)
    for step in pbar:
        set_lr(opt, step, args.judge_steps, args.judge_lr, args.warmup)
        ids = batch_ids(step, len(tr_img), args.judge_bs, args.seed)
        x_B3HW = data.to_signed(tr_img[ids])
        flip_B = torch.rand(len(ids), generator=gen) < 0.5  # every class is mirror-symmetric
        x_B3HW = torch.where(flip_B[:, None, None, None], x_B3HW.flip(-1), x_B3HW)
        loss = F.cross_entropy(net(x_B3HW), tr_lab[ids], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pbar.set_postfix_str(f'loss {loss.item():.3f}')
        after_step(args, out_dir, 'judge', step + 1, lambda: dict(
            model=net.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), wall=time.time() - t0))
    ship(args, out_dir, 'judge', net, time.time() - t0, lambda: judge_metrics(net, va_img, va_lab),
         dict(steps=args.judge_steps, batch=args.judge_bs, lr=args.judge_lr,
              **data_info(args, train_images=args.judge_n_train, train_seed=args.judge_data_seed)))


@torch.no_grad()
def score_var_samples(args, out_dir):
    """How recognisable the VAR's samples are to the feature network: --score_n samples (balanced classes, seeds
    1, 2, ... per 250), all three files must exist. Written into the featnet entry of MANIFEST.json."""
    vae, var = models.build_tiny(preset=args.preset)
    load_file(vae, out_dir, 'vae')
    load_file(var, out_dir, 'var')
    vae.eval().requires_grad_(False)
    var.eval().requires_grad_(False)
    net = models.build_featnet(args.preset)
    load_file(net, out_dir, 'featnet')
    lab_N = torch.arange(args.score_n) % 10
    img_N3HW = torch.cat([var.autoregressive_infer_cfg(len(lab_B), lab_B, g_seed=1 + i, cfg=args.cfg, top_k=args.top_k,
                                                       top_p=args.top_p) for i, lab_B in enumerate(lab_N.split(250))])
    acc = round(featnet_acc(net, img_N3HW.mul(2).sub(1), lab_N), 4)
    print(f'[featnet] class accuracy on {len(lab_N)} VAR samples (cfg {args.cfg}): {acc}')
    settings = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, n=len(lab_N),
                    g_seeds='1 + i for samples 250 i .. 250 i + 249',
                    var_sha256=data.sha256_file(out_dir / checkpoints.TINY_FILES['var']).hexdigest())
    update_manifest(out_dir, lambda manifest: manifest.setdefault(checkpoints.TINY_FILES['featnet'], {}).setdefault(
        'metrics', {}).update(var_sample_acc=acc, var_sample_settings=settings))


def ship_to_weights(args, out_dir, names):
    """--ship: copies the named stage files and their MANIFEST.json entries into checkpoints.TINY_DIR, then checks that
    the shipped loaders accept them."""
    dest, entries = Path(checkpoints.TINY_DIR), json.loads((out_dir / 'MANIFEST.json').read_text())
    for n in names:
        name = checkpoints.TINY_FILES[n]
        data.atomic_save((out_dir / name).read_bytes(), dest / name)
        update_manifest(dest, lambda manifest: manifest.update({name: entries[name]}))
        print(f'[ship] {out_dir / name} -> {dest / name}')
    if args.preset == models.TINY_PRESET:  # the shipped loaders must accept what was written
        if {'vae', 'var'} & set(names):
            checkpoints.load_tiny()
        for n in {'featnet', 'judge'} & set(names):
            checkpoints.load_eval_net(n)
        print(f'[check] the shipped loaders load {names}')


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # every MANIFEST entry's command, less the session flags (--resume, --stop_after N): a resumed run records the same
    args.command = re.sub(r' --resume\b| --stop_after[ =]\S+', '', ' '.join(['python pretrain_tiny.py', *argv]))
    _ckpt.update(last=time.time(), steps=0)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    if out_dir.resolve() == Path(checkpoints.TINY_DIR).resolve():
        raise SystemExit(f'--out_dir {out_dir} is the folder of the shipped tiny models: train into a run folder and '
                         f'add --ship to copy the results there. Nothing was written.')
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages = ['vae', 'var', 'featnet', 'judge'] if args.stage == 'all' else [args.stage]
    if not args.resume:  # a fresh run: no stale checkpoint may be resumed from later
        for s in stages:
            resume_path(out_dir, s).unlink(missing_ok=True)
    tr_img, tr_lab = shapes(args.n_train, args.train_seed) if args.stage in ('all', 'vae', 'var') else (None, None)
    va_img, va_lab = shapes(args.n_val, args.val_seed)  # the feature network and the judge make their own training sets
    if 'vae' in stages and not stage_done(args, out_dir, 'vae'):
        train_vae(args, out_dir, tr_img, va_img)
    if 'var' in stages and not stage_done(args, out_dir, 'var'):
        train_var(args, out_dir, tr_img, tr_lab, va_img, va_lab)
    if 'featnet' in stages and not stage_done(args, out_dir, 'featnet'):
        train_featnet(args, out_dir, va_img, va_lab)
    if 'judge' in stages and not stage_done(args, out_dir, 'judge'):
        train_judge(args, out_dir, va_img, va_lab)
    if all((out_dir / checkpoints.TINY_FILES[n]).is_file() for n in ('vae', 'var', 'featnet')):
        score_var_samples(args, out_dir)
    if args.ship:
        ship_to_weights(args, out_dir, [n for n in stages if (out_dir / checkpoints.TINY_FILES[n]).is_file()])
    print(f'[done] {(time.time() - t0) / 60:.1f} min')


if __name__ == '__main__':
    main()
