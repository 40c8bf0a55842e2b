"""AID-VAR training: a guidance injector for a frozen VAR, trained against a projected discriminator D.

    accelerate launch train_injector.py --depth 24 --data_path /data/imagenet      # 8 GPUs, paper settings
    python train_injector.py                                                       # tiny preset, CPU, minutes

One step (the paper's "dynamic refresh"): the VAR with the injector's guidance makes fakes at a random scale k,
soft-decoded to RGB; D takes a hinge step on real vs fake (+ lazy R1), then the injector a step on
-D(fake) + lambda * CE. The VAR, the VQ-VAE and D's backbone never change. Writes OUT_DIR/last.pt, injector.safetensors,
log.jsonl and config.json. Why gradients are synced by hand, mixed precision, logging: docs/training.md.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torchvision.utils import save_image

import checkpoints
import data
import features
import iscs
import models
import soft_decode

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--depth', type=int, default=None, help='16/20/24/30: official VAR-d{depth}; default: the tiny preset')
p.add_argument('--data_path', type=str, default=None,
               help='ImageNet root with train/ (real models), or an npz of images + labels for either preset')
p.add_argument('--ckpt_dir', type=str, default='checkpoints',
               help='folder of the official VAR / VQ-VAE checkpoints (real models; downloaded from the HF hub if missing)')
p.add_argument('--dino_ckpt', type=str, default=None, help='local DINO ViT-S/16 weights (else the HF hub cache)')
p.add_argument('--random_init', action='store_true', help='random VAR/VQ-VAE/backbone weights (tests, benchmarks)')
p.add_argument('--inject', choices=['input', 'head'], default='input',
               help='where w * g is added: the token features of scale k (input) or the last hidden state (head)')
p.add_argument('--context', choices=['teacher', 'rollout'], default=None,
               help='prefix tokens of the guided scale: ground truth (teacher) or sampled by the VAR + injector (rollout)')
p.add_argument('--decode', choices=list(soft_decode.MODES), default=None,
               help='relaxation of the guided scale for D: probabilities, Gumbel-softmax or straight-through (soft_decode.py)')
p.add_argument('--rao_k', type=int, default=16, help='--decode rao: conditional Gumbel draws averaged per token')
p.add_argument('--g_draws', type=int, default=None, help='relaxed samples of the guided scale per image in the injector '
               'loss, sharing one VAR pass (1: the paper; the loss is their mean)')
p.add_argument('--fake_cfg', type=float, default=None, help="CFG of the fakes' teacher-forced logits, (1 + t) cond - t "
               "uncond with t = fake_cfg * k / (K - 1) as in sampling (0: none, the conditional logits)")
p.add_argument('--real_decode', choices=['soft', 'hard'], default=None,
               help="real images for D: 'soft' (paper §3.2: the quantizer's soft labels, as soft as the fakes) or one-hot")
p.add_argument('--disc_norm', choices=list(models.DISC_NORMS), default=None,
               help="D heads' norm (none: no batch norm, the tiny preset's choice: docs/tiny_preset.md)")
p.add_argument('--disc_aug', choices=list(models.DISC_AUGS), default=None, help='DiffAugment on real and fake images in D')
p.add_argument('--broadcast', action='store_true', help='ablation: one guidance vector per scale, not a map')
p.add_argument('--lambda_rec', type=float, default=0.01, help='weight of the token cross-entropy (eq. 7)')
p.add_argument('--lambda_adv', type=float, default=1.0, help='weight of the adversarial term -D(fake) (0: CE only, no D)')
p.add_argument('--plant', choices=list(models.PLANT_STRENGTH), default=None,
               help='positive control: plant a known error in the frozen VAR (models.plant_error) before training')
p.add_argument('--w_train', type=float, default=None, help='guidance weight during training')
p.add_argument('--lr_g', type=float, default=None, help='injector learning rate (AdamW)')
p.add_argument('--lr_d', type=float, default=None, help='discriminator heads learning rate (AdamW)')
p.add_argument('--r1_gamma', type=float, default=None, help='R1 weight on real images; 0 turns R1 off')
p.add_argument('--r1_every', type=int, default=16, help='lazy R1: every this many steps, scaled by it')
p.add_argument('--grad_clip', type=float, default=0.5, help='gradient-norm clip of the injector and of the D heads')
p.add_argument('--global_batch_size', type=int, default=None, help='images per step over all processes')
p.add_argument('--epochs', type=float, default=None, help='training length in epochs (1 when neither this nor --max_steps is given)')
p.add_argument('--max_steps', type=int, default=None, help='overrides --epochs')
p.add_argument('--cfg', type=float, default=1.5, help='CFG of rollouts and grids')
p.add_argument('--top_k', type=int, default=None, help='top-k of rollouts and grids (0: off)')
p.add_argument('--top_p', type=float, default=None, help='top-p of rollouts and grids (0: off)')
p.add_argument('--out_dir', type=str, default='runs/injector', help='run folder: last.pt (full state), injector.safetensors, '
               'log.jsonl, config.json, grids; refused if it holds an earlier run unless --resume is given')
p.add_argument('--config', type=str, default=None, help="a run's config.json: its flags become this run's defaults (flags "
               "given here win), e.g. `--config runs/x/config.json --out_dir runs/y` repeats run x")
p.add_argument('--resume', type=str, default=None, help="a last.pt, or 'auto' for OUT_DIR/last.pt if it exists (else a "
               "fresh start); log.jsonl is cut back to the checkpoint's step")
p.add_argument('--val_n', type=int, default=None, help='validation: paired samples per w (guided vs w = 0) at the end '
               'and every --val_every steps; 0: none (the injector then carries no verdict)')
p.add_argument('--val_w', type=float, nargs='+', default=None, help='validation: guided weights (default: w_train)')
p.add_argument('--val_seed', type=int, default=999, help='validation sampling seed (keep it apart from evaluation seeds)')
p.add_argument('--val_at', choices=['end', 'ckpt'], default='end', help="validate at the end only, or at every "
               "checkpoint too (then the best-validated weights are kept as injector_best.safetensors)")
p.add_argument('--val_net', choices=['judge', 'featnet', 'inception'], default=None,
               help="validation FID network: tiny preset 'judge' (a CNN D never saw; 'featnet' is D's backbone), real "
                    "models 'inception'")
p.add_argument('--val_ref', type=str, default=None, help="validation reference (evaluate.py's --ref): tiny preset "
               "default 'shapes' (10,000 fresh shapes); real models: the ADM batch, a real-image npz or a folder")
p.add_argument('--disc_ckpt', type=str, default=None, help='D heads to start from (train_disc_probe.py output)')
p.add_argument('--seed', type=int, default=0, help='seeds the fresh weights, the data order and every step')
p.add_argument('--sample_every', type=int, default=None, help='sample grid interval (0: never)')
p.add_argument('--ckpt_every', type=int, default=None, help='checkpoint interval in steps (and at the end)')
p.add_argument('--mixed_precision', choices=['no', 'bf16'], default=None,
               help='default: what accelerate launch / accelerate config set, else bf16 on GPU and no on CPU. No fp16: '
                    'the backward passes are hand-written (no accelerator.backward), so fp16 gradients would get no loss '
                    'scaling and could underflow')
p.add_argument('--num_workers', type=int, default=None, help='DataLoader processes per GPU (ImageNet; the tiny preset '
               'needs none); default: the cores this process may use / the processes on this machine, at most 8')
p.add_argument('--n_tiny', type=int, default=20000, help='tiny preset: number of training shapes')
p.add_argument('--report_to', choices=['none', 'tensorboard', 'wandb'], default='none', help="also log every step through "
               "accelerate's trackers (tensorboard: OUT_DIR/aid-var; wandb: project aid-var); log.jsonl and config.json "
               "are always written")
models.show_defaults(p)  # flags left at None take models.PRESETS' value (resolve_args)

GRID_CLASSES_IMAGENET = (207, 360, 387, 974, 88, 979, 417, 279)  # the VAR demo's classes
TAU = 1.0  # softmax / Gumbel temperature of the relaxed decode (the paper's; no experiment here varied it)
RUN_FILES = ('last.pt', 'injector.safetensors', 'injector.pt')  # what an earlier run leaves in its out_dir (and a fresh start would overwrite)
RESUME_KEYS = ('injector', 'disc_heads', 'opt_g', 'opt_d', 'step', 'args')
RESUME_MUST_MATCH = ('depth', 'inject', 'context', 'decode', 'broadcast', 'global_batch_size', 'seed', 'disc_norm', 'disc_aug',
                     'real_decode', 'plant')
TRACKER_PROJECT = 'aid-var'


def resolve_args(argv=None):
    """(args, the preset of --depth): flags checked, the ones left at None filled in from the preset."""
    args = p.parse_args(argv)
    if args.config:  # its values as defaults: argparse fills only what the namespace lacks, so given flags win
        args = p.parse_args(argv, namespace=argparse.Namespace(**read_config(args.config)))
    preset = models.apply_preset(args)
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    positive = dict(global_batch_size=args.global_batch_size, max_steps=args.max_steps, epochs=args.epochs,
                    ckpt_every=args.ckpt_every)
    bad = [f'--{k} {v}' for k, v in positive.items() if v is not None and not v > 0]
    bad += [f'--{k} {v}' for k, v in dict(lr_g=args.lr_g, lr_d=args.lr_d).items() if not v >= 0]
    if bad:
        raise SystemExit(f'{", ".join(bad)}: batch size, steps, epochs and checkpoint interval must be > 0 (0 steps would '
                         f'write an untrained injector), learning rates >= 0.')
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise SystemExit(f'--out_dir {args.out_dir} is a file, not a folder.')
    if args.g_draws < 1 or args.rao_k < 1 or args.val_n < 0 or args.fake_cfg < 0:
        raise SystemExit(f'--g_draws and --rao_k must be >= 1, --val_n and --fake_cfg >= 0; got {args.g_draws}, '
                         f'{args.rao_k}, {args.val_n}, {args.fake_cfg}')
    args.val_w = [args.w_train] if args.val_w is None else args.val_w
    if args.val_n and (args.val_net == 'inception') == preset.tiny:
        raise SystemExit(f"--val_net {args.val_net} does not fit the {preset.label}: 'judge' or 'featnet' for the tiny "
                         f"preset, 'inception' for the real models")
    if args.val_n and not preset.tiny and args.val_ref is None:
        raise SystemExit('--val_n on the real models needs --val_ref: the ADM batch VIRTUAL_imagenet256_labeled.npz, a '
                         'real-image npz or an image folder (or --val_n 0: no validation, and no verdict)')
    return args, preset


def loader_workers(flag) -> int:
    """--num_workers, else the cores this process may use shared by the processes on this machine, 1 to 8."""
    if flag is not None:
        return flag
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))  # LOCAL_WORLD_SIZE: accelerate / torchrun


def read_config(path) -> dict:
    """The flags of a config.json written by train_injector.py (its other keys, and --resume / --config, left out)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f'--config {path}: not a readable config.json ({data.first_line(e)})') from None
    if not isinstance(cfg, dict) or 'global_batch_size' not in cfg:
        raise SystemExit(f'--config {path}: not a train_injector.py config.json (no global_batch_size)')
    flags = {a.dest for a in p._actions} - {'help', 'resume', 'config'}
    return {k: v for k, v in cfg.items() if k in flags}


