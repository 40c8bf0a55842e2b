"""Checkpoint and hub I/O: the official VAR / VQ-VAE, DINO and FID Inception weights (found locally, else fetched
through one download helper), torch files read with one-line errors (one checked load), the shipped tiny models, the
injector files, and the one entry point every script loads its preset's frozen VQ-VAE + VAR through."""
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import data
import features
import models
from models import VAR, VQVAE, frozen

REPO_DIR = Path(__file__).resolve().parent
HF_REPO = 'FoundationVision/var'
VAE_FILE = 'vae_ch160v4096z32.pth'
DINO_HF_REPO = 'timm/vit_small_patch16_224.dino'
FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_NAME
# AIDVAR_TINY_DIR / AIDVAR_TINY_PRESET (models.py) point every script at other tiny weights (a pretrain_tiny.py run)
TINY_DIR = Path(os.environ.get('AIDVAR_TINY_DIR', REPO_DIR / 'weights'))
TINY_FILES = dict(vae='tiny_vae.pt', var='tiny_var.pt', featnet='tiny_featnet.pt', judge='tiny_judge.pt',
                  injector='tiny_injector.safetensors')


# ----------------------------------------------------------------------------------------------------------
# Downloads and checked loads

def hub_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '0').strip().lower() in ('1', 'true', 'yes', 'on')


HUB_CHECK_TIMEOUT = 3.0  # seconds; huggingface_hub itself retries 5 times with back-off (~25 s offline)


def hub_unreachable(url: Optional[str] = None) -> Optional[str]:
    """None if the host of url (default: the Hugging Face hub), or the HTTPS proxy in use, accepts a TCP connection
    within HUB_CHECK_TIMEOUT seconds, else why not. Run before every download, so an offline machine without
    HF_HUB_OFFLINE=1 fails in seconds instead of after the download client's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit
    from huggingface_hub import constants
    proxy = next((os.environ[k] for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy') if os.environ.get(k)), None)
    url = urlsplit(proxy if proxy else url or constants.ENDPOINT)
    host, port = url.hostname, url.port or (80 if url.scheme == 'http' else 443)
    result = {}

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT).close()
            result['ok'] = True
        except OSError as e:
            result['error'] = f'{type(e).__name__}: {e}'
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(HUB_CHECK_TIMEOUT + 0.5)
    if result.get('ok'):
        return None
    return (f'{"the proxy " if proxy else ""}{host}:{port} is not reachable '
            f'({result.get("error", f"no answer within {HUB_CHECK_TIMEOUT:g} s")})')


def download(missing: str, how: str, fetch, url: Optional[str] = None):
    """fetch()'s result (a download), unless HF_HUB_OFFLINE is set, the host of url (default: the Hugging Face hub)
    does not answer, or fetch fails: then one SystemExit that starts with `missing` (what is not there) and ends with
    `how` (how to get it by hand)."""
    if hub_offline():
        raise SystemExit(f'{missing}, and it cannot be downloaded offline (HF_HUB_OFFLINE is set). To get it: {how}.')
    why = hub_unreachable(url)
    if why:
        raise SystemExit(f'{missing}, and it cannot be downloaded: {why} (offline? set HF_HUB_OFFLINE=1). To get it: {how}.')
    try:
        return fetch()
    except Exception as e:  # any network / hub / disk failure ends in the same actionable message, with its cause
        raise SystemExit(f'{missing} and downloading it failed ({data.first_line(e)}). '
                         f'To get it: {how}.') from e


def find_checkpoint(filename: str, ckpt_dir='checkpoints', repo_id: str = HF_REPO) -> Path:
    """ckpt_dir/filename, downloaded from the HF hub repo if missing (download: one-line SystemExit offline)."""
    path = Path(ckpt_dir) / filename
    if path.is_file():
        return path
    how = (f'download https://huggingface.co/{repo_id}/resolve/main/{filename} (e.g. `hf download '
           f'{repo_id} {filename} --local-dir {ckpt_dir}`) and put it at {path}, or point --ckpt_dir at the folder '
           f'that holds it')

    def fetch():
        from huggingface_hub import hf_hub_download
        print(f'[ckpt] {filename} not in {ckpt_dir}: downloading from the hub repo {repo_id} ...')
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(ckpt_dir)))
    return download(f'Checkpoint {filename} was not found at {path.resolve()}', how, fetch)


def torch_load(path, what: str = 'checkpoint', hint: str = ''):
    """torch.load(path, weights_only=True) on the CPU; a missing, truncated or foreign file is one SystemExit line
    (`what` the file is meant to be, `hint` a sentence on where the right one comes from)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'{path}: no such file ({what}). {hint}'.rstrip())
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except MemoryError:  # a real file too large for this machine is not "corrupt"
        raise
    # broad on purpose: on arbitrary bytes torch's weights-only unpickler raises RuntimeError, UnpicklingError,
    # EOFError, IndexError, ...; each means the file is not a usable torch file, and the cause is in the message
    except Exception as e:
        raise SystemExit(f'{path} ({path.stat().st_size:,} bytes) is not a readable {what} ({data.first_line(e)}): it is '
                         f'probably truncated or corrupt (an interrupted download or write?), or not a torch file. '
                         f'{hint}'.rstrip()) from None


