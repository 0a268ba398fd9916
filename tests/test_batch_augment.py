"""Batched augmentation (``stalign.models.batch_augment``) against the per-sample torchvision path: the same
parameters per seed, the same ops given the parameters, the same statistics; seeded per spot in training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from stalign.models import batch_augment as ba
from stalign.models.transforms import he_eval_transform, he_train_transform
from stalign.training.data import SeededBatchAugment, sample_seed

P = 24


def _crops(n: int, p: int = P, seed: int = 0) -> torch.Tensor:
    """H&E-like uint8 crops: pink eosin background, purple nuclei blobs, some white glass."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([230.0, 160.0, 200.0]).view(1, 3, 1, 1) + 15 * torch.randn(n, 3, p, p, generator=g)
    nuclei = (torch.rand(n, 1, p, p, generator=g) < 0.25).float()
    img = base * (1 - nuclei) + torch.tensor([110.0, 60.0, 150.0]).view(1, 3, 1, 1) * nuclei
    img[:, :, : p // 6] = 245.0  # glass
    return img.clamp(0, 255).to(torch.uint8)


def _params(aug: ba.BatchAugment, seeds) -> torch.Tensor:
    return torch.tensor([aug.draw(torch.Generator().manual_seed(s)) for s in seeds], dtype=torch.float64)


def _per_sample(transform, x: torch.Tensor, seeds) -> torch.Tensor:
    out = []
    for img, s in zip(x, seeds):
        torch.manual_seed(s)
        out.append(transform(img))
    return torch.stack(out)


def test_flips_and_rot90_equal_the_per_sample_path_exactly():
    x, seeds = _crops(40), range(100, 140)
    aug = ba.BatchAugment(P, jitter=0.0, hue=0.0)  # geometry only; the same draws as he_train_transform's
    got = aug(x, _params(aug, seeds))
    want = _per_sample(he_train_transform(P, jitter=0.0, hue=0.0), x, seeds)
    assert torch.equal((got * 255).round().to(torch.uint8), want)
    codes = {tuple(r) for r in _params(aug, seeds)[:, :3].tolist()}
    assert len(codes) >= 10  # most of the 16 flip/rotation combinations occur


@pytest.mark.parametrize("chunk", [1, 5, None])  # one crop, groups of one op order (as 224-px crops on the CPU), all
def test_whole_training_transform_equals_the_per_sample_path_on_float_crops(chunk):
    # float crops go through torchvision's float kernels: then only float rounding separates the two paths,
    # so this checks the per-seed draws (flips, rot90, jitter order and factors) and every op together
    x, seeds = _crops(24).float() / 255, [sample_seed(3, 1, i) for i in range(24)]
    aug = ba.BatchAugment(P, jitter=0.3, hue=0.1, chunk=chunk)
    got = aug(x, _params(aug, seeds))
    want = _per_sample(he_train_transform(P, jitter=0.3, hue=0.1), x, seeds)
    assert (got - want).abs().max() < 2e-5


@pytest.mark.parametrize("op, tv, factors", [
    (ba.adjust_brightness, TF.adjust_brightness, [0.9, 1.1, 1.0, 0.5]),
    (ba.adjust_contrast, TF.adjust_contrast, [0.9, 1.1, 1.0, 0.5]),
    (ba.adjust_saturation, TF.adjust_saturation, [0.9, 1.1, 1.0, 0.5]),
    (ba.adjust_hue, TF.adjust_hue, [-0.02, 0.02, 0.0, 0.45]),
])
def test_colour_ops_match_torchvision_functional(op, tv, factors):
    x8 = _crops(4)
    x8[0, :, :4, :4] = 128  # grey pixels: no hue
    x = x8.float() / 255
    got = op(x.clone(), torch.tensor(factors))
    on_float = torch.stack([tv(x[i], factors[i]) for i in range(4)])
    on_uint8 = torch.stack([tv(x8[i], factors[i]) for i in range(4)]).float() / 255
    assert (got - on_float).abs().max() < 1e-5
    # torchvision's uint8 kernels truncate, and floor the grey image that contrast/saturation blend with
    assert (got - on_uint8).abs().max() <= 1.5 / 255


def test_hue_shift_matches_torchvision_over_its_whole_range():
    # the arithmetic-only hue (no where/masks): every sextant, ties of the max (r = g, g = b, r = b), grey
    # pixels and the full factor range, per crop as a number (the CPU's one-crop passes) and batched
    x = _crops(48).float() / 255
    x[0, :, 0, :4] = torch.tensor([[1.0, 1.0, 0.2, 0.0], [1.0, 0.3, 0.2, 0.0], [0.5, 0.3, 0.2, 0.0]])  # ties
    x[1] = torch.rand(3, P, P, generator=torch.Generator().manual_seed(5))  # all hues
    f = torch.linspace(-0.5, 0.5, 48)
    want = torch.stack([TF.adjust_hue(x[i], float(f[i])) for i in range(48)])
    assert (ba.adjust_hue(x.clone(), f) - want).abs().max() < 1e-5
    one = torch.cat([ba.adjust_hue(x[i:i + 1].clone(), float(f[i]), ba.workspace(x[:1])) for i in range(48)])
    assert (one - want).abs().max() < 1e-5


def test_flips_and_rotations_on_a_gpu_equal_the_cpu_copies():
    # the device path (torch ops per group of crops) against the CPU's numpy views, all 16 codes, uint8 crops
    # as batched reads give them (channels-last views)
    x = _crops(16).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    codes = np.arange(16)
    a, b = torch.empty(16, 3, P, P), torch.empty(16, 3, P, P)
    ba._geometric_numpy(x, np.arange(16), codes, a)
    ba._geometric_torch(x, codes, b)
    assert torch.equal(a, b)
    assert torch.equal(a[5], torch.rot90(x[5].flip(-2), 1, dims=(-2, -1)).float())  # vflip then rot90 k=1


def _skimage_hed_jitter(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hed -> s * alpha + beta (optical density) -> hed2rgb, written out with its formulas
    (negative stain amounts kept: ``hed_jitter`` does not clip them)."""
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    log_adjust = np.log(1e-6)
    stains = (np.log(np.maximum(rgb, 1e-6)) / log_adjust) @ hed_from_rgb  # rgb2hed (without its clip at 0)
    stains = stains * alpha + beta / -log_adjust  # beta in optical density = -log_adjust skimage units
    return np.clip(np.exp(-(stains * -log_adjust) @ rgb_from_hed), 0, 1)  # hed2rgb


def test_hed_jitter_matches_the_skimage_formulas():
    x = _crops(3).double() / 255
    alpha = torch.tensor([[1.0, 1.0, 1.0], [1.05, 0.95, 1.02], [0.9, 1.1, 1.0]], dtype=torch.float64)
    beta = torch.tensor([[0.0, 0.0, 0.0], [0.03, -0.02, 0.01], [-0.05, 0.05, 0.0]], dtype=torch.float64)
    got = ba.hed_jitter(x, alpha, beta)
    for i in range(3):
        want = _skimage_hed_jitter(x[i].permute(1, 2, 0).numpy(), alpha[i].numpy(), beta[i].numpy())
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), want, atol=1e-9)
    assert (got[0] - x[0]).abs().max() < 1e-9  # alpha 1, beta 0: the same crop
    # in the pipeline: off by default (no draws after the jitter); with stain > 0 the crops change colour
    plain, stained = ba.BatchAugment(P), ba.BatchAugment(P, stain=0.05)
    assert _params(plain, [1])[0, ba.ALPHA].tolist() == [1.0, 1.0, 1.0]
    p = _params(stained, [1])
    assert torch.equal(p[:, :ba.ALPHA.start], _params(plain, [1])[:, :ba.ALPHA.start])
    assert not torch.allclose(stained(_crops(1), p), plain(_crops(1), p[:, :ba.N_PARAMS].clone().index_fill_(
        1, torch.arange(ba.ALPHA.start, ba.BETA.start), 1.0).index_fill_(1, torch.arange(ba.BETA.start, 17), 0.0)))


def test_statistics_of_many_augmented_crops_match_the_per_sample_path():
    # downsizing 48 -> 24 px: the batched path resizes first, the per-sample path last; the two only agree in
    # distribution, so compare per-channel mean and spread over 256 crops
    x, seeds = _crops(256, p=48, seed=1), range(256)
    aug = ba.BatchAugment(P)
    got = aug(x, _params(aug, seeds)) * 255
    want = _per_sample(he_train_transform(P), x, seeds).float()
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3)),
                 lambda t: t.mean(dim=(2, 3)).std(dim=0)):  # the spread of crop means: the jitter's strength
        a, b = stat(got), stat(want)
        assert (a - b).abs().max() < 0.03 * b.abs().max() + 0.5, (a, b)
    # passes of a few crops of one colour-op order (rows spread over the batch, resized first) give the same crops
    p16 = _params(aug, range(16))
    assert (ba.BatchAugment(P, chunk=2)(x[:16], p16) - aug(x[:16], p16)).abs().max() < 1e-6
    # resize only (eval): uint8 crops on the CPU resize with torch's uint8 kernel, as torchvision's resize does
    # (also from the channels-last views that batched reads give); float crops as torchvision's float resize
    ev = ba.BatchAugment(P, train=False)
    assert torch.equal(ev(x[:8]) * 255, he_eval_transform(P)(x[:8]).float())
    channels_last = x[:8].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(ev(channels_last), ev(x[:8]))
    assert (ev(x[:8].float() / 255) - he_eval_transform(P)(x[:8].float() / 255).clamp(0, 1)).abs().max() < 1e-5


def test_seeded_batch_augment_is_per_spot_and_independent_of_the_batch():
    spot, niche = ba.BatchAugment(P), ba.BatchAugment(P // 2)
    aug = SeededBatchAugment(spot, niche, seed=7)
    x = _crops(6)
    index = torch.tensor([11, 4, 9, 30, 2, 5])

    def batch(rows):
        return {"spot_image": x[rows], "niche_image": x[rows], "index": index[rows]}

    whole = aug(batch(list(range(6))), epoch=2)
    part = aug(batch([3, 1]), epoch=2)
    assert torch.equal(part["spot_image"], whole["spot_image"][[3, 1]])
    assert torch.equal(part["niche_image"], whole["niche_image"][[3, 1]])
    assert whole["niche_image"].shape == (6, 3, P // 2, P // 2)
    # spot 9 in epoch 2: the per-sample seed, spot's draws then niche's from the same generator
    g = torch.Generator().manual_seed(sample_seed(7, 2, 9))
    s_row, n_row = spot.draw(g), niche.draw(g)
    s_par, n_par = aug.draw([9], epoch=2)
    assert s_par[0].tolist() == s_row and n_par[0].tolist() == n_row
    assert not torch.equal(aug(batch([2]), epoch=3)["spot_image"], whole["spot_image"][[2]])  # a new epoch
    # paired negatives: their niche crops get their own spots' niche parameters
    with_neg = aug({**batch([0]), "negatives": {"niche_image": x[[2]], "index": index[[2]]}}, epoch=2)
    assert torch.equal(with_neg["negatives"]["niche_image"], whole["niche_image"][[2]])


def test_bad_ranges_are_refused():
    from stofm.util.errors import InputError

    with pytest.raises(InputError, match="stain"):
        ba.BatchAugment(P, stain=1.5)
    with pytest.raises(ValueError, match="parameter"):
        ba.BatchAugment(P)(_crops(2))


def test_training_config_turns_the_stain_jitter_on():
    from stalign.training.config import ConfigError, build_config
    from stalign.training.trainer import _transforms

    assert build_config({}).stain_jitter == 0.0
    with pytest.raises(ConfigError, match="stain_jitter"):
        build_config({"stain_jitter": 1.5})

    class Enc:
        input_size, interpolation = 16, "bilinear"

    class Model:
        spot_image_encoder = niche_image_encoder = Enc()

    spot, niche = _transforms(Model(), train=True, stain=0.05)
    assert spot.stain == niche.stain == 0.05 and spot.size == 16 and spot.mode == "bilinear"
    assert all(not t.train and t.stain == 0 for t in _transforms(Model(), train=False, stain=0.05))
