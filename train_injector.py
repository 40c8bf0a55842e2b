"""AID-VAR training: a guidance injector for a frozen VAR, against a projected discriminator.

    accelerate launch train_injector.py --depth 24 --data_path /data/imagenet      # 8 GPUs, paper settings
    python train_injector.py                                                       # tiny preset, CPU, minutes

One step is the paper's "dynamic refresh":
  1. the frozen VAR runs teacher-forced on context tokens (ground truth, or its own rollout with the current
     injector) with the current injector's guidance w * g_k added at every scale k >= 1 -> guided logits;
  2. for a random scale k per sample, the prefix tokens (one-hot) + the relaxed guided probabilities of scale
     k are decoded through the frozen VQ-VAE into the cumulative RGB image of scales 0..k (soft_decode.py);
     real images: the ground-truth prefix + scale k's soft labels from the quantizer, as soft as the fakes (§3.2);
  3. D (frozen DINO + trainable heads) takes a hinge step on real vs these fakes (+ lazy R1 on real);
  4. the injector takes a step on -D(fake) + lambda * CE(guided teacher-forced logits, ground truth).
The VAR, the VQ-VAE and the D backbone never change.

Gradients are synchronised by hand (sync_grads: one flat all-reduce per model, no DDP wrapper), as StyleGAN-T
does for the same reason: the injector step runs D with `D.requires_grad_(False)`, so D's heads take part in
one backward and not in the next. DDP cannot take parameters that sometimes get no gradient without
`find_unused_parameters=True` (an extra graph traversal each step, and an error when its hooks fire twice,
as they would with D called several times per backward: real, fake, R1). Every checkpoint compares a weight
checksum of all ranks, so a broken synchronisation stops the run instead of drifting silently.

Mixed precision: bf16 (the default on GPU) or none. fp16 is refused: the hand-written backward passes bypass
accelerate's loss scaling, so fp16 gradients could underflow. `accelerate launch --mixed_precision` and
`accelerate config` are honoured when --mixed_precision is not given.
Logging: OUT_DIR/log.jsonl (one row per step), OUT_DIR/config.json (the resolved settings), and with
--report_to tensorboard / wandb the same rows through accelerate's trackers.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torchvision.utils import save_image

import data
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
p.add_argument('--decode', choices=list(soft_decode.MODES), default='soft',
               help='relaxation of the guided scale for D: probabilities, Gumbel-softmax or straight-through (soft_decode.py)')
p.add_argument('--tau', type=float, default=1.0, help='softmax / Gumbel temperature of the relaxed decode')
p.add_argument('--real_decode', choices=['soft', 'hard'], default='soft',
               help="real images for D: 'soft' (paper §3.2: the quantizer's soft labels, as soft as the fakes) or one-hot")
p.add_argument('--real_match', choices=list(soft_decode.REAL_MATCH), default='entropy',
               help="soft reals: match the fakes' mean entropy or the mean norm of their expected code")
p.add_argument('--disc_scales', choices=['random', 'all'], default='random',
               help='D sees one random scale k >= 1 per sample, or every scale')
p.add_argument('--disc_norm', choices=list(models.DISC_NORMS), default=None, help="D heads' norm (none: see README, tiny preset)")
p.add_argument('--disc_aug', choices=list(models.DISC_AUGS), default=None, help='DiffAugment on real and fake images in D')
p.add_argument('--broadcast', action='store_true', help='ablation: one guidance vector per scale, not a map')
p.add_argument('--lambda_rec', type=float, default=0.01, help='weight of the token cross-entropy (eq. 7)')
p.add_argument('--lambda_adv', type=float, default=1.0, help='weight of the adversarial term -D(fake) (0: CE only, no D)')
p.add_argument('--plant', choices=list(models.PLANT_STRENGTH), default=None,
               help='positive control: plant a known error in the frozen VAR (models.plant_error) before training')
p.add_argument('--plant_strength', type=float, default=None, help='size of the planted error (default per kind)')
p.add_argument('--plant_seed', type=int, default=0, help='which planted error (its random direction)')
p.add_argument('--w_train', type=float, default=None, help='guidance weight during training')
p.add_argument('--lr_g', type=float, default=None, help='injector learning rate (AdamW)')
p.add_argument('--lr_d', type=float, default=None, help='discriminator heads learning rate (AdamW)')
p.add_argument('--d_steps', type=int, default=1, help='D updates per injector update (on the same real / fake pair)')
p.add_argument('--r1_gamma', type=float, default=None, help='R1 weight on real images; 0 turns R1 off')
p.add_argument('--r1_every', type=int, default=16, help='lazy R1: every this many steps, scaled by it')
p.add_argument('--grad_clip', type=float, default=0.5, help='gradient-norm clip of the injector and of the D heads')
p.add_argument('--global_batch_size', type=int, default=None, help='images per step over all processes')
p.add_argument('--epochs', type=float, default=None, help='training length in epochs (1 when neither this nor --max_steps is given)')
p.add_argument('--max_steps', type=int, default=None, help='overrides --epochs')
p.add_argument('--cfg', type=float, default=1.5, help='CFG of rollouts and grids')
p.add_argument('--top_k', type=int, default=None, help='top-k of rollouts and grids (0: off)')
p.add_argument('--top_p', type=float, default=None, help='top-p of rollouts and grids (0: off)')
p.add_argument('--out_dir', type=str, default='runs/injector',
               help='run folder: last.pt (full state), injector.pt, log.jsonl, config.json, grids; refused if it holds '
                    'an earlier run unless --resume is given')
p.add_argument('--resume', type=str, default=None,
               help="a last.pt, or 'auto' for OUT_DIR/last.pt if it exists (else a fresh start); log.jsonl is cut back "
                    "to the checkpoint's step")
p.add_argument('--disc_ckpt', type=str, default=None, help='D heads to start from (train_disc_probe.py output)')
p.add_argument('--seed', type=int, default=0, help='seeds the fresh weights, the data order and every step')
p.add_argument('--sample_every', type=int, default=None, help='sample grid interval (0: never)')
p.add_argument('--ckpt_every', type=int, default=None, help='checkpoint interval in steps (and at the end)')
p.add_argument('--mixed_precision', choices=['no', 'bf16'], default=None,
               help='default: what accelerate launch / accelerate config set, else bf16 on GPU and no on CPU. No fp16: '
                    'the backward passes are hand-written (no accelerator.backward), so fp16 gradients would get no loss '
                    'scaling and could underflow')
p.add_argument('--num_workers', type=int, default=8, help='DataLoader processes per GPU (ImageNet; the tiny preset needs none)')
p.add_argument('--n_tiny', type=int, default=20000, help='tiny preset: number of training shapes')
p.add_argument('--report_to', choices=['none', 'tensorboard', 'wandb'], default='none',
               help="also log every step through accelerate's trackers (tensorboard: OUT_DIR/aid-var; wandb: project "
                    "aid-var); log.jsonl and config.json are always written")

# Paper Table 5 / App. F for the real models; the tiny preset's values were tuned (README, "The tiny preset").
DEFAULTS = {
    # the paper: fakes from the VAR's inference (§3.1), StyleGAN-T's D (ghost batch norm, DiffAugment)
    'real': dict(w_train=0.001, lr_g=1e-6, lr_d=1e-6, r1_gamma=0.2, global_batch_size=256, epochs=2, top_k=900, top_p=0.96,
                 sample_every=1000, ckpt_every=1000, context='rollout',
                 **dict(zip(('disc_norm', 'disc_aug'), models.DISC_DEFAULTS['real']))),
    # tiny, chosen by the positive control (README): w_train 0.1 because at 0.001 even the CE term removes only 4% of a
    # planted error in 100 steps (0.1: 91%); rollout fakes and a D without ghost batch norm / DiffAugment because with
    # them D is at chance on its fakes. lr_d 2e-3 and R1 off: at 2e-4 the heads were still at chance after 250 steps,
    # and the 32x32 feature network's input gradients make R1 ~1e3-1e4, which dominated the D steps.
    'tiny': dict(w_train=0.1, lr_g=1e-3, lr_d=2e-3, r1_gamma=0.0, global_batch_size=16, max_steps=150, top_k=0, top_p=0.0,
                 sample_every=50, ckpt_every=50, context='rollout',
                 **dict(zip(('disc_norm', 'disc_aug'), models.DISC_DEFAULTS['tiny']))),
}
GRID_CLASSES_IMAGENET = (207, 360, 387, 974, 88, 979, 417, 279)  # the VAR demo's classes


def show_preset_defaults(parser, defaults):
    """Appends each preset's value from `defaults` to the --help text of the flags it fills in."""
    names = {'real': 'real models', 'tiny': 'tiny preset'}
    for action in parser._actions:
        vals = {preset: d.get(action.dest) for preset, d in defaults.items()}
        if any(v is not None for v in vals.values()):
            shown = ', '.join(f'{names.get(k, k)} {"not set" if v is None else v}' for k, v in vals.items())
            action.help = f'{action.help} (default: {shown})' if action.help else f'default: {shown}'


