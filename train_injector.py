"""AID-VAR training: a guidance injector for a frozen VAR, against a projected discriminator.

    accelerate launch train_injector.py --depth 24 --data_path /data/imagenet      # 8 GPUs, paper settings
    python train_injector.py                                                       # tiny preset, CPU, minutes

One step is the paper's "dynamic refresh":
  1. the frozen VAR runs teacher-forced on context tokens (ground truth, or its own rollout with the current
     injector) with the current injector's guidance w * g_k added at every scale k >= 1 -> guided logits;
  2. for a random scale k per sample, the prefix tokens (one-hot) + the relaxed guided probabilities of scale
     k are decoded through the frozen VQ-VAE into the cumulative RGB image of scales 0..k (soft_decode.py);
     real images are the same decode of ground-truth tokens;
  3. D (frozen DINO + trainable heads) takes a hinge step on real vs these fakes (+ lazy R1 on real);
  4. the injector takes a step on -D(fake) + lambda * CE(guided teacher-forced logits, ground truth).
The VAR, the VQ-VAE and the D backbone never change. Gradients are synchronised by hand (no DDP wrapper):
the GAN step calls D several times per backward, which DDP handles badly.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torchvision.utils import save_image
from tqdm import tqdm

import models
import soft_decode

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--depth', type=int, default=None, help='16/20/24/30: official VAR-d{depth}; default: the tiny preset')
p.add_argument('--data_path', type=str, default=None, help='ImageNet root with train/ (real models only)')
p.add_argument('--ckpt_dir', type=str, default='checkpoints')
p.add_argument('--dino_ckpt', type=str, default=None, help='local DINO ViT-S/16 weights (else the HF hub cache)')
p.add_argument('--random_init', action='store_true', help='random VAR/VQ-VAE/backbone weights (tests, benchmarks)')
p.add_argument('--inject', choices=['input', 'head'], default='input')
p.add_argument('--context', choices=['teacher', 'rollout'], default='teacher')
p.add_argument('--decode', choices=list(soft_decode.MODES), default='soft')
p.add_argument('--tau', type=float, default=1.0, help='softmax / Gumbel temperature of the relaxed decode')
p.add_argument('--disc_scales', choices=['random', 'all'], default='random')
p.add_argument('--disc_norm', choices=list(models.DISC_NORMS), default='bn', help="D heads' norm (none: see README, tiny preset)")
p.add_argument('--disc_aug', choices=['diffaug', 'none'], default='diffaug', help='DiffAugment on real and fake images in D')
p.add_argument('--broadcast', action='store_true', help='ablation: one guidance vector per scale, not a map')
p.add_argument('--lambda_rec', type=float, default=0.01, help='weight of the token cross-entropy (eq. 7)')
p.add_argument('--w_train', type=float, default=None, help='guidance weight during training')
p.add_argument('--lr_g', type=float, default=None)
p.add_argument('--lr_d', type=float, default=None)
p.add_argument('--r1_gamma', type=float, default=None, help='0 turns R1 off (default: 0.2 real models, 0 tiny preset)')
p.add_argument('--r1_every', type=int, default=16)
p.add_argument('--grad_clip', type=float, default=0.5)
p.add_argument('--global_batch_size', type=int, default=None)
p.add_argument('--epochs', type=float, default=None)
p.add_argument('--max_steps', type=int, default=None, help='overrides --epochs')
p.add_argument('--cfg', type=float, default=1.5, help='CFG of rollouts and grids')
p.add_argument('--top_k', type=int, default=None)
p.add_argument('--top_p', type=float, default=None)
p.add_argument('--out_dir', type=str, default='runs/injector')
p.add_argument('--resume', type=str, default=None, help="a last.pt, or 'auto' for OUT_DIR/last.pt if it exists")
p.add_argument('--disc_ckpt', type=str, default=None, help='D heads to start from (train_disc_probe.py output)')
p.add_argument('--seed', type=int, default=0)
p.add_argument('--sample_every', type=int, default=None, help='sample grid interval (0: never)')
p.add_argument('--ckpt_every', type=int, default=None)
p.add_argument('--mixed_precision', choices=['no', 'bf16', 'fp16'], default=None, help='default: bf16 on GPU')
p.add_argument('--num_workers', type=int, default=8)
p.add_argument('--n_tiny', type=int, default=20000, help='tiny preset: number of training shapes')

# Paper Table 5 / App. F for the real models; the tiny preset's values were tuned (README, "The tiny preset").
DEFAULTS = {
    'real': dict(w_train=0.001, lr_g=1e-6, lr_d=1e-6, r1_gamma=0.2, global_batch_size=256, epochs=2, top_k=900, top_p=0.96,
                 sample_every=1000, ckpt_every=1000),
    # tiny: lr_d 2e-3 because at 2e-4 the heads were still at chance after 250 steps; R1 off because the
    # 32x32 feature network's input gradients make R1 ~1e3-1e4, so at gamma 0.2 every 16th D step was a pure
    # R1 step whose size then dominated Adam's second moments. w_train 0.001, not 0.01: at 0.01 the injector helps
    # some seeds and badly hurts others (mean FID change +2.5 over 3 seeds), at 0.001 it barely acts (README)
    'tiny': dict(w_train=0.001, lr_g=1e-3, lr_d=2e-3, r1_gamma=0.0, global_batch_size=16, max_steps=250, top_k=0, top_p=0.0,
                 sample_every=100, ckpt_every=100),
}
GRID_CLASSES_IMAGENET = (207, 360, 387, 974, 88, 979, 417, 279)  # the VAR demo's classes


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
    torch.manual_seed(args.seed)  # the fresh heads and injector are the same on every rank
    D = models.ProjectedDiscriminator(backbone, num_classes=var.num_classes, norm=args.disc_norm,
                                      diffaug=args.disc_aug == 'diffaug').to(device)
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


def epoch_batches(dataset, epoch, start, per_device, rank, world, seed, num_workers):
    """Batches of one epoch from `start` (in steps): a seeded permutation, sharded by rank (exact resume)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    global_bs = per_device * world
    steps = len(dataset) // global_bs
    idx = perm[:steps * global_bs].view(steps, world, per_device)[start:, rank].flatten().tolist()
    if isinstance(dataset, models.ShapesDataset):  # in-memory: no loader processes needed
        for i in range(0, len(idx), per_device):
            j = torch.tensor(idx[i:i + per_device])
            yield models.to_signed(dataset.images_NHW3[j]), dataset.labels[j]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_device, sampler=idx, num_workers=num_workers,
                                         pin_memory=True, drop_last=True, persistent_workers=False)
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
        h_BLC = h_BLC + (w * g_BLC).to(h_BLC.dtype)
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