def build_everything(args, preset, device):
    """Frozen VQ-VAE + VAR (+ the planted error), frozen D backbone with fresh heads, fresh injector (identical on
    every rank)."""
    vae, var = checkpoints.load_frozen(preset, args.ckpt_dir, device, args.random_init, args.seed, args.plant)
    backbone = checkpoints.load_feature_net(preset, not args.random_init, args.dino_ckpt)
    torch.manual_seed(args.seed)  # the fresh heads and injector are the same on every rank
    D = models.ProjectedDiscriminator(backbone, num_classes=var.num_classes, norm=args.disc_norm,
                                      diffaug=args.disc_aug).to(device)
    if args.disc_ckpt:
        checkpoints.load_disc_heads(D, args.disc_ckpt, args.disc_norm)
    injector = models.GuidanceInjector(var.C, var.patch_nums, broadcast=args.broadcast).to(device)
    return vae, var, D, injector


# ----------------------------------------------------------------------------------------------------------
# The training step

def guided_logits(var, injector, labels_B, ctx_idx, w, inject, cfg=0.0):
    """Teacher-forced VAR pass on context tokens with the injector's guidance. Returns (logits_BLV, g_BLC,
    cond_logits_BLV): with cfg > 0 logits_BLV are the sampler's CFG mix of this pass and one with the null class
    (both guided), cond_logits_BLV the conditional half; with cfg 0 both are the conditional logits."""
    B = labels_B.shape[0]
    with torch.no_grad():
        x_BLCv = var.vae.quantize.idxBl_to_var_input(ctx_idx)
    g_BLC = models.teacher_guidance(var, injector, ctx_idx)
    add_BLC, labels = w * g_BLC, labels_B
    if cfg > 0:  # as autoregressive_infer_cfg: the null class as the second half, the same guidance on both
        labels, x_BLCv, add_BLC = torch.cat([labels_B, torch.full_like(labels_B, var.num_classes)]), x_BLCv.repeat(2, 1, 1), add_BLC.repeat(2, 1, 1)
    if inject == 'input':
        h_BLC, cond_BD = var.forward_hidden(labels, x_BLCv, input_add_BLC=add_BLC)
    else:  # the VAR body runs without a graph; only head_nm + head carry gradient
        with torch.no_grad():
            h_BLC, cond_BD = var.forward_hidden(labels, x_BLCv)
        h_BLC = models.at_least_fp32(h_BLC) + add_BLC
    logits_BLV = var.get_logits(h_BLC, cond_BD)
    if cfg == 0:
        return logits_BLV, g_BLC, logits_BLV
    t_L = torch.cat([torch.full((pn * pn,), cfg * si / (len(var.patch_nums) - 1)) for si, pn in enumerate(var.patch_nums)])
    t_1L1 = t_L.to(logits_BLV)[None, :, None]
    return (1 + t_1L1) * logits_BLV[:B] - t_1L1 * logits_BLV[B:], g_BLC, logits_BLV[:B]