show_preset_defaults(p, DEFAULTS)


def resolve_args(argv=None):
    args = p.parse_args(argv)
    d = DEFAULTS['tiny' if args.depth is None else 'real']
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    return args


def build_everything(args, device):
    """Frozen VQ-VAE + VAR, frozen D backbone with fresh heads, fresh injector (identical on every rank)."""
    if args.random_init:
        vae, var = models.build_random(args.depth, device, seed=args.seed)
        backbone = models.build_featnet() if args.depth is None else models.build_backbone_dino(pretrained=False)
    else:
        vae, var = models.load_vae_var(args.depth, args.ckpt_dir, device)
        backbone = models.load_featnet() if args.depth is None else models.build_backbone_dino(ckpt=args.dino_ckpt)
    if args.plant:
        models.plant_error(var, args.plant, args.plant_strength, args.plant_seed)
    torch.manual_seed(args.seed)  # the fresh heads and injector are the same on every rank
    D = models.ProjectedDiscriminator(backbone, num_classes=var.num_classes, norm=args.disc_norm,
                                      diffaug=args.disc_aug).to(device)
    if args.disc_ckpt:
        ck = torch.load(args.disc_ckpt, map_location='cpu', weights_only=True)
        meta = ck.get('meta', {})
        if meta.get('space', 'rgb') != 'rgb':
            raise SystemExit(f'--disc_ckpt {args.disc_ckpt} holds latent-space heads (train_disc_probe.py --space latent); '
                             f'AID-VAR needs the RGB projected discriminator (--space rgb).')
        if meta.get('norm', 'bn') != args.disc_norm:
            raise SystemExit(f'--disc_ckpt {args.disc_ckpt} holds heads with --disc_norm {meta.get("norm", "bn")}; '
                             f'this run uses --disc_norm {args.disc_norm}.')
        D.load_heads_state_dict(ck['disc_heads'])
    G = models.GuidanceInjector(var.C, var.patch_nums, broadcast=args.broadcast).to(device)
    return vae, var, D, G