def train_step(step, img_B3HW, labels_B, vae, var, D, G, opt_d, opt_g, args, acc, check):
    """One dynamic-refresh step (D update on the current fakes, then the injector update). Returns the log record.

    check(step, {name: value}) is called on the rank-averaged losses before each update (it stops on NaN/Inf).
    """
    device, world, per_device, SN = acc.device, acc.num_processes, img_B3HW.shape[0], len(var.patch_nums)
    t0 = time.perf_counter()
    # all randomness of a step (scales, DiffAugment, Gumbel noise, rollouts) derives from (seed, step, rank)
    torch.manual_seed((args.seed * 1_000_003 + step) * 64 + acc.process_index)
    img_B3HW, labels_B = img_B3HW.to(device, non_blocking=True), labels_B.to(device, non_blocking=True)
    with torch.no_grad(), acc.autocast():
        gt_idx = vae.img_to_idxBl(img_B3HW.float())
    with acc.autocast():
        if args.context == 'rollout':
            G.eval()
            with torch.no_grad():
                _, ctx_idx = var.autoregressive_infer_cfg(per_device, labels_B, cfg=args.cfg, top_k=args.top_k,
                                                          top_p=args.top_p, guidance_hook=models.make_guidance_hook(var, G),
                                                          guidance_w=args.w_train, inject=args.inject, ret_idx=True)
            G.train()
        else:
            ctx_idx = gt_idx
        logits_BLV, g_BLC = guided_logits(var, G, labels_B, ctx_idx, args.w_train, args.inject)
        scales = None if args.disc_scales == 'all' else torch.randint(1, SN, (per_device,), device=device)
        fake, real, labs = soft_decode.disc_images(var, logits_BLV, ctx_idx, gt_idx, labels_B, scales, args.decode, args.tau)

        # --- D step on real vs the current fakes
        D.requires_grad_(True)
        out_real, out_fake = D(real, labs), D(fake.detach(), labs)
        loss_D = F.relu(1 - out_real).mean() + F.relu(1 + out_fake).mean()
        r1 = torch.zeros((), device=device)
        if args.r1_gamma > 0 and step % args.r1_every == 0:  # lazy R1, scaled by its interval
            real_r = real.detach().float().requires_grad_(True)
            grad, = torch.autograd.grad(D(real_r, labs, double_backward=True).sum(), real_r, create_graph=True)
            r1 = grad.square().sum([1, 2, 3]).mean()
            loss_D = loss_D + args.r1_gamma / 2 * r1 * args.r1_every

        # the token CE is always on a teacher-forced pass
        logits_ce = guided_logits(var, G, labels_B, gt_idx, args.w_train, args.inject)[0] if args.context == 'rollout' else logits_BLV
        loss_ce = F.cross_entropy(logits_ce.reshape(-1, var.V), torch.cat(gt_idx, 1).reshape(-1))

    stats = torch.stack([loss_D.detach().float(), r1.detach().float(), loss_ce.detach().float(),
                         (out_real > 0).float().mean(), (out_fake < 0).float().mean()])
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    check(step + 1, {'loss_D': stats[0].item(), 'R1': stats[1].item(), 'loss_CE': stats[2].item()})
    opt_d.zero_grad(set_to_none=True)
    loss_D.backward()
    sync_grads(list(D.head_parameters()), world)
    gn_d = torch.nn.utils.clip_grad_norm_(list(D.head_parameters()), args.grad_clip)
    opt_d.step()

    # --- G step against the updated D
    D.requires_grad_(False)
    with acc.autocast():
        loss_adv = -D(fake, labs).mean()
        loss_G = loss_adv + args.lambda_rec * loss_ce
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