# ----------------------------------------------------------------------------------------------------------
# Validation: does the guided VAR beat w = 0 on a held-out sampling seed? (a selection step, not an evaluation)

def validation_setup(args, preset, device):
    """(features: uint8 images (N, H, W, 3) -> (N, D) float64, reference (mu, sigma), a description)."""
    net = checkpoints.load_eval_net(args.val_net, args.random_init, args.ckpt_dir, device)
    feats = lambda x: features.extract(args.val_net, x, net, device=device, progress=False)[0]
    ref = data.load_reference(args.val_ref or 'shapes', preset.resolution, 10000)
    if args.val_net == 'inception' and ref['stats'] is not None and ref['stats']['mu'].shape == (2048,):
        stats = ref['stats']['mu'], ref['stats']['sigma']
    else:
        stats = iscs.feature_stats(feats(ref['images']))
    return feats, stats, f'{args.val_net} FID against {ref["desc"]}'


@torch.no_grad()
def validate(var, injector, args, setup, step, device, autocast, n_boot=200):
    """FIDs of args.val_n samples at w = 0 and at each --val_w, paired (the same labels and batch seeds from --val_seed),
    with paired-bootstrap 95% intervals of each change. Verdict: 'helps' (an interval below 0), 'harms' (every interval
    above 0) or 'no measurable effect'; validated_w: the helping w of lowest FID, else 0."""
    feats_fn, (mu, sigma), desc = setup
    labels_N = torch.arange(args.val_n, device=device) % var.num_classes
    hook, was_training = models.make_guidance_hook(var, injector), injector.training
    injector.eval()
    feats = []
    for w in [0.0, *args.val_w]:
        imgs = []
        for b, labels_B in enumerate(labels_N.split(100)):
            with autocast():
                x = var.autoregressive_infer_cfg(len(labels_B), labels_B, g_seed=data.derived_seed(args.val_seed, b),
                                                 cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, inject=args.inject,
                                                 guidance_hook=hook if w else None, guidance_w=w)
            imgs.append(data.to_uint8(x))  # as sample.py writes
        feats.append(feats_fn(np.concatenate(imgs)))
    injector.train(was_training)
    fids = [iscs.frechet_distance(*iscs.feature_stats(f), mu, sigma) for f in feats]
    rows = [dict(w=w, FID=fid, change=fid - fids[0], ci95=bs['ci95']) for w, fid, bs in
            zip(args.val_w, fids[1:], iscs.paired_fid_bootstrap(feats, mu, sigma, n_boot))]
    helps = [r for r in rows if r['ci95'][1] < 0]
    verdict = 'helps' if helps else 'harms' if all(r['ci95'][0] > 0 for r in rows) else 'no measurable effect'
    return dict(step=step, verdict=verdict, validated_w=min(helps, key=lambda r: r['FID'])['w'] if helps else 0.0,
                FID_w0=fids[0], rows=rows, n=args.val_n, seed=args.val_seed, net=args.val_net, desc=desc)