def derived_seed(*parts) -> int:
    """A 63-bit seed from integers (seed, epoch, rank or sample index...): independent streams per tuple."""
    import numpy as np
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
    if isinstance(dataset, data.ShapesDataset):  # in-memory: no loader processes needed
        for i in range(0, len(idx), per_device):
            j = torch.tensor(idx[i:i + per_device])
            yield data.to_signed(dataset.images_NHW3[j]), dataset.labels[j]
        return
    loader = torch.utils.data.DataLoader(SeededItems(dataset, seed, epoch), batch_size=per_device, sampler=idx,
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(derived_seed(seed, epoch, rank)))
    yield from loader


def guided_logits(var, G, labels_B, ctx_idx, w, inject):
    """Teacher-forced VAR pass on context tokens with the injector's guidance. Returns (logits_BLV, g_BLC)."""
    with torch.no_grad():
        x_BLCv = var.vae.quantize.idxBl_to_var_input(ctx_idx)
    g_BLC = models.teacher_guidance(var, G, ctx_idx)
    if inject == 'input':
        h_BLC, cond_BD = var.forward_hidden(labels_B, x_BLCv, input_add_BLC=w * g_BLC)
    else:  # the VAR body runs without a graph; only head_nm + head carry gradient
        with torch.no_grad():
            h_BLC, cond_BD = var.forward_hidden(labels_B, x_BLCv)
        h_BLC = models.at_least_fp32(h_BLC) + w * g_BLC
    return var.get_logits(h_BLC, cond_BD), g_BLC