def load_state_dict_file(path) -> dict:
    """torch_load of a checkpoint file -> flat {key: tensor}; unwraps the common wrappers."""
    sd = torch_load(path, 'PyTorch checkpoint')
    if isinstance(sd, dict) and 'trainer' in sd and isinstance(sd['trainer'], dict) and 'var_wo_ddp' in sd['trainer']:
        sd = sd['trainer']['var_wo_ddp']  # the official training checkpoint (ar-ckpt-*.pth)
    for wrapper in ('state_dict', 'model', 'teacher'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f'{path} does not hold a state_dict (a flat key -> tensor dict); found {type(sd).__name__}.')
    return sd


def describe_state_dict(sd: dict) -> str:
    """One phrase saying what a state_dict is: 'a depth-20 VAR (width 1280, 1000 classes, L=680)', 'a VQ-VAE ...'."""
    if 'class_emb.weight' in sd and 'head.weight' in sd:
        depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
        n_cls, C = sd['class_emb.weight'].shape
        L = sd['pos_1LC'].shape[1] if 'pos_1LC' in sd else '?'
        return f'a depth-{depth} VAR (width {C}, {n_cls - 1} classes, L={L})'
    if 'quantize.embedding.weight' in sd and 'encoder.conv_in.weight' in sd:
        V, Cvae = sd['quantize.embedding.weight'].shape
        ch = sd['encoder.conv_in.weight'].shape[0]
        return f'a VQ-VAE (vocab {V}, Cvae {Cvae}, ch {ch})'
    if 'proj_out.weight' in sd and 'proj_in.weight' in sd:
        return f'a guidance injector (width {sd["proj_out.weight"].shape[0]})'
    keys = list(sd)[:3]
    return f'an unknown state_dict with {len(sd)} entries (first keys {keys})'