def best_validation(history):
    """The validation of lowest guided FID (any w) among a run's validations."""
    return min(history, key=lambda v: min(r['FID'] for r in v['rows']))


def verdict_line(val):
    """One line: does the guidance help, by how much, where to sample."""
    r = min(val['rows'], key=lambda r: r['FID'])
    word = {'helps': 'helps', 'harms': 'HARMS', 'no measurable effect': 'does not help measurably'}[val['verdict']]
    return (f'validation at step {val["step"]} ({val["desc"]}; {val["n"]} paired samples per w, seed {val["seed"]}): '
            f'guidance {word}: FID {val["FID_w0"]:.2f} -> {r["FID"]:.2f} at w {r["w"]:g} ({r["change"]:+.2f}, 95% '
            f'[{r["ci95"][0]:+.2f}, {r["ci95"][1]:+.2f}]); validated w = {val["validated_w"]:g}')


def rank_mean(x, world):
    """x averaged over ranks, in place."""
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def sync_grads(params, world):
    """Average gradients over ranks (one flat all-reduce). By hand, not DDP: the injector step runs D with
    D.requires_grad_(False), which DDP only takes with find_unused_parameters (as StyleGAN-T; docs/training.md)."""
    if world == 1:
        return
    params = [q for q in params if q.requires_grad]
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    flat = rank_mean(torch.cat([q.grad.flatten() for q in params]), world)
    for q, g in zip(params, flat.split([q.numel() for q in params])):
        q.grad.copy_(g.view_as(q))