def sync_grads(params, world):
    """Average gradients over ranks (one flat all-reduce)."""
    if world == 1:
        return
    params = [q for q in params if q.requires_grad]
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    flat = torch.cat([q.grad.flatten() for q in params])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for q in params:
        q.grad.copy_(flat[i:i + q.numel()].view_as(q))
        i += q.numel()


def param_checksum(modules, device):
    return torch.tensor([sum(float(t.double().sum()) for m in modules for t in m.state_dict().values()
                             if t.is_floating_point())], dtype=torch.float64, device=device)


@torch.no_grad()
def sample_grid(var, G, args, path):
    """Baseline (w=0) and guided (w=w_train) samples from the same seeds, one row each."""
    labels = torch.tensor(GRID_CLASSES_IMAGENET if var.num_classes == 1000 else list(range(var.num_classes)),
                          device=var.lvl_1L.device)
    kw = dict(g_seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    base = var.autoregressive_infer_cfg(len(labels), labels, **kw)
    guided = var.autoregressive_infer_cfg(len(labels), labels, guidance_hook=models.make_guidance_hook(var, G),
                                          guidance_w=args.w_train, inject=args.inject, **kw)
    save_image(torch.cat([base, guided]).float(), path, nrow=len(labels), padding=1)


def check_finite(step, losses, ckpt_path, last_ckpt_step):
    for name, v in losses.items():
        if not math.isfinite(v):
            where = (f'the last good checkpoint is {ckpt_path} (step {last_ckpt_step}); resume from it with '
                     f'--resume {ckpt_path} and a lower learning rate') if last_ckpt_step is not None else \
                'no checkpoint had been written yet'
            raise SystemExit(f'[AID-VAR] step {step}: {name} = {v}; training stopped before the update, {where}.')


def real_temperatures(args, dataset, var, device, n=64):
    """Per-scale temperatures of the soft reals, matched to the frozen VAR's softness on n fixed training images."""
    if args.real_decode != 'soft':
        return None
    img_B3HW, labels_B = next(epoch_batches(dataset, 0, 0, n, 0, 1, args.seed, 0))
    temps = soft_decode.matched_real_temperatures(var, img_B3HW.to(device).float(), labels_B.to(device), args.tau,
                                                  args.real_match)
    return [round(t, 6) for t in temps]


def train_step(step, img_B3HW, labels_B, vae, var, D, G, opt_d, opt_g, args, acc, check):
    """One dynamic-refresh step (D update on the current fakes, then the injector update). Returns the log record.

    check(step, {name: value}) is called on the rank-averaged losses before each update (it stops on NaN/Inf).
    With --lambda_adv 0 (CE only: an arm of the positive control) no fakes are made and D is not trained.
    """
    device, world, per_device, SN = acc.device, acc.num_processes, img_B3HW.shape[0], len(var.patch_nums)
    t0 = time.perf_counter()
    # all randomness of a step (scales, DiffAugment, Gumbel noise, rollouts) derives from (seed, step, rank)
    torch.manual_seed((args.seed * 1_000_003 + step) * 64 + acc.process_index)
    img_B3HW, labels_B = img_B3HW.to(device, non_blocking=True), labels_B.to(device, non_blocking=True)
    use_d = args.lambda_adv > 0
    with torch.no_grad():  # tokenised in float32, outside autocast, as the official VAR trainer does
        if args.real_decode == 'soft' and use_d:
            real_probs, gt_idx = soft_decode.real_soft_labels(vae, img_B3HW.float(), args.real_temps)
        else:
            real_probs, gt_idx = None, vae.img_to_idxBl(img_B3HW.float())
    zero = torch.zeros((), device=device)
    loss_D, r1, out_real, out_fake, gn_d = zero, zero, zero, zero, 0.0
    with acc.autocast():
        ctx_idx = gt_idx
        if use_d and args.context == 'rollout':
            G.eval()
            with torch.no_grad():
                _, ctx_idx = var.autoregressive_infer_cfg(per_device, labels_B, cfg=args.cfg, top_k=args.top_k,
                                                          top_p=args.top_p, guidance_hook=models.make_guidance_hook(var, G),
                                                          guidance_w=args.w_train, inject=args.inject, ret_idx=True)
            G.train()
        logits_BLV, g_BLC = guided_logits(var, G, labels_B, ctx_idx, args.w_train, args.inject)
        if use_d:
            scales = None if args.disc_scales == 'all' else torch.randint(1, SN, (per_device,), device=device)
            fake, real, labs = soft_decode.disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, args.decode,
                                                       args.tau, real_probs)
            # --- D step on real vs the current fakes
            D.requires_grad_(True)
            out_real, out_fake = D(real, labs), D(fake.detach(), labs)
            loss_D = F.relu(1 - out_real).mean() + F.relu(1 + out_fake).mean()
            if args.r1_gamma > 0 and step % args.r1_every == 0:  # lazy R1, scaled by its interval
                real_r = real.detach().float().requires_grad_(True)
                # R1 of D's per-image mean logit (the sum over its ~5T patch logits would scale R1 by ~(5T)^2)
                grad, = torch.autograd.grad(D(real_r, labs, double_backward=True).mean(1).sum(), real_r, create_graph=True)
                r1 = grad.square().sum([1, 2, 3]).mean()
                loss_D = loss_D + args.r1_gamma / 2 * r1 * args.r1_every

        # the token CE is always on a teacher-forced pass
        logits_ce = logits_BLV if ctx_idx is gt_idx else guided_logits(var, G, labels_B, gt_idx, args.w_train, args.inject)[0]
        loss_ce = F.cross_entropy(logits_ce.reshape(-1, var.V), torch.cat(gt_idx, 1).reshape(-1))

    stats = torch.stack([loss_D.detach().float(), r1.detach().float(), loss_ce.detach().float(),
                         (out_real > 0).float().mean(), (out_fake < 0).float().mean()])
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    check(step + 1, {'loss_D': stats[0].item(), 'R1': stats[1].item(), 'loss_CE': stats[2].item()})
    for i in range(args.d_steps if use_d else 0):
        if i > 0:  # further D steps on the same real / fake pair (new DiffAugment draws), before the injector's
            with acc.autocast():
                loss_D = F.relu(1 - D(real, labs)).mean() + F.relu(1 + D(fake.detach(), labs)).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_D.backward()
        sync_grads(list(D.head_parameters()), world)
        gn_d = torch.nn.utils.clip_grad_norm_(list(D.head_parameters()), args.grad_clip)
        opt_d.step()

    # --- G step against the updated D
    D.requires_grad_(False)
    with acc.autocast():
        loss_adv = -D(fake, labs).mean() if use_d else zero
        loss_G = args.lambda_adv * loss_adv + args.lambda_rec * loss_ce
    adv = loss_adv.detach().float()
    if world > 1:
        dist.all_reduce(adv)
        adv /= world
    check(step + 1, {'loss_adv': adv.item()})
    opt_g.zero_grad(set_to_none=True)
    loss_G.backward()
    sync_grads(list(G.parameters()), world)
    gn_g = torch.nn.utils.clip_grad_norm_(list(G.parameters()), args.grad_clip)
    opt_g.step()

    g_norm = [g_BLC[:, bg:ed].detach().float().norm(dim=-1).mean().item() for bg, ed in var.begin_ends[1:]]
    return dict(step=step + 1, loss_D=stats[0].item(), r1=stats[1].item(), loss_adv=adv.item(), loss_CE=stats[2].item(),
                acc_real=stats[3].item(), acc_fake=stats[4].item(), grad_norm_G=float(gn_g), grad_norm_D=float(gn_d),
                g_norm_per_scale=g_norm, img_per_s=per_device * world / (time.perf_counter() - t0))


