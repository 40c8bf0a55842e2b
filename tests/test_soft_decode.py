import pytest
import torch

import models
import soft_decode as sd


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    vae, var = models.build_tiny(init=True)
    for p in vae.parameters():  # random but non-trivial decoder
        p.data.normal_(0, 0.05) if p.dim() > 1 else None
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    return vae, vae.img_to_idxBl(img)


def test_one_hot_equals_hard_decode_exactly(tiny):
    vae, idx = tiny
    probs = [sd.one_hot(i, vae.vocab_size) for i in idx]
    with torch.no_grad():
        assert torch.equal(sd.decode_probs(vae, probs), vae.idxBl_to_img(idx, same_shape=True, last_one=True))
        for a, b in zip(sd.decode_probs(vae, probs, last_one=False), vae.idxBl_to_img(idx, same_shape=True, last_one=False)):
            assert torch.equal(a, b)
        # a prefix decodes to the cumulative image of those scales
        assert torch.equal(sd.decode_probs(vae, probs[:3]), vae.idxBl_to_img(idx, last_one=False)[2])
        assert torch.equal(sd.decode_mixed(vae, idx[:3], probs[3]), vae.idxBl_to_img(idx, last_one=False)[3])


@pytest.mark.parametrize('mode', sd.MODES)
def test_gradient_reaches_probabilities(tiny, mode):
    vae, idx = tiny
    torch.manual_seed(1)
    logits = [torch.randn(i.shape[0], i.shape[1], vae.vocab_size, requires_grad=True) for i in idx]
    g = torch.Generator().manual_seed(0)
    probs = [sd.relax(l, mode, tau=1.0, generator=g) for l in logits]
    img = sd.decode_probs(vae, probs)
    (img * torch.linspace(-1, 1, img.numel()).view_as(img)).sum().backward()
    for k, l in enumerate(logits):
        assert torch.isfinite(l.grad).all(), (mode, k)
        assert l.grad.abs().sum() > 0, (mode, k)


def test_st_forward_is_hard_and_relaxations_are_distributions(tiny):
    vae, idx = tiny
    logits = torch.randn(3, 16, vae.vocab_size)
    st = sd.relax(logits, 'st')
    assert torch.equal(st, sd.one_hot(logits.argmax(-1), vae.vocab_size))
    for mode in sd.MODES:
        p = sd.relax(logits, mode, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(p.sum(-1), torch.ones(3, 16)) and (p >= 0).all()
    with pytest.raises(ValueError, match='decode mode'):
        sd.relax(logits, 'hard')
