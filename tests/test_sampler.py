"""The optimised sampler (KV cache in one buffer, AdaLN parameters computed once, channels-last decode) against a
straightforward one: at every scale a full teacher-forced pass over all tokens so far (no cache, nothing reused),
the same CFG, guidance and top-k / top-p draws from the same generator. In float64 the two agree to round-off, so
the tokens must be identical."""
import pytest
import torch

import models
import official_var


def reference_sample(vae, var, labels_B, g_seed, cfg, top_k, top_p, hook=None, w=0.0, inject='input'):
    """Returns (tokens per scale, CFG logits per scale, image in [0, 1])."""
    B, SN = len(labels_B), len(var.patch_nums)
    rng = torch.Generator().manual_seed(g_seed)
    labels_2B = torch.cat((labels_B, torch.full_like(labels_B, var.num_classes)))
    idx_ls, logits_ls, g_ls = [], [], [torch.zeros(B, var.first_l, var.C, dtype=torch.float64)]
    for si, pn in enumerate(var.patch_nums):
        if si > 0:
            g_ls.append(hook(si, idx_ls[-1]) if hook is not None else torch.zeros(B, pn * pn, var.C, dtype=torch.float64))
        # the scales not sampled yet get token 0 and guidance 0: the block-causal mask hides them from scale si
        future = var.patch_nums[si + 1:]
        idx_full = idx_ls + [torch.zeros(B, p * p, dtype=torch.long) for p in (pn,) + future]
        g_BLC = torch.cat(g_ls + [torch.zeros(B, p * p, var.C, dtype=torch.float64) for p in future], dim=1).repeat(2, 1, 1)
        x_BLCv = vae.quantize.idxBl_to_var_input(idx_full).repeat(2, 1, 1)
        if inject == 'input':
            h_BLC, cond_BD = var.forward_hidden(labels_2B, x_BLCv, input_add_BLC=w * g_BLC)
        else:
            h_BLC, cond_BD = var.forward_hidden(labels_2B, x_BLCv)
            h_BLC = h_BLC + w * g_BLC
        logits_2BLV = var.get_logits(h_BLC, cond_BD)
        bg, ed = var.begin_ends[si]
        t = cfg * si / (SN - 1)
        logits_BlV = (1 + t) * logits_2BLV[:B, bg:ed] - t * logits_2BLV[B:, bg:ed]
        logits_ls.append(logits_BlV.clone())
        idx_ls.append(models.sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, rng=rng)[:, :, 0])
    img = vae.idxBl_to_img(idx_ls, same_shape=True, last_one=True).add(1).mul(0.5)
    return idx_ls, logits_ls, img


@pytest.mark.parametrize('guided', [None, 'input', 'head'])
@pytest.mark.parametrize('top_k,top_p', [(1, 0.0), (50, 0.9)], ids=['greedy', 'sampled'])
def test_sampler_equals_straightforward_reference(monkeypatch, guided, top_k, top_p):
    torch.manual_seed(0)
    vae, var = models.build_random(None)
    vae, var = vae.double(), var.double()
    hook, w = None, 0.0
    if guided:
        inj = models.GuidanceInjector(var.C, var.patch_nums).double().eval()
        torch.nn.init.normal_(inj.proj_out.weight, std=0.02)  # non-zero guidance
        hook, w = models.make_guidance_hook(var, inj), 0.5
    labels = torch.tensor([0, 3, 7])
    seen, sample = [], models.sample_with_top_k_top_p_

    def spy(logits_BlV, **kw):
        seen.append(logits_BlV.clone())  # before top-k / top-p mask it in place
        return sample(logits_BlV, **kw)
    monkeypatch.setattr(official_var, 'sample_with_top_k_top_p_', spy)
    img, idx = var.autoregressive_infer_cfg(3, labels, g_seed=5, cfg=1.5, top_k=top_k, top_p=top_p, guidance_hook=hook,
                                            guidance_w=w, inject=guided or 'input', ret_idx=True)
    monkeypatch.setattr(official_var, 'sample_with_top_k_top_p_', sample)
    ref_idx, ref_logits, ref_img = reference_sample(vae, var, labels, 5, 1.5, top_k, top_p, hook, w, guided or 'input')
    assert [torch.equal(a, b) for a, b in zip(idx, ref_idx)] == [True] * len(var.patch_nums)
    for a, b in zip(seen, ref_logits):
        assert (a - b).abs().max().item() < 1e-10
    assert img.is_contiguous() and (img - ref_img).abs().max().item() < 1e-10
    assert all(b.attn.cached_k is None for b in var.blocks)  # the cache is freed after sampling