def load_checked(model: nn.Module, sd: dict, path, expected: str):
    """Strict load that first compares keys/shapes and, on mismatch, says what the file is instead of dumping keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
             and not k.endswith('ema_vocab_hit_SV')]  # per-scale usage stats: other patch_nums are fine
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f'{len(wrong)} shape mismatches, e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}')
        if missing:
            detail.append(f'{len(missing)} missing keys, e.g. {missing[0]}')
        if unexpected:
            detail.append(f'{len(unexpected)} unexpected keys, e.g. {unexpected[0]}')
        raise SystemExit(f'{path} is {describe_state_dict(sd)}, but {expected} was asked for ({"; ".join(detail)}).')
    # assign=True lets a model built on the meta device take the file's tensors without allocating twice
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True,
                          assign=any(t.is_meta for t in own.values()))
    return model


# ----------------------------------------------------------------------------------------------------------
# The frozen models of a preset

def load_pretrained(depth: int, ckpt_dir='checkpoints', device='cpu'):
    """Official VQVAE + VAR-d{depth} with their ImageNet-256 weights, in eval mode, frozen. Returns (vae, var)."""
    if depth not in models.REAL_DEPTHS:
        raise SystemExit(f'--depth must be one of {models.REAL_DEPTHS} (the released VAR-d16/20/24/30), got {depth}.')
    var_path = find_checkpoint(f'var_d{depth}.pth', ckpt_dir)
    find_checkpoint(VAE_FILE, ckpt_dir)  # both files present before the (slow) loading starts
    vae, var = models.build_vae_var(device='meta', depth=depth)  # no random init: the files' tensors are assigned
    load_checked(var, load_state_dict_file(var_path), var_path, f'a depth-{depth} VAR (width {64 * depth}, 1000 classes, L=680)')
    load_vae(ckpt_dir, vae=vae)
    return frozen(vae, device), frozen(var, device)


def load_vae(ckpt_dir='checkpoints', device='cpu', vae: Optional[VQVAE] = None) -> VQVAE:
    """The official VQ-VAE (vae_ch160v4096z32.pth) alone, frozen; loads into `vae` if given (e.g. built on meta)."""
    path = find_checkpoint(VAE_FILE, ckpt_dir)
    if vae is None:
        with torch.device('meta'):
            vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4)
    load_checked(vae, load_state_dict_file(path), path, 'the VQ-VAE vae_ch160v4096z32 (vocab 4096, Cvae 32, ch 160)')
    return frozen(vae, device)


def tiny_file(name: str) -> Path:
    path = TINY_DIR / TINY_FILES[name]
    if not path.is_file():
        raise SystemExit(f'The tiny preset file {path} is missing. It ships with the repository; restore it with '
                         f'`git checkout -- weights/` or rebuild every tiny model with `python pretrain_tiny.py`.')
    return path


def load_tiny_file(net: nn.Module, name: str, device='cpu') -> nn.Module:
    """A shipped tiny network (TINY_FILES name) loaded into `net` (fp16 on disk), frozen."""
    path = tiny_file(name)
    return frozen(load_checked(net, load_state_dict_file(path), path, f'the tiny preset {name}'), device)


def load_tiny(device='cpu'):
    """The shipped tiny VQVAE + VAR, eval mode, frozen. Returns (vae, var)."""
    vae, var = models.build_tiny()
    return load_tiny_file(vae, 'vae', device), load_tiny_file(var, 'var', device)


def load_frozen(preset, ckpt_dir='checkpoints', device='cpu', random_init=False, seed=0, plant=None, vae_only=False):
    """The frozen VQ-VAE + VAR of a preset (models.resolve_preset): the shipped tiny ones, the official VAR-d{depth}
    (downloaded if missing), or random from-scratch weights (random_init; `seed`; the VQ-VAE does not depend on the
    depth); then the positive control's planted error if asked (plant: a models.PLANT_STRENGTH kind). Returns
    (vae, var); vae_only: (the official VQ-VAE, None) for the real models, whose VARs of every depth share it."""
    if vae_only and not (preset.tiny or random_init):
        return load_vae(ckpt_dir, device), None
    if random_init:
        vae, var = models.build_random(None if preset.tiny else preset.depth or 16, device, seed=seed)
    else:
        vae, var = load_tiny(device) if preset.tiny else load_pretrained(preset.depth, ckpt_dir, device)
    if plant:
        models.plant_error(var, plant)
    return vae, var


def load_dino(ckpt=None, cache_dir=None) -> nn.Module:
    """DINO ViT-S/16 (models.build_dino) with its pretrained weights, in eval mode: from `ckpt` (.safetensors / .pth /
    .bin; timm or official DINO naming; must exist), else the Hugging Face hub cache (`cache_dir`, default the hub's),
    downloaded when missing. Every failure is a one-paragraph SystemExit."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    how = (f'run once with network access (the weights are fetched from the Hugging Face repo {DINO_HF_REPO} into the '
           f'hub cache), or download model.safetensors from that repo (e.g. `hf download {DINO_HF_REPO} '
           f'model.safetensors --local-dir checkpoints`) or the official DINO file dino_deitsmall16_pretrain.pth and '
           f'pass its path as the DINO checkpoint')
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise SystemExit(f'DINO ViT-S/16 weights ({models.DINO_MODEL}) not found: the file {ckpt} does not exist. '
                             f'To get it: {how}.')
        path = str(ckpt)
    else:
        path = try_to_load_from_cache(DINO_HF_REPO, 'model.safetensors', cache_dir=cache_dir)
        if not isinstance(path, str):
            hub_dir = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
            path = download(f'DINO ViT-S/16 weights ({models.DINO_MODEL}) are not in the Hugging Face cache {hub_dir}',
                            how, lambda: hf_hub_download(DINO_HF_REPO, 'model.safetensors', cache_dir=cache_dir))
    model = models.build_dino()
    load_checked(model, _dino_state_dict(path), path, f'the DINO ViT-S/16 backbone ({models.DINO_MODEL})')
    return model.eval()