RUN_FILES = ('last.pt', 'injector.pt')  # what an earlier run leaves in its out_dir (and a fresh start would overwrite)
RESUME_KEYS = ('injector', 'disc_heads', 'opt_g', 'opt_d', 'step', 'args')
RESUME_MUST_MATCH = ('depth', 'inject', 'context', 'decode', 'broadcast', 'global_batch_size', 'seed', 'disc_norm', 'disc_aug',
                     'real_decode', 'plant', 'plant_strength', 'plant_seed')
TRACKER_PROJECT = 'aid-var'


def resolve_mixed_precision(flag):
    """What to pass to Accelerator as mixed_precision: the flag when given; None (accelerate's own choice) when
    accelerate launch / accelerate config set ACCELERATE_MIXED_PRECISION; else bf16 on GPU, no on CPU. fp16 is
    refused (see --mixed_precision)."""
    env = os.environ.get('ACCELERATE_MIXED_PRECISION')
    if (flag or env) == 'fp16':
        raise SystemExit('[AID-VAR] fp16 mixed precision is not supported for training (it came from '
                         f'{"--mixed_precision" if flag else "accelerate launch / accelerate config"}): the backward passes '
                         'bypass loss scaling, so fp16 gradients could underflow. Use bf16 (--mixed_precision bf16) or no.')
    if flag:
        return flag
    if env:
        return None
    return 'bf16' if torch.cuda.is_available() else 'no'