def train_step(step, img_B3HW, labels_B, vae, var, D, injector, opt_d, opt_g, args, real_temps, accelerator, check):
    """One dynamic-refresh step (D update on the current fakes, then the injector update). Returns the log record.

    real_temps: the soft reals' per-scale temperatures (real_temperatures). check(step, {name: value}) is called on
    the rank-averaged losses before each update (it stops on NaN/Inf).
    With --lambda_adv 0 (CE only: an arm of the positive control) no fakes are made and D is not trained.
    """
    device, world, per_device, SN = accelerator.device, accelerator.num_processes, img_B3HW.shape[0], len(var.patch_nums)
    t0 = time.perf_counter()
    # all randomness of a step (scales, DiffAugment, Gumbel noise, rollouts) derives from (seed, step, rank)
    torch.manual_seed((args.seed * 1_000_003 + step) * 64 + accelerator.process_index)
    img_B3HW, labels_B = img_B3HW.to(device, non_blocking=True), labels_B.to(device, non_blocking=True)
    use_d = args.lambda_adv > 0
    with torch.no_grad():  # tokenised in float32, outside autocast, as the official VAR trainer does
        if args.real_decode == 'soft' and use_d:
            real_probs, gt_idx = soft_decode.real_soft_labels(vae, img_B3HW.float(), real_temps)
        else:
            real_probs, gt_idx = None, vae.img_to_idxBl(img_B3HW.float())
    zero = torch.zeros((), device=device)
    loss_D, r1, out_real, out_fake, gn_d = zero, zero, zero, zero, 0.0
    with accelerator.autocast():
        ctx_idx = gt_idx
        if use_d and args.context == 'rollout':
            injector.eval()
            with torch.no_grad():
                _, ctx_idx = var.autoregressive_infer_cfg(per_device, labels_B, cfg=args.cfg, top_k=args.top_k,
                                                          top_p=args.top_p, guidance_hook=models.make_guidance_hook(var, injector),
                                                          guidance_w=args.w_train, inject=args.inject, ret_idx=True)
            injector.train()
        logits_BLV, g_BLC, cond_logits = guided_logits(var, injector, labels_B, ctx_idx, args.w_train, args.inject,
                                                       args.fake_cfg if use_d else 0.0)
        if use_d:
            scales = torch.randint(1, SN, (per_device,), device=device)
            fake, real, labs = soft_decode.disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, args.decode,
                                                       TAU, real_probs, args.rao_k)
            # --- D step on real vs the current fakes
            D.requires_grad_(True)
            out_real, out_fake = D(real, labs), D(fake.detach(), labs)
            loss_D = models.hinge_d_loss(out_real, out_fake)
            if args.r1_gamma > 0 and step % args.r1_every == 0:  # lazy R1, scaled by its interval
                real_r = real.detach().float().requires_grad_(True)
                # R1 of D's per-image mean logit (the sum over its ~5T patch logits would scale R1 by ~(5T)^2)
                grad, = torch.autograd.grad(D(real_r, labs, double_backward=True).mean(1).sum(), real_r, create_graph=True)
                r1 = grad.square().sum([1, 2, 3]).mean()
                loss_D = loss_D + args.r1_gamma / 2 * r1 * args.r1_every

        # the token CE is always on a teacher-forced pass
        logits_ce = cond_logits if ctx_idx is gt_idx else guided_logits(var, injector, labels_B, gt_idx, args.w_train, args.inject)[0]
        loss_ce = F.cross_entropy(logits_ce.reshape(-1, var.V), torch.cat(gt_idx, 1).reshape(-1))

    stats = dict(loss_D=loss_D.detach().float(), r1=r1.detach().float(), loss_CE=loss_ce.detach().float(),
                 acc_real=(out_real > 0).float().mean(), acc_fake=(out_fake < 0).float().mean())
    stats = dict(zip(stats, rank_mean(torch.stack(list(stats.values())), world).tolist()))  # one all-reduce
    check(step + 1, {'loss_D': stats['loss_D'], 'R1': stats['r1'], 'loss_CE': stats['loss_CE']})
    if use_d:
        opt_d.zero_grad(set_to_none=True)
        loss_D.backward()
        sync_grads(list(D.head_parameters()), world)
        gn_d = torch.nn.utils.clip_grad_norm_(list(D.head_parameters()), args.grad_clip)
        opt_d.step()

    # --- injector step against the updated D
    D.requires_grad_(False)
    with accelerator.autocast():
        if use_d and args.g_draws > 1:  # more relaxed samples of the same logits: a lower-variance gradient
            more, more_labs = soft_decode.disc_fakes(var, logits_BLV, ctx_idx, labels_B, scales, args.decode, TAU,
                                                     args.g_draws - 1, args.rao_k)
            fake, labs = torch.cat([fake, more]), torch.cat([labs, more_labs])
        loss_adv = -D(fake, labs).mean() if use_d else zero
        loss_injector = args.lambda_adv * loss_adv + args.lambda_rec * loss_ce
    adv = rank_mean(loss_adv.detach().float(), world)
    check(step + 1, {'loss_adv': adv.item()})
    opt_g.zero_grad(set_to_none=True)
    loss_injector.backward()
    sync_grads(list(injector.parameters()), world)
    gn_g = torch.nn.utils.clip_grad_norm_(list(injector.parameters()), args.grad_clip)
    opt_g.step()

    g_norm = [g_BLC[:, bg:ed].detach().float().norm(dim=-1).mean().item() for bg, ed in var.begin_ends[1:]]
    return dict(step=step + 1, loss_D=stats['loss_D'], r1=stats['r1'], loss_adv=adv.item(), loss_CE=stats['loss_CE'],
                acc_real=stats['acc_real'], acc_fake=stats['acc_fake'], grad_norm_G=float(gn_g), grad_norm_D=float(gn_d),
                g_norm_per_scale=g_norm, img_per_s=per_device * world / (time.perf_counter() - t0))


def real_temperatures(args, dataset, var, device, log=print, n=64):
    """Per-scale temperatures of the soft reals, matched to the frozen VAR's softness on n fixed training images."""
    if args.real_decode != 'soft':
        return None
    n = min(n, len(dataset))  # a small debugging folder calibrates on what it has
    log(f'[AID-VAR] matching the soft reals\' temperatures to the VAR on {n} training images (one teacher-forced pass)')
    img_B3HW, labels_B = next(data.epoch_batches(dataset, 0, 0, n, 0, 1, args.seed, 0))
    temps = soft_decode.matched_real_temperatures(var, img_B3HW.to(device).float(), labels_B.to(device), TAU)
    return [round(t, 6) for t in temps]