def _dino_state_dict(path):
    """A DINO ViT-S/16 weights file (timm .safetensors, or official/timm .pth) -> timm-named ViT state_dict."""
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file as load_safetensors
        sd = load_safetensors(str(path), device='cpu')
    else:  # the official DINO file is already a plain dict; full training checkpoints hold it under 'teacher'
        sd = load_state_dict_file(path)
    out = {}
    for k, v in sd.items():
        for prefix in ('module.', 'backbone.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith('head'):  # DINO's projection head / classifier: not part of the ViT
            out[k] = v
    return out


def load_feature_net(preset, pretrained=True, dino_ckpt=None) -> nn.Module:
    """The image feature network of a preset (preset.feature_net): D's backbone and the ISCS features. 'featnet': the
    shipped tiny feature network (frozen); 'dino': DINO ViT-S/16 (eval mode). Random weights when not pretrained."""
    if preset.feature_net == 'featnet':
        return load_tiny_file(models.build_featnet(), 'featnet') if pretrained else models.build_featnet()
    return load_dino(ckpt=dino_ckpt) if pretrained else models.build_dino()


def load_fid_inception(ckpt_dir='checkpoints', device='cpu') -> features.FIDInceptionV3:
    """FIDInceptionV3 with the pytorch-fid weights from ckpt_dir (downloaded from FID_WEIGHTS_URL if missing), frozen;
    every failure is a SystemExit that says where the file comes from."""
    path = Path(ckpt_dir) / FID_WEIGHTS_NAME
    if not path.is_file():
        def fetch():
            with data.atomic_path(path) as tmp:
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(tmp), progress=True)
        download(f'Checkpoint {FID_WEIGHTS_NAME} (FID / IS / precision-recall) was not found at {path}',
                 f'download {FID_WEIGHTS_URL} (~95 MB) and put it at {path}, or point --ckpt_dir at the folder that '
                 f'holds it', fetch, url=FID_WEIGHTS_URL)
    model = features.FIDInceptionV3()
    try:
        sd, own = load_state_dict_file(path), model.state_dict()
        missing = [k for k in own if k not in sd]
        if all(k.endswith('num_batches_tracked') for k in missing):  # the released file lacks these (unused in eval)
            sd = {**sd, **{k: own[k] for k in missing}}
        load_checked(model, sd, path, 'the FID InceptionV3 weights (566 state_dict entries)')
    except SystemExit as e:  # a wrong or truncated file: add where the right one comes from
        raise SystemExit(f'{e.code} The right file: {FID_WEIGHTS_URL}') from None
    return frozen(model, device)


EVAL_NETS = ('judge', 'featnet', 'inception')


def load_eval_net(name: str, random_init=False, ckpt_dir='checkpoints', device='cpu') -> nn.Module:
    """A frozen evaluation network (EVAL_NETS; features.extract reads it): the tiny judge or feature network, or the
    FID InceptionV3; random weights (from the global torch seed) with random_init."""
    if name == 'inception':
        return frozen(features.FIDInceptionV3(), device) if random_init else load_fid_inception(ckpt_dir, device)
    net = models.build_judge() if name == 'judge' else models.build_featnet()
    return frozen(net, device) if random_init else load_tiny_file(net, name, device)


def load_disc_heads(D: models.ProjectedDiscriminator, path, disc_norm: str):
    """Loads the D heads of a train_disc_probe.py --space rgb file into D; one-line SystemExit for a file that is not
    one, holds latent-space heads, or heads of another norm / backbone."""
    ck = torch_load(path, 'torch file', 'Give the disc_heads_rgb.pt that train_disc_probe.py --space rgb writes.')
    if not (isinstance(ck, dict) and isinstance(ck.get('disc_heads'), dict)):
        raise SystemExit(f'--disc_ckpt {path} holds no D heads (keys {sorted(map(str, ck))[:6] if isinstance(ck, dict) else type(ck).__name__}); '
                         f'give the disc_heads_rgb.pt that train_disc_probe.py --space rgb writes.')
    meta = ck.get('meta', {})
    if meta.get('space', 'rgb') != 'rgb':
        raise SystemExit(f'--disc_ckpt {path} holds latent-space heads (train_disc_probe.py --space latent); '
                         f'AID-VAR needs the RGB projected discriminator (--space rgb).')
    if meta.get('norm', 'bn') != disc_norm:
        raise SystemExit(f'--disc_ckpt {path} holds heads with --disc_norm {meta.get("norm", "bn")}; '
                         f'this run uses --disc_norm {disc_norm}.')
    try:
        D.load_heads_state_dict(ck['disc_heads'])
    except RuntimeError as e:  # heads of another backbone or preset
        raise SystemExit(f'--disc_ckpt {path}: its heads do not fit this D ({data.first_line(e)}).') from None