def make_accelerator(args):
    mp = resolve_mixed_precision(args.mixed_precision)
    kw = {} if mp is None else dict(mixed_precision=mp)
    if args.report_to != 'none':
        module = {'tensorboard': 'tensorboard', 'wandb': 'wandb'}[args.report_to]
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f'--report_to {args.report_to} needs the {module} package: pip install {module} '
                             f'(or --report_to none; log.jsonl is always written).') from None
        kw.update(log_with=args.report_to, project_dir=args.out_dir)
    # cpu=True on a GPU-less machine makes torchrun-style launches (accelerate launch --multi_gpu) use gloo on the CPU
    acc = Accelerator(cpu=not torch.cuda.is_available(), **kw)
    if acc.mixed_precision == 'fp16':
        raise SystemExit('[AID-VAR] fp16 mixed precision is not supported for training (the backward passes bypass '
                         'loss scaling); use bf16 or no.')
    return acc


def on_main(acc, fn):
    """fn() on the main process, its result on every rank (one decision for all; a rank that cannot see a file
    then fails with the same message instead of leaving the others waiting in a collective)."""
    box = [fn() if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(box)
    return box[0]


def resume_decision(args, out_dir: Path):
    """('error', message) or ('ok', path of the checkpoint to resume from, or None for a fresh start)."""
    if args.resume is None:
        held = [f for f in RUN_FILES if (out_dir / f).is_file()]
        log = out_dir / 'log.jsonl'
        if log.is_file() and log.stat().st_size > 0:
            held.append('log.jsonl')
        if held:
            return ('error', f'[AID-VAR] {out_dir} already holds a run ({", ".join(held)}); continue it with '
                             f'--resume auto, or choose another --out_dir. Nothing was overwritten.')
        return ('ok', None)
    if args.resume == 'auto':
        ckpt = out_dir / 'last.pt'
        return ('ok', str(ckpt) if ckpt.is_file() else None)
    path = Path(args.resume)
    if not path.is_file():
        return ('error', f"[AID-VAR] --resume {path}: no such file (give the last.pt of a run, or --resume auto).")
    return ('ok', str(path))


def decide_resume(args, out_dir: Path, acc):
    """The checkpoint to resume from (a Path) or None, decided on the main process and the same on every rank.
    Every rank must see that file (it loads it): otherwise all ranks stop with one message."""
    kind, value = on_main(acc, lambda: resume_decision(args, out_dir))
    if kind == 'error':
        raise SystemExit(value)
    if value is not None and acc.num_processes > 1:
        seen = gather_object([(acc.process_index, Path(value).is_file())])
        blind = [r for r, ok in seen if not ok]
        if blind:
            raise SystemExit(f'[AID-VAR] --resume {args.resume}: the main process resumes from {value}, but rank(s) '
                             f'{blind} cannot see that file. Put --out_dir on a file system every node shares, or copy '
                             f'the checkpoint to the same path on every node.')
    return None if value is None else Path(value)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


def read_resume(path: Path, args) -> dict:
    """A train_injector.py checkpoint, checked to be one and to fit this run's settings (else one-line SystemExit)."""
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, garbage, a pickle of something else
        raise SystemExit(f'[AID-VAR] --resume {path} ({path.stat().st_size:,} bytes) is not a readable checkpoint '
                         f'({_first_line(e)}): it is truncated or not a torch file. Give the last.pt of a run.') from None
    if not (isinstance(ck, dict) and all(k in ck for k in RESUME_KEYS) and isinstance(ck['args'], dict)):
        if isinstance(ck, dict) and 'meta' in ck and 'state_dict' in ck:
            what = 'an injector file (weights only, no optimiser state or step)'
        elif isinstance(ck, dict) and ck and all(torch.is_tensor(v) for v in ck.values()):
            what = models.describe_state_dict(ck)
        else:
            what = f'a {type(ck).__name__}' + (f' with keys {sorted(map(str, ck))[:6]}' if isinstance(ck, dict) else '')
        raise SystemExit(f'[AID-VAR] --resume {path} is {what}, not a training checkpoint: give the last.pt that '
                         f'train_injector.py writes beside injector.pt.')
    for k in RESUME_MUST_MATCH:
        if ck['args'].get(k) != getattr(args, k):
            raise SystemExit(f'[AID-VAR] --resume {path}: it was trained with --{k} {ck["args"].get(k)}, now --{k} '
                             f'{getattr(args, k)}.')
    return ck


def apply_resume(ck, path, G, D, opt_g, opt_d) -> int:
    """Loads the states of a read_resume checkpoint; returns its step."""
    for what, load in (('injector', lambda: G.load_state_dict(ck['injector'])),
                       ('disc_heads', lambda: D.load_heads_state_dict(ck['disc_heads'])),
                       ('opt_g', lambda: opt_g.load_state_dict(ck['opt_g'])),
                       ('opt_d', lambda: opt_d.load_state_dict(ck['opt_d']))):
        try:
            load()
        except Exception as e:  # shapes / keys of another model
            raise SystemExit(f'[AID-VAR] --resume {path}: its {what} does not fit this run ({_first_line(e)}).') from None
    return int(ck['step'])


def truncate_log(path: Path, step: int):
    """Keeps the rows of log.jsonl up to `step` (a resume repeats the steps after its checkpoint); atomic."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)['step'] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a half-written last line of a killed run
            continue
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    tmp.write_text(''.join(l + '\n' for l in keep))
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj):
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + '\n')
    os.replace(tmp, path)


def tracker_values(d: dict) -> dict:
    """A flat {name: int / float / str / bool} for trackers: lists become name_0, name_1...; None becomes 'None'."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (list, tuple)):
            out.update({f'{k}_{i}': x for i, x in enumerate(v)})
        else:
            out[k] = 'None' if v is None else v
    return out


def main(argv=None):
    args = resolve_args(argv)
    acc = make_accelerator(args)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    out_dir = Path(args.out_dir)
    resume = decide_resume(args, out_dir, acc)  # before anything is written or loaded
    ck = read_resume(resume, args) if resume else None

    dataset = data.build_train_data(args.depth, args.data_path, n_tiny=args.n_tiny)
    if args.global_batch_size % world:
        raise SystemExit(f'--global_batch_size {args.global_batch_size} is not divisible by {world} processes.')
    per_device = args.global_batch_size // world
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f'The training set has {len(dataset)} images, fewer than one global batch ({args.global_batch_size}).')
    total_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)

    with acc.main_process_first():  # downloads (checkpoints, DINO) happen once, the other ranks then read the cache
        vae, var, D, G = build_everything(args, device)
    args.real_temps = real_temperatures(args, dataset, var, device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=args.lr_g, betas=(0.9, 0.999), weight_decay=1e-5)
    opt_d = torch.optim.AdamW(D.head_parameters(), lr=args.lr_d, betas=(0.9, 0.999), weight_decay=1e-5)
    ckpt_path = out_dir / 'last.pt'
    step, last_ckpt_step = 0, None
    if ck is not None:
        step = last_ckpt_step = apply_resume(ck, resume, G, D, opt_g, opt_d)
        del ck
        acc.print(f'[AID-VAR] resumed from {resume} at step {step}')

    def save_checkpoint():
        sums = param_checksum([G, D.heads], device)
        if world > 1:  # every rank must hold the same weights, or the run is silently broken
            all_sums = acc.gather(sums)
            if not torch.all(all_sums == all_sums[0]):
                raise SystemExit(f'[AID-VAR] ranks disagree on the weights at step {step}: checksums {all_sums.tolist()}')
        if acc.is_main_process:
            data.atomic_save(dict(injector=G.state_dict(), disc_heads=D.heads_state_dict(), opt_g=opt_g.state_dict(),
                                    opt_d=opt_d.state_dict(), step=step, args=vars(args), world=world,
                                    weights_checksum=float(sums)), ckpt_path)
            models.save_injector(out_dir / 'injector.pt', G, dict(depth=args.depth, inject=args.inject, w_train=args.w_train,
                                                                   context=args.context, decode=args.decode, step=step,
                                                                   lambda_rec=args.lambda_rec, seed=args.seed,
                                                                   lambda_adv=args.lambda_adv, plant=args.plant))
        acc.wait_for_everyone()

    config = dict(vars(args), world=world, per_device_batch_size=per_device, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, mixed_precision_used=str(acc.mixed_precision), start_step=step,
                  resumed_from=None if resume is None else str(resume))
    log_f = None
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / 'config.json', config)
        truncate_log(out_dir / 'log.jsonl', step)  # rows after the checkpoint are recomputed below
        log_f = open(out_dir / 'log.jsonl', 'a')
    acc.wait_for_everyone()
    if args.report_to != 'none':
        acc.init_trackers(TRACKER_PROJECT, config=tracker_values(config),
                          init_kwargs={'wandb': {'name': out_dir.name, 'dir': str(out_dir)}})
    bar = data.progress(total=total_steps, initial=step, disable=not acc.is_main_process, desc='AID-VAR',
                          dynamic_ncols=True)
    D.train()
    G.train()
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        for img_B3HW, labels_B in epoch_batches(dataset, epoch, start, per_device, rank, world, args.seed, args.num_workers):
            if step >= total_steps:
                break
            rec = train_step(step, img_B3HW, labels_B, vae, var, D, G, opt_d, opt_g, args, acc,
                             lambda at, losses: check_finite(at, losses, ckpt_path, last_ckpt_step))
            rec['epoch'] = epoch
            step += 1
            if log_f:
                log_f.write(json.dumps(rec) + '\n')
                log_f.flush()
            if args.report_to != 'none':
                acc.log(tracker_values({k: v for k, v in rec.items() if k != 'step'}), step=step)
            bar.set_postfix(D=f'{rec["loss_D"]:.3f}', adv=f'{rec["loss_adv"]:.3f}', ce=f'{rec["loss_CE"]:.3f}',
                            acc_r=f'{rec["acc_real"]:.2f}', acc_f=f'{rec["acc_fake"]:.2f}', ips=f'{rec["img_per_s"]:.1f}',
                            refresh=False)  # shown by update(), which keeps to mininterval (a log gets few lines)
            bar.update(1)
            if step % args.ckpt_every == 0 or step == total_steps:
                save_checkpoint()
                last_ckpt_step = step
            if acc.is_main_process and args.sample_every > 0 and (step % args.sample_every == 0 or step == total_steps):
                G.eval()
                with acc.autocast():
                    sample_grid(var, G, args, out_dir / f'grid_step{step:06d}.png')
                G.train()
    bar.close()
    if log_f:
        log_f.close()
    acc.print(f'[AID-VAR] done: {step} steps; injector at {out_dir / "injector.pt"}, full state at {ckpt_path}')
    acc.end_training()
    return dict(vae=vae, var=var, D=D, G=G)


if __name__ == '__main__':
    main()