def main(argv=None):
    args = resolve_args(argv)
    mp = args.mixed_precision or ('bf16' if torch.cuda.is_available() else 'no')
    # cpu=True on a GPU-less machine makes torchrun-style launches (accelerate launch --multi_gpu) use gloo on the CPU
    acc = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    out_dir = Path(args.out_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    dataset = models.build_train_data(args.depth, args.data_path, n_tiny=args.n_tiny)
    if args.global_batch_size % world:
        raise SystemExit(f'--global_batch_size {args.global_batch_size} is not divisible by {world} processes.')
    per_device = args.global_batch_size // world
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f'The training set has {len(dataset)} images, fewer than one global batch ({args.global_batch_size}).')
    total_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)

    vae, var, D, G = build_everything(args, device)
    opt_g = torch.optim.AdamW(G.parameters(), lr=args.lr_g, betas=(0.9, 0.999), weight_decay=1e-5)
    opt_d = torch.optim.AdamW(D.head_parameters(), lr=args.lr_d, betas=(0.9, 0.999), weight_decay=1e-5)
    ckpt_path = out_dir / 'last.pt'
    step, last_ckpt_step = 0, None
    resume = ckpt_path if args.resume == 'auto' and ckpt_path.is_file() else (args.resume if args.resume != 'auto' else None)
    if resume:
        ck = torch.load(resume, map_location='cpu', weights_only=False)
        for k in ('depth', 'inject', 'context', 'decode', 'broadcast', 'global_batch_size', 'seed', 'disc_norm'):
            if ck['args'].get(k) != getattr(args, k):
                raise SystemExit(f'--resume {resume}: it was trained with --{k} {ck["args"].get(k)}, now --{k} {getattr(args, k)}.')
        G.load_state_dict(ck['injector'])
        D.load_heads_state_dict(ck['disc_heads'])
        opt_g.load_state_dict(ck['opt_g'])
        opt_d.load_state_dict(ck['opt_d'])
        step = last_ckpt_step = ck['step']
        acc.print(f'[AID-VAR] resumed from {resume} at step {step}')

    def save_checkpoint():
        sums = param_checksum([G, D.heads], device)
        if world > 1:  # every rank must hold the same weights, or the run is silently broken
            all_sums = acc.gather(sums)
            if not torch.all(all_sums == all_sums[0]):
                raise SystemExit(f'[AID-VAR] ranks disagree on the weights at step {step}: checksums {all_sums.tolist()}')
        if acc.is_main_process:
            models.atomic_save(dict(injector=G.state_dict(), disc_heads=D.heads_state_dict(), opt_g=opt_g.state_dict(),
                                    opt_d=opt_d.state_dict(), step=step, args=vars(args), world=world,
                                    weights_checksum=float(sums)), ckpt_path)
            models.save_injector(out_dir / 'injector.pt', G, dict(depth=args.depth, inject=args.inject, w_train=args.w_train,
                                                                   context=args.context, decode=args.decode, step=step,
                                                                   lambda_rec=args.lambda_rec, seed=args.seed))
        acc.wait_for_everyone()

    log_f = open(out_dir / 'log.jsonl', 'a') if acc.is_main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not acc.is_main_process, desc='AID-VAR', dynamic_ncols=True)
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
            bar.update(1)
            bar.set_postfix(D=f'{rec["loss_D"]:.3f}', adv=f'{rec["loss_adv"]:.3f}', ce=f'{rec["loss_CE"]:.3f}',
                            acc_r=f'{rec["acc_real"]:.2f}', acc_f=f'{rec["acc_fake"]:.2f}', ips=f'{rec["img_per_s"]:.1f}')
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