# ----------------------------------------------------------------------------------------------------------
# Injector files

def weights_sha256(module: nn.Module) -> str:
    """sha256 (hex) of a network's weights as held in memory (names, dtypes' bytes): the same on every machine for the
    same loaded checkpoint (and plant_error's shift), unlike a file hash it also covers random or edited weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


INJECTOR_FORMAT = 'aid-var injector 1'


def save_injector(path, injector, meta: dict):
    """The released injector as safetensors: float32 tensors and string metadata: `aid_var_meta` (JSON: depth,
    patch_nums, embed_dim, inject, w_train, broadcast, validation, var_sha256, ...) and, for tools that list
    metadata, format / preset / depth / w_train / verdict / var_sha256 (weights_sha256 of the VAR trained on)."""
    from safetensors.torch import save_file
    meta = dict(meta, embed_dim=injector.embed_dim, patch_nums=list(injector.patch_nums), broadcast=injector.broadcast)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in injector.state_dict().items()}
    val = meta.get('validation') or {}
    flat = dict(format=INJECTOR_FORMAT, preset='tiny' if meta.get('depth') is None else f'VAR-d{meta["depth"]}',
                depth=str(meta.get('depth')), w_train=str(meta.get('w_train')), verdict=val.get('verdict', 'not validated'),
                var_sha256=str(meta.get('var_sha256')), aid_var_meta=json.dumps(meta))
    with data.atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=flat)


def _read_injector_file(path):
    """(state_dict, meta) of an injector file: safetensors (save_injector) or the older .pt ({'meta', 'state_dict'})."""
    if not path.is_file():
        raise SystemExit(f'Injector file {path} does not exist (train one with `python train_injector.py`).')
    with open(path, 'rb') as f:
        torch_file = f.read(2) in (b'PK', b'\x80\x02')  # torch.save's zip or legacy pickle; else safetensors
    if not torch_file:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                md, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:  # truncated or not safetensors: say so instead of a Rust error
            raise SystemExit(f'{path} is not a readable safetensors file ({type(e).__name__}); it is probably truncated.') from e
        if md.get('format') != INJECTOR_FORMAT or 'aid_var_meta' not in md:
            raise SystemExit(f'{path} is not an AID-VAR injector file (safetensors without its metadata: '
                             f'{describe_state_dict(sd)}); use the injector.safetensors written by train_injector.py.')
        return sd, json.loads(md['aid_var_meta'])
    obj = torch_load(path, 'injector file', 'Use the injector.safetensors written by train_injector.py.')
    if not (isinstance(obj, dict) and 'meta' in obj and 'state_dict' in obj):
        what = describe_state_dict(obj) if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()) else type(obj).__name__
        raise SystemExit(f'{path} is not an AID-VAR injector file (it is {what}); use the injector.safetensors written '
                         f'by train_injector.py.')
    return obj['state_dict'], obj['meta']


def read_injector_meta(path) -> dict:
    """The metadata of an injector file alone (no VAR needed)."""
    return _read_injector_file(Path(path))[1]


def load_injector(path, var: VAR, device='cpu'):
    """Loads an injector file written by train_injector.py (.safetensors, or an older .pt) and checks it fits `var`.
    Returns (injector, meta)."""
    path = Path(path)
    sd, meta = _read_injector_file(path)
    if meta['embed_dim'] != var.C or tuple(meta['patch_nums']) != tuple(var.patch_nums):
        raise SystemExit(f'{path} is an injector for a VAR of width {meta["embed_dim"]} (depth {meta.get("depth")}), '
                         f'patch_nums {tuple(meta["patch_nums"])}, but the VAR in use has width {var.C}, patch_nums '
                         f'{tuple(var.patch_nums)}.')
    inj = models.GuidanceInjector(meta['embed_dim'], meta['patch_nums'], broadcast=meta.get('broadcast', False))
    load_checked(inj, sd, path, 'a guidance injector')
    return frozen(inj, device), meta