@torch.no_grad()
def sample_grid(var, injector, args, path):
    """Baseline (w=0) and guided (w=w_train) samples from the same seeds, one row each."""
    labels = torch.tensor(GRID_CLASSES_IMAGENET if var.num_classes == 1000 else list(range(var.num_classes)),
                          device=var.lvl_1L.device)
    kw = dict(g_seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    base = var.autoregressive_infer_cfg(len(labels), labels, **kw)
    guided = var.autoregressive_infer_cfg(len(labels), labels, guidance_hook=models.make_guidance_hook(var, injector),
                                          guidance_w=args.w_train, inject=args.inject, **kw)
    save_image(torch.cat([base, guided]).float(), path, nrow=len(labels), padding=1)


# ----------------------------------------------------------------------------------------------------------
# The run: accelerator, resume, checkpoints, logs

def resolve_mixed_precision(flag):
    """Accelerator's mixed_precision: the flag when given; None (accelerate's own choice) when accelerate launch /
    accelerate config set ACCELERATE_MIXED_PRECISION; else bf16 on GPU, no on CPU. fp16 is refused."""
    env = os.environ.get('ACCELERATE_MIXED_PRECISION')
    if (flag or env) == 'fp16':
        raise SystemExit('[AID-VAR] fp16 mixed precision is not supported for training (it came from '
                         f'{"--mixed_precision" if flag else "accelerate launch / accelerate config"}): the backward passes '
                         'bypass loss scaling, so fp16 gradients could underflow. Use bf16 (--mixed_precision bf16) or no.')
    if flag:
        return flag
    return None if env else 'bf16' if torch.cuda.is_available() else 'no'


def make_accelerator(args):
    mp = resolve_mixed_precision(args.mixed_precision)
    kw = {} if mp is None else dict(mixed_precision=mp)
    if args.report_to != 'none':
        try:
            __import__(args.report_to)
        except ImportError:
            raise SystemExit(f'--report_to {args.report_to} needs the {args.report_to} package: pip install '
                             f'{args.report_to} (or --report_to none; log.jsonl is always written).') from None
        kw.update(log_with=args.report_to, project_dir=args.out_dir)
    # cpu=True on a GPU-less machine makes torchrun-style launches (accelerate launch --multi_gpu) use gloo on the CPU
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **kw)
    if accelerator.mixed_precision == 'fp16':
        raise SystemExit('[AID-VAR] fp16 mixed precision is not supported for training (the backward passes bypass '
                         'loss scaling); use bf16 or no.')
    return accelerator


def load_resume(args, out_dir: Path, accelerator):
    """(checkpoint, its path) to resume from, or (None, None) for a fresh start. Decided on the main process: one
    decision for all ranks, and a rank that cannot see the file stops every rank with one message instead of leaving
    them waiting in a collective. One-line SystemExit for a run folder that holds a run without --resume, and for a
    missing, foreign or unfitting checkpoint."""
    error, path = None, None  # decided on the main process
    if accelerator.is_main_process and args.resume is None:
        log = out_dir / 'log.jsonl'
        held = [f for f in RUN_FILES if (out_dir / f).is_file()] + (['log.jsonl'] if log.is_file() and log.stat().st_size else [])
        if held:
            error = (f'[AID-VAR] {out_dir} already holds a run ({", ".join(held)}); continue it with --resume auto, or '
                     f'choose another --out_dir. Nothing was overwritten.')
    elif accelerator.is_main_process:
        found = out_dir / 'last.pt' if args.resume == 'auto' else Path(args.resume)
        if found.is_file():
            path = str(found)
        elif args.resume != 'auto':
            error = f"[AID-VAR] --resume {found}: no such file (give the last.pt of a run, or --resume auto)."
    box = [(error, path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    error, path = box[0]
    if error:
        raise SystemExit(error)
    if path is None:
        return None, None
    path = Path(path)
    if accelerator.num_processes > 1:
        blind = [r for r, ok in gather_object([(accelerator.process_index, path.is_file())]) if not ok]
        if blind:
            raise SystemExit(f'[AID-VAR] --resume {args.resume}: the main process resumes from {path}, but rank(s) '
                             f'{blind} cannot see that file. Put --out_dir on a file system every node shares, or copy '
                             f'the checkpoint to the same path on every node.')
    if path.suffix == '.safetensors':
        raise SystemExit(f'[AID-VAR] --resume {path} is an injector file (weights only, no optimiser state or step), '
                         f'not a training checkpoint: give the last.pt that train_injector.py writes beside it.')
    ck = checkpoints.torch_load(path, 'checkpoint', 'Give --resume the last.pt of a run.')
    is_dict = isinstance(ck, dict)
    if not (is_dict and all(k in ck for k in RESUME_KEYS) and isinstance(ck['args'], dict)):
        if is_dict and 'meta' in ck and 'state_dict' in ck:
            what = 'an injector file (weights only, no optimiser state or step)'
        elif is_dict and ck and all(torch.is_tensor(v) for v in ck.values()):
            what = checkpoints.describe_state_dict(ck)
        else:
            what = f'a {type(ck).__name__}' + (f' with keys {sorted(map(str, ck))[:6]}' if is_dict else '')
        raise SystemExit(f'[AID-VAR] --resume {path} is {what}, not a training checkpoint: give the last.pt that '
                         f'train_injector.py writes beside injector.safetensors.')
    for k in RESUME_MUST_MATCH:
        if ck['args'].get(k) != getattr(args, k):
            raise SystemExit(f'[AID-VAR] --resume {path}: it was trained with --{k} {ck["args"].get(k)}, now --{k} '
                             f'{getattr(args, k)}.')
    return ck, path


def kept_log_rows(path: Path, step: int) -> str:
    """The rows of log.jsonl up to `step` (a resume repeats the steps after its checkpoint; a half-written last line
    of a killed run goes too)."""
    def kept(line):
        try:
            return json.loads(line)['step'] <= step
        except (ValueError, KeyError, TypeError):
            return False
    return ''.join(line + '\n' for line in path.read_text().splitlines() if kept(line)) if path.is_file() else ''


def tracker_values(d: dict) -> dict:
    """A flat {name: int / float / str / bool} for trackers: lists become name_0, name_1...; None becomes 'None'."""
    out = {}
    for k, v in d.items():
        out.update({f'{k}_{i}': x for i, x in enumerate(v)} if isinstance(v, (list, tuple)) else {k: 'None' if v is None else v})
    return out


def main(argv=None):
    args, preset = resolve_args(argv)
    accelerator = make_accelerator(args)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir = Path(args.out_dir)
    ck, resume = load_resume(args, out_dir, accelerator)  # before anything is written or loaded
    changed = [f'--{k} {v} -> {getattr(args, k)}' for k, v in (ck or {}).get('args', {}).items()
               if k != 'resume' and hasattr(args, k) and getattr(args, k) != v]
    if changed:
        accelerator.print(f'[AID-VAR] --resume {resume}: continuing with settings that differ from the checkpoint\'s: '
                          f'{", ".join(changed)}')

    dataset = data.build_train_data(args.depth, args.data_path, n_tiny=args.n_tiny)
    if args.global_batch_size % world:
        raise SystemExit(f'--global_batch_size {args.global_batch_size} is not divisible by {world} processes.')
    per_device = args.global_batch_size // world
    num_workers = loader_workers(args.num_workers)
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f'The training set has {len(dataset)} images, fewer than one global batch ({args.global_batch_size}).')
    total_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)

    with accelerator.main_process_first():  # downloads (checkpoints, DINO) happen once, the other ranks then read the cache
        vae, var, D, injector = build_everything(args, preset, device)
    # into the injector's metadata (sample.py warns when used on another VAR); only the main process writes it
    var_sha256 = checkpoints.weights_sha256(var) if accelerator.is_main_process else None
    real_temps = real_temperatures(args, dataset, var, device, accelerator.print)
    opt_g = torch.optim.AdamW(injector.parameters(), lr=args.lr_g, betas=(0.9, 0.999), weight_decay=1e-5)
    opt_d = torch.optim.AdamW(D.head_parameters(), lr=args.lr_d, betas=(0.9, 0.999), weight_decay=1e-5)
    ckpt_path = out_dir / 'last.pt'
    step, last_ckpt_step = 0, None
    if ck is not None:
        for what, load in dict(injector=injector.load_state_dict, disc_heads=D.load_heads_state_dict,
                               opt_g=opt_g.load_state_dict, opt_d=opt_d.load_state_dict).items():
            try:
                load(ck[what])
            except (RuntimeError, KeyError, ValueError) as e:  # shapes / keys of another model
                raise SystemExit(f'[AID-VAR] --resume {resume}: its {what} does not fit this run ({data.first_line(e)}).') from None
        step = last_ckpt_step = int(ck['step'])
        del ck
        accelerator.print(f'[AID-VAR] resumed from {resume} at step {step}')

    def check_finite(at, losses):  # called by train_step before each update
        for name, v in losses.items():
            if not math.isfinite(v):
                where = (f'the last good checkpoint is {ckpt_path} (step {last_ckpt_step}); resume from it with '
                         f'--resume {ckpt_path} and a lower learning rate') if last_ckpt_step is not None else \
                    'no checkpoint had been written yet'
                raise SystemExit(f'[AID-VAR] step {at}: {name} = {v}; training stopped before the update, {where}.')

    def injector_meta(val):
        return dict(depth=args.depth, inject=args.inject, w_train=args.w_train, context=args.context, decode=args.decode,
                    step=step, lambda_rec=args.lambda_rec, seed=args.seed, lambda_adv=args.lambda_adv, plant=args.plant,
                    g_draws=args.g_draws, fake_cfg=args.fake_cfg, var_sha256=var_sha256, validation=val if val and val['step'] == step else None)

    def save_checkpoint(val):
        sums = torch.tensor([sum(float(t.double().sum()) for m in (injector, D.heads) for t in m.state_dict().values()
                                 if t.is_floating_point())], dtype=torch.float64, device=device)
        if world > 1:  # every rank must hold the same weights, or the run is silently broken
            all_sums = accelerator.gather(sums)
            if not torch.all(all_sums == all_sums[0]):
                raise SystemExit(f'[AID-VAR] ranks disagree on the weights at step {step}: checksums {all_sums.tolist()}')
        if accelerator.is_main_process:
            data.atomic_save(dict(injector=injector.state_dict(), disc_heads=D.heads_state_dict(), opt_g=opt_g.state_dict(),
                                  opt_d=opt_d.state_dict(), step=step, args=vars(args), world=world,
                                  weights_checksum=float(sums)), ckpt_path)
            checkpoints.save_injector(out_dir / 'injector.safetensors', injector, injector_meta(val))
        accelerator.wait_for_everyone()

    config = dict(vars(args), real_temps=real_temps, world=world, per_device_batch_size=per_device,
                  steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  mixed_precision_used=str(accelerator.mixed_precision), start_step=step,
                  resumed_from=None if resume is None else str(resume))
    log_f = None
    if accelerator.is_main_process:
        data.atomic_save(json.dumps(config, indent=1, sort_keys=True) + '\n', out_dir / 'config.json')
        if (out_dir / 'log.jsonl').is_file():  # rows after the checkpoint are recomputed below
            data.atomic_save(kept_log_rows(out_dir / 'log.jsonl', step), out_dir / 'log.jsonl')
        log_f = open(out_dir / 'log.jsonl', 'a')
    accelerator.wait_for_everyone()
    if args.report_to != 'none':
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_values(config),
                                  init_kwargs={'wandb': {'name': out_dir.name, 'dir': str(out_dir)}})
    val_path, val_setup, val = out_dir / 'validation.json', None, None
    history = [v for v in json.loads(val_path.read_text())['history'] if v['step'] <= step] \
        if val_path.is_file() and resume is not None else []
    if args.val_n and accelerator.is_main_process:
        val_setup = validation_setup(args, preset, device)
    elif not args.val_n:
        accelerator.print('[AID-VAR] --val_n 0: no validation; the injector will carry no verdict on whether it helps')
    bar = data.progress(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc='AID-VAR',
                        dynamic_ncols=True)
    D.train()
    injector.train()
    try:
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            batches = data.epoch_batches(dataset, epoch, start, per_device, rank, world, args.seed, num_workers)
            for img_B3HW, labels_B in batches:
                if step >= total_steps:
                    break
                rec = train_step(step, img_B3HW, labels_B, vae, var, D, injector, opt_d, opt_g, args, real_temps, accelerator,
                                 check_finite)
                rec['epoch'] = epoch
                step += 1
                if log_f:
                    log_f.write(json.dumps(rec) + '\n')
                    log_f.flush()
                if args.report_to != 'none':
                    accelerator.log(tracker_values({k: v for k, v in rec.items() if k != 'step'}), step=step)
                bar.set_postfix(D=f'{rec["loss_D"]:.3f}', adv=f'{rec["loss_adv"]:.3f}', ce=f'{rec["loss_CE"]:.3f}',
                                acc_r=f'{rec["acc_real"]:.2f}', acc_f=f'{rec["acc_fake"]:.2f}', ips=f'{rec["img_per_s"]:.1f}',
                                refresh=False)  # shown by update(), which keeps to mininterval (a log gets few lines)
                bar.update(1)
                if step % args.ckpt_every == 0 or step == total_steps:
                    if val_setup and (step == total_steps or args.val_at == 'ckpt'):
                        val = validate(var, injector, args, val_setup, step, device, accelerator.autocast)
                        history.append(val)
                        best = best_validation(history)
                        if args.val_at == 'ckpt' and best is val:
                            checkpoints.save_injector(out_dir / 'injector_best.safetensors', injector, injector_meta(val))
                        data.atomic_save(json.dumps(dict(last=val, best_step=best['step'], history=history), indent=1) + '\n',
                                         val_path)
                        bar.write(f'[AID-VAR] {verdict_line(val)}')  # main process only: val_setup is None elsewhere
                    save_checkpoint(val)
                    last_ckpt_step = step
                if accelerator.is_main_process and args.sample_every > 0 and (step % args.sample_every == 0 or step == total_steps):
                    injector.eval()
                    with accelerator.autocast():
                        sample_grid(var, injector, args, out_dir / f'grid_step{step:06d}.png')
                    injector.train()
    except KeyboardInterrupt:
        kept = f'the checkpoint of step {last_ckpt_step} is kept in {ckpt_path}' if last_ckpt_step is not None else \
            'no checkpoint was written yet'
        raise SystemExit(f'\n[AID-VAR] interrupted at step {step}: {kept}; continue with the same command and '
                         f'--resume auto.') from None
    bar.close()
    if log_f:
        log_f.close()
    accelerator.print(f'[AID-VAR] done: {step} steps; injector at {out_dir / "injector.safetensors"}, full state at {ckpt_path}')
    if args.val_at == 'ckpt' and history:
        best = best_validation(history)
        accelerator.print(f'[AID-VAR] best validated weights (step {best["step"]}, {best["verdict"]}): {out_dir / "injector_best.safetensors"}')
    accelerator.end_training()
    return dict(vae=vae, var=var, D=D, injector=injector)


if __name__ == '__main__':
    main()
