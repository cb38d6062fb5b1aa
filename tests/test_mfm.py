"""MFM: frequency masks, corruption, frequency loss, key names, sizes no preset uses, schedules, start-up checks; runs
of mfm.py as a user would start them."""
import json, math, os, pickle, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import mfm
from conftest import ROOT, TINY, Stop, check_run_folder, load_weights, run_script


def build_encoder(model, size):  # an --model name -> the encoder mfm.build_model makes of it (official init)
    if model in mfm.RESNETS:
        return mfm.ResNet(*mfm.RESNETS[model], img_size=size)
    return mfm.ViTEncoder(size, **common.vit_config(model))


def spectrum_filter(x, keep):
    """Keep only the frequencies where keep (H, W) is 1 on the centred spectrum: a real image stays real, since the
    circular masks are symmetric about the centre."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * keep
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


@pytest.mark.parametrize('size', [16, 32, 224])
def test_low_and_high_pass_masks_partition_the_spectrum(size):
    radius = 16 * size / 224
    low = mfm.frequency_mask(size, radius, torch.ones(1))[0]  # removed by a low-pass filter: the high frequencies
    high = mfm.frequency_mask(size, radius, torch.zeros(1))[0]
    assert set(low.unique().tolist()) <= {0.0, 1.0} and torch.equal(low + high, torch.ones(size, size))
    assert high[size // 2, size // 2] == 1 and low[0, 0] == 1  # the centre (DC) is low, the corner high
    assert 0.01 < high.mean() < 0.03  # the scaled radius keeps the circle at ~2% of the spectrum at every size
    mixed = mfm.frequency_mask(size, radius, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(mixed[0], low) and torch.equal(mixed[1], high) and torch.equal(mixed[2], high)


def test_official_mask_at_224_has_radius_16():
    removed = mfm.frequency_mask(224, 16, torch.zeros(1))[0]  # high-pass: removes the disc d^2 < 16^2 around (112, 112)
    y, x = torch.meshgrid(torch.arange(224), torch.arange(224), indexing='ij')
    assert torch.equal(removed.bool(), (y - 112) ** 2 + (x - 112) ** 2 < 256)


def test_low_pass_keeps_a_low_frequency_image():
    size = 32
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing='ij')
    wave = torch.cos(2 * math.pi * (x + y) / size)  # frequency (1, 1): inside the r = 2.29 circle
    imgs = torch.stack([0.5 + 0.2 * wave, 0.4 - 0.1 * wave, 0.6 + 0.3 * wave])[None]  # (1, 3, H, W) in [0, 1]
    low_pass = mfm.frequency_corrupt(imgs, mfm.frequency_mask(size, 16 * size / 224, torch.ones(1)))
    assert torch.allclose(low_pass, common.normalize((imgs * 255).round().byte()), atol=0.03)  # uint8 rounding only
    assert torch.allclose(low_pass, common.normalize(imgs), atol=1e-5)
    high_pass = mfm.frequency_corrupt(imgs, mfm.frequency_mask(size, 16 * size / 224, torch.zeros(1)))
    assert torch.allclose(high_pass, common.normalize(torch.zeros_like(imgs)), atol=1e-5)  # nothing left, clamped at 0


def test_corruption_clamps_before_normalising():
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 16, 16)
    corrupted = common.denormalize(mfm.frequency_corrupt(imgs, mfm.frequency_mask(16, 1.2, torch.tensor([1.0, 0.0]))))
    raw = spectrum_filter(imgs, 1 - mfm.frequency_mask(16, 1.2, torch.tensor([1.0, 0.0]))[:, None])
    assert raw.min() < -0.05 and raw.max() <= 1.0 + 1e-6  # the high-pass image goes negative...
    assert torch.allclose(corrupted, raw.clamp(0, 1), atol=1e-5)  # ...and is clamped in [0, 1] pixel space


def test_frequency_loss_is_the_mean_distance_over_removed_frequencies():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    removed = mfm.frequency_mask(16, 16 * 16 / 224, torch.tensor([1.0, 0.0]))
    loss = mfm.MFM.frequency_loss(pred, target, removed)
    spectra = [np.fft.fftshift(np.fft.fft2(t.double().numpy(), norm='ortho'), axes=(-2, -1)) for t in (pred, target)]
    distance = np.abs(spectra[0] - spectra[1])  # (B, 3, H, W)
    expected = (distance * removed[:, None].numpy()).sum() / (3 * removed.sum().item())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert mfm.MFM.frequency_loss(target, target, removed).item() < 1e-5  # sqrt(1e-12) per frequency


def test_frequency_loss_ignores_kept_frequencies():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    removed = mfm.frequency_mask(16, 2.5, torch.tensor([1.0, 0.0]))
    loss = mfm.MFM.frequency_loss(pred, target, removed)
    in_kept = spectrum_filter(5 * torch.randn(2, 3, 16, 16), (1 - removed)[:, None])
    in_removed = spectrum_filter(5 * torch.randn(2, 3, 16, 16), removed[:, None])
    assert mfm.MFM.frequency_loss(pred + in_kept, target, removed).item() == pytest.approx(loss.item(), rel=1e-5)
    assert abs(mfm.MFM.frequency_loss(pred + in_removed, target, removed).item() - loss.item()) > 0.1


def test_low_pass_choice_is_picklable_with_the_official_probability():
    draw = pickle.loads(pickle.dumps(partial(mfm.low_pass_choice, 0.3)))
    choices = np.concatenate([draw(np.random.default_rng([0, 0, i])) for i in range(4000)])
    assert choices.dtype == np.float32 and set(np.unique(choices)) == {0.0, 1.0}
    assert abs(choices.mean() - 0.3) < 0.03
    assert np.array_equal(draw(np.random.default_rng([0, 1, 7])), draw(np.random.default_rng([0, 1, 7])))


def test_defaults_follow_the_official_recipe():
    args = mfm.parse_args(['--data', 'imagenet', '--data_path', '.'])
    assert (args.model, args.epochs, args.warmup_epochs, args.clip_grad, args.weight_decay) == \
        ('vit_base_patch16', 300, 20, 3.0, 0.05)
    assert args.blr * 2048 / 256 == pytest.approx(3e-4 * 2048 / 512) and args.target_batch == 2048  # per 512
    assert args.sample_ratio == 0.5 and args.mask_radius == 16
    args = mfm.parse_args(['--model', 'resnet50', '--input_size', '32'])
    assert args.sample_ratio == 0.3 and args.mask_radius == pytest.approx(16 * 32 / 224)


def test_a_resnet_refuses_the_flags_only_a_vit_reads():  # they would do nothing (its feature is its average pool)
    for flags in (['--no-global_pool'], ['--sincos_pos_init'], ['--finetune_epochs', '1', '--layer_decay', '0.5'],
                  ['--finetune_epochs', '1', '--ft_drop_path', '0.2']):
        with pytest.raises(SystemExit, match=f'{flags[-2 if len(flags) > 2 else 0]} is for ViTs'):
            mfm.parse_args(['--model', 'resnet_tiny', *flags])
    mfm.parse_args(['--model', 'vit_tiny_patch4', '--input_size', '32', '--no-global_pool', '--sincos_pos_init'])


def test_state_dict_keys_equal_official_vit_small():  # configs/vit_small (ViT-B has the same keys)
    state = mfm.MFM(mfm.ViTEncoder(224, 16, 384, 12, 6)).state_dict()  # ViT-S/16
    block = ['norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias', 'attn.qkv.weight', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
             'mlp.fc2.bias']
    expected = {'encoder.cls_token', 'encoder.pos_embed', 'encoder.patch_embed.proj.weight',
                'encoder.patch_embed.proj.bias', 'encoder.norm.weight', 'encoder.norm.bias', 'decoder.0.weight',
                'decoder.0.bias'} | {f'encoder.blocks.{i}.{k}' for i in range(12) for k in block}
    assert set(state) == expected
    assert state['decoder.0.weight'].shape == (768, 384, 1, 1) and state['encoder.pos_embed'].shape == (1, 197, 384)


def test_state_dict_of_resnet50_equals_timm():
    model = mfm.MFM(mfm.ResNet((3, 4, 6, 3), 64, 224))  # ResNet-50
    state = model.state_dict()
    assert len(state) == 320 and sum(p.numel() for p in model.encoder.parameters()) == 23508032  # timm, minus fc
    assert state['encoder.conv1.weight'].shape == (64, 3, 7, 7)
    assert state['encoder.layer4.0.downsample.0.weight'].shape == (2048, 1024, 1, 1)
    assert state['decoder.0.weight'].shape == (32 * 32 * 3, 2048, 1, 1)
    assert (state['encoder.layer2.3.bn3.weight'] == 0).all()  # timm's zero_init_last_bn


@pytest.mark.parametrize('model,size,stride', [('vit_tiny_patch4', 32, 4), ('resnet_tiny', 32, 8),
                                               ('resnet_tiny', 128, 32)])
def test_forward_shapes_and_features(model, size, stride):
    torch.manual_seed(0)
    net = mfm.MFM(build_encoder(model, size)).eval()
    imgs = torch.rand(2, 3, size, size)
    with torch.no_grad():
        loss, pred, corrupted = net(imgs, mfm.frequency_mask(size, 16 * size / 224, torch.tensor([1.0, 0.0])))
        assert net.encoder(imgs).shape[-1] == size // stride and net.encoder.stride == stride
        assert net.encoder.features(imgs).shape == (2, net.encoder.num_features)
    assert pred.shape == corrupted.shape == imgs.shape and torch.isfinite(loss)


def test_beit_attention_init_and_timm_layout():
    torch.manual_seed(0)
    model = mfm.MFM(build_encoder('vit_tiny_patch4', 32)).eval()
    encoder = model.encoder
    assert encoder.blocks[0].attn.qkv.bias is None and encoder.pos_embed.requires_grad
    for i, block in enumerate(encoder.blocks, start=1):  # trunc-normal cut at +-0.02, then fix_init_weight
        assert block.attn.proj.weight.abs().max() <= 0.02 / math.sqrt(2 * i) + 1e-7
        assert block.mlp.fc1.weight.abs().max() <= 0.02 + 1e-7
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.q_bias.normal_(), block.attn.v_bias.normal_()
    plain = common.VisionTransformer(32, **common.vit_config('vit_tiny_patch4'), learned_pos=True).eval()
    plain.load_state_dict(mfm.timm_layout(model.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert encoder.global_pool  # MFM's features: the mean patch token (difference 7)
    for pool in (True, False):  # the mean patch token, and the cls token
        plain.global_pool = encoder.global_pool = pool
        with torch.no_grad():
            assert torch.allclose(plain.features(x), encoder.features(x), atol=1e-5), pool


@pytest.mark.parametrize('model', ['vit_tiny_patch4', 'resnet_tiny'])
def test_eval_only_reads_its_own_timm_export_back(model):  # --export_encoder's file: timm's layout (was refused)
    torch.manual_seed(0)
    state = mfm.MFM(build_encoder(model, 32)).state_dict()
    for key in [k for k in state if k.endswith(('q_bias', 'v_bias'))]:
        state[key] = torch.randn_like(state[key])  # zero at init: make the split visible
    back = mfm.mfm_layout(mfm.timm_layout(state))  # the bare state dict, as --eval_only --resume passes it
    encoder = {k: v for k, v in state.items() if k.startswith('encoder.')}
    assert back.keys() == encoder.keys() and all(torch.equal(back[k], v) for k, v in encoder.items())
    assert mfm.mfm_layout({'model': state}) is state  # ours and the official checkpoints: as they are


def test_a_size_no_preset_uses_trains_and_impossible_sizes_are_refused():
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 24, 24)
    vit = mfm.MFM(mfm.ViTEncoder(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, mlp_ratio=2.0))
    state = vit.state_dict()
    shapes = {'encoder.pos_embed': (1, 17, 40), 'encoder.patch_embed.proj.weight': (40, 3, 6, 6),
              'encoder.blocks.1.attn.qkv.weight': (120, 40), 'encoder.blocks.1.attn.q_bias': (40,),
              'encoder.blocks.1.mlp.fc1.weight': (80, 40), 'decoder.0.weight': (108, 40, 1, 1)}  # 6 x 6 x 3 per patch
    assert {k: tuple(state[k].shape) for k in shapes} == shapes and 'encoder.blocks.2.norm1.weight' not in state
    assert vit.encoder.blocks[0].attn.num_heads == 5 and vit.encoder(imgs).shape == (2, 40, 4, 4)
    resnet = mfm.MFM(mfm.ResNet((1, 2, 1, 1), 8, 32))  # small stem below 65 px: output stride 8
    state = resnet.state_dict()
    assert 'encoder.layer2.1.conv1.weight' in state and 'encoder.layer2.2.conv1.weight' not in state
    assert 'encoder.layer3.1.conv1.weight' not in state and tuple(state['encoder.conv1.weight'].shape) == (8, 3, 3, 3)
    assert resnet.encoder.num_features == 8 * 8 * 4 and resnet.encoder.stride == 8
    assert tuple(state['decoder.0.weight'].shape) == (8 * 8 * 3, 256, 1, 1)
    for net, size, features in [(vit, 24, 40), (resnet, 32, 256)]:
        x = torch.rand(2, 3, size, size)
        loss, pred, corrupted = net(x, mfm.frequency_mask(size, 16 * size / 224, torch.tensor([1.0, 0.0])))
        assert pred.shape == corrupted.shape == x.shape and loss.shape == () and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
        assert net.encoder.features(x).shape == (2, features)
    assert mfm.ResNetClassifier(5, (1, 2, 1, 1), 8, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match='width 40 is not divisible by its 6 heads'):
        mfm.ViTEncoder(24, 6, 40, 2, 6)
    with pytest.raises(ValueError, match='image side 26 is not divisible by the patch size 6'):
        mfm.ViTEncoder(26, 6, 40, 2, 5)


IMAGENET_DEFAULT = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_MEAN / _STD


def official_keep_mask(size, radius, low_pass):
    """data/data_mfm.py FreqMaskGenerator, 1 = KEPT: ones, zeroed where radius^2 <= d^2 < 999^2 from (size // 2,
    size // 2); a low-pass draw returns it, a high-pass draw 1 - it. low_pass: list of bools -> (B, size, size)."""
    keep = torch.ones(size, size)
    for y in range(size):
        for x in range(size):
            if radius ** 2 <= (x - size // 2) ** 2 + (y - size // 2) ** 2 < 999 ** 2:
                keep[y, x] = 0
    return torch.stack([keep if low else 1 - keep for low in low_pass])


def official_mfm_forward(model, encoder_forward, stride, x, keep):
    """models/mfm.py MFM.forward with FILTER_TYPE 'mfm' and RECOVER_TARGET_TYPE 'masked', and models/frequency_loss.py
    FrequencyLoss at the official settings (patch_factor 1, loss_gamma 1, no matrix), over the model's own weights:
    frequency_transform of the UNnormalised image (FFT, shift, * mask, unshift, iFFT, real part, clamp), then both it
    and the original normalised; the encoder is handed (x, x_fft) and runs on x_fft; 1x1 conv + PixelShuffle(stride);
    the loss sums |F(x_rec) - F(x)| over the removed frequencies (1 - mask) of the NORMALISED ORIGINAL x and divides
    by their count, in_chans and the patch count. -> (loss, x_rec, normalised x_corrupted)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_DEFAULT)
    mask = keep.unsqueeze(1)  # (B, 1, H, W), as forward unsqueezes it
    freq = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * mask
    x_corrupted = torch.fft.ifft2(torch.fft.ifftshift(freq, dim=(-2, -1))).real.clamp(min=0.0, max=1.0)
    x_corrupted = (x_corrupted - mean) / std
    x = (x - mean) / std
    z = encoder_forward(model.encoder, x_corrupted)
    x_rec = F.pixel_shuffle(F.conv2d(z, model.decoder[0].weight, model.decoder[0].bias), stride)

    def tensor2freq(t):  # (B, C, H, W) -> (B, 1 patch, C, H, W, real / imag)
        freq = torch.fft.fftshift(torch.fft.fft2(t[:, None].float(), norm='ortho'), dim=(-2, -1))
        return torch.stack([freq.real, freq.imag], -1)

    tmp = (tensor2freq(x_rec) - tensor2freq(x)) ** 2
    loss_recon = torch.sqrt(tmp[..., 0] + tmp[..., 1] + 1e-12) ** 1.0  # (B, 1, C, H, W)
    loss = (loss_recon * (1 - mask.unsqueeze(1))).sum() / (1 - mask).sum() / 3 / loss_recon.shape[1]
    return loss, x_rec, x_corrupted


def official_vit_forward(encoder, x, num_heads):
    """models/mfm.py VisionTransformerForMFM.forward (DECODER.DEPTH 0) over models/vision_transformer.py's BEiT Block
    and Attention: patch_embed, cls prepended, pos_embed added to all 1 + L tokens, blocks (pre-norm, LayerNorm eps
    1e-6, qkv bias [q_bias | 0 | v_bias], q scaled before q k^T, exact GELU), final norm (USE_MEAN_POOLING False), the
    cls token removed (x[:, 1:]), (B, L, C) -> (B, C, H, W)."""
    proj = encoder.patch_embed.proj
    x = F.conv2d(x, proj.weight, proj.bias, stride=proj.kernel_size).flatten(2).transpose(1, 2)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + encoder.pos_embed
    B, N, C = x.shape
    norm = lambda t, m: F.layer_norm(t, (C,), m.weight, m.bias, eps=1e-6)
    for blk in encoder.blocks:
        attn, mlp = blk.attn, blk.mlp
        qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(norm(x, blk.norm1), attn.qkv.weight, qkv_bias).reshape(B, N, 3, num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = ((q * (C // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + F.linear((weights @ v).transpose(1, 2).reshape(B, N, -1), attn.proj.weight, attn.proj.bias)
        hidden = F.gelu(F.linear(norm(x, blk.norm2), mlp.fc1.weight, mlp.fc1.bias))
        x = x + F.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)
    x = norm(x, encoder.norm)[:, 1:]
    side = int(x.shape[1] ** 0.5)
    return x.permute(0, 2, 1).reshape(B, C, side, side)


def official_resnet_forward(encoder, x):
    """ResNetForMFM.forward = timm's ResNet.forward_features with its Bottleneck (timm 0.4.12, requirements.txt; BN in
    eval here): 7x7 stride-2 conv, BN, ReLU, MaxPool2d(3, 2, padding 1); in every stage but the first, block 0 strides
    by 2 on its 3x3 conv2 (conv1 and conv3 are 1x1, stride 1) and on its 1x1 downsample conv; ReLU after the sum."""
    bn = lambda t, m: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, 1e-5)
    x = F.max_pool2d(F.relu(bn(F.conv2d(x, encoder.conv1.weight, stride=2, padding=3), encoder.bn1)), 3, 2, 1)
    for i, stage in enumerate([encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]):
        for j, blk in enumerate(stage):
            stride = 2 if i > 0 and j == 0 else 1
            out = F.relu(bn(F.conv2d(x, blk.conv1.weight), blk.bn1))
            out = F.relu(bn(F.conv2d(out, blk.conv2.weight, stride=stride, padding=1), blk.bn2))
            out = bn(F.conv2d(out, blk.conv3.weight), blk.bn3)
            shortcut = x if blk.downsample is None else \
                bn(F.conv2d(x, blk.downsample[0].weight, stride=stride), blk.downsample[1])
            x = F.relu(out + shortcut)
    return x


def test_vit_pretraining_step_is_the_official_forward_written_out():
    """models/mfm.py MFM.forward + VisionTransformerForMFM.forward + frequency_loss.py, written out above: guards
    that the encoder sees the corrupted image (not the original), that the positions are added to the patches, that
    the cls token (not the last patch) is dropped, and that the loss target is the normalised, uncorrupted image."""
    torch.manual_seed(0)
    model = mfm.MFM(mfm.ViTEncoder(16, 4, 32, 2, 2, mlp_ratio=2.0)).eval()
    with torch.no_grad():  # make every official term visible: the init leaves biases at 0 and positions tiny
        for name, p in model.named_parameters():
            if name.endswith(('bias', 'pos_embed', 'cls_token')) or 'norm' in name:
                p.add_(0.5 * torch.randn_like(p))
    imgs, low_pass = torch.rand(3, 3, 16, 16), [True, False, True]
    keep = official_keep_mask(16, 3, low_pass)
    with torch.no_grad():
        loss, pred, corrupted = model(imgs, 1 - keep)  # ours takes the removed frequencies
        expected = official_mfm_forward(model, partial(official_vit_forward, num_heads=2), 4, imgs, keep)
    assert torch.allclose(corrupted, expected[2], atol=1e-5)
    assert torch.allclose(pred, expected[1], atol=1e-5)
    assert loss.item() == pytest.approx(expected[0].item(), rel=1e-5)


def test_resnet_pretraining_step_is_the_official_forward_written_out():
    """The same step on ResNetForMFM (timm's forward_features, written out above; the official stem at 96 px, above
    difference 4's 64): guards the 3x3 / 2 max-pool with padding 1, the stride on each first block's 3x3 conv2 (not
    on the 1x1 conv1), and that the encoder sees the corrupted image. BN is randomised (zero_init_last_bn would hide
    every residual branch)."""
    torch.manual_seed(0)
    model = mfm.MFM(mfm.ResNet(*mfm.RESNETS['resnet_tiny'], img_size=96)).eval()
    with torch.no_grad():
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    imgs = torch.rand(2, 3, 96, 96)
    keep = official_keep_mask(96, 16 * 96 / 224, [True, False])
    with torch.no_grad():
        loss, pred, corrupted = model(imgs, 1 - keep)
        expected = official_mfm_forward(model, official_resnet_forward, 32, imgs, keep)
    assert pred.shape == (2, 3, 96, 96) and torch.allclose(corrupted, expected[2], atol=1e-5)
    assert torch.allclose(pred, expected[1], atol=1e-4)
    assert loss.item() == pytest.approx(expected[0].item(), rel=1e-5)


def test_vit_initialisation_is_the_official_beit_one():
    """models/vision_transformer.py VisionTransformer.__init__ as VisionTransformerForMFM runs it: pos_embed,
    cls_token, every Linear and Conv2d weight trunc_normal_(std 0.02) through MFM's `_trunc_normal_` override (a=-std,
    b=std: cut at +-0.02), zero biases (q_bias / v_bias start at 0), LayerNorm 1 / 0 eps 1e-6; then fix_init_weight:
    attn.proj and mlp.fc2 weights of layer_id + 1 = i divided by sqrt(2 i). models/mfm.py MFM.__init__'s decoder
    conv keeps PyTorch's default init (uniform, bound 1 / sqrt(fan_in))."""
    torch.manual_seed(0)
    model = mfm.MFM(mfm.ViTEncoder(16, 4, 192, 3, 3))
    encoder = model.encoder
    phi, inside = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))  # N(0, 1) cut at +-1
    cut_std = math.sqrt(1 - 2 * phi / inside)  # std of N(0, 1) truncated to [-1, 1]: 0.540
    bounds = {'pos_embed': 0.02, 'cls_token': 0.02, 'patch_embed.proj.weight': 0.02}
    for i, block in enumerate(encoder.blocks, start=1):
        bounds.update({f'blocks.{i - 1}.attn.qkv.weight': 0.02, f'blocks.{i - 1}.mlp.fc1.weight': 0.02,
                       f'blocks.{i - 1}.attn.proj.weight': 0.02 / math.sqrt(2 * i),
                       f'blocks.{i - 1}.mlp.fc2.weight': 0.02 / math.sqrt(2 * i)})
    params = dict(encoder.named_parameters())
    for name, bound in bounds.items():
        w = params[name]
        assert w.abs().max() <= bound * (1 + 1e-6), name
        assert w.std().item() == pytest.approx(cut_std * bound, rel=0.1), name
        assert w.numel() < 1000 or w.abs().max() > 0.97 * bound, name  # the cut is reached: not a smaller scale
    for name, p in params.items():
        if name.endswith(('.bias', 'q_bias', 'v_bias')) and 'norm' not in name:
            assert not p.any(), name
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 3 + 1 and all((m.weight == 1).all() and not m.bias.any() and m.eps == 1e-6 for m in norms)
    conv = model.decoder[0]
    assert 0.97 / math.sqrt(192) < conv.weight.abs().max() <= 1 / math.sqrt(192)


def test_resnet_initialisation_is_timms():
    """timm 0.4.12 ResNet.__init__ (requirements.txt): every Conv2d kaiming_normal_(mode='fan_out', nonlinearity=
    'relu'), i.e. N(0, 2 / (out_channels * kh * kw)); BatchNorm 1 / 0; zero_init_last_bn: each Bottleneck's bn3 0."""
    torch.manual_seed(0)
    encoder = mfm.ResNet(*mfm.RESNETS['resnet_tiny'], img_size=96)
    convs = [(n, m) for n, m in encoder.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 4 * 4  # the stem, and conv1-3 + downsample in each stage's one block
    for name, m in convs:
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        assert m.weight.mean().abs() < 0.2 * math.sqrt(2 / fan_out), name
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15), name
    for name, m in encoder.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == (0 if name.endswith('bn3') else 1)).all() and not m.bias.any(), name


def test_pretraining_crop_scale_is_the_official_min_crop_scale():
    """config.py _C.DATA.MIN_CROP_SCALE = 0.2 (no mfm_pretrain yaml overrides it), which data/data_mfm.py MFMTransform
    passes to RandomResizedCrop(IMG_SIZE, scale=(MIN_CROP_SCALE, 1.)), for the ViT and the ResNet-50 alike."""
    for model in ('vit_base_patch16', 'resnet50'):
        assert mfm.parse_args(['--data', 'imagenet', '--data_path', '.', '--model', model]).crop_scale == 0.2
    assert mfm.DEFAULTS['crop_scale'] == 0.2


def test_schedule_warms_up_then_follows_the_whole_run_cosine():
    args = type('Args', (), dict(lr=1.2e-3, min_lr=1e-5, warmup_epochs=20, epochs=300, iters_per_epoch=10,
                                 accum_iter=1))()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0)
    late = lambda epoch: epoch + 1 / 10  # timm steps after the optimizer: step k runs at iteration k - 1's lr
    assert mfm.pretrain_schedule(optimizer, 0, args, 10) == pytest.approx(1.2e-3 / 1200)
    assert mfm.pretrain_schedule(optimizer, late(0), args, 10) == pytest.approx(1.2e-3 / 1200)
    assert mfm.pretrain_schedule(optimizer, late(10), args, 10) == pytest.approx((1.2e-3 + 1e-6) / 2)
    after_warmup = 1e-5 + (1.2e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 300)) / 2  # the cosine counts from step 0
    assert mfm.pretrain_schedule(optimizer, late(20), args, 10) == pytest.approx(after_warmup)
    assert mfm.pretrain_schedule(optimizer, late(300), args, 10) == pytest.approx(1e-5)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-5)
    args.min_lr = None  # default: the official MIN_LR / BASE_LR = 2.5e-6 / 3e-4
    assert mfm.pretrain_schedule(optimizer, late(300), args, 10) == pytest.approx(1.2e-3 / 120)
    # fine-tuning: WARMUP_LR = MIN_LR = 2.5e-7 at BASE_LR 2e-3, i.e. lr / 8000 at both ends
    assert mfm.finetune_schedule(optimizer, 0, args) == pytest.approx(1.2e-3 / 8000)
    assert mfm.finetune_schedule(optimizer, late(300), args) == pytest.approx(1.2e-3 / 8000)


def test_under_accumulation_each_step_takes_the_lr_of_the_micro_batch_before_it():
    """main_mfm.py steps timm's scheduler after each optimizer step with the index of its last micro-batch, counting
    micro-batches (n_iter_per_epoch = len(loader)); timm's cosine in iterations is written out here."""
    args = type('Args', (), dict(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=6))()
    optimizer, accum, batches = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0), 4, 40

    def timm(t):  # CosineLRScheduler(t_initial=6 * 40, warmup_t=2 * 40, warmup_lr_init=lr / 1200), t in micro-batches
        warmup_lr, warmup_t, total = args.lr / 1200, args.warmup_epochs * batches, args.epochs * batches
        return warmup_lr + t * (args.lr - warmup_lr) / warmup_t if t < warmup_t else \
            args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t / total))
    for step in range(1, args.epochs * batches // accum):  # common.train_one_epoch: epoch + micro-batch / len(loader)
        first = step * accum  # the step's first micro-batch; timm last set the lr at the micro-batch before it
        assert mfm.pretrain_schedule(optimizer, first / batches, args, batches) == pytest.approx(timm(first - 1))
    assert mfm.pretrain_schedule(optimizer, 0, args, batches) == pytest.approx(args.lr / 1200)


def test_official_schedule_scales_each_group_peak_but_shares_warmup_and_min():
    args = type('Args', (), dict(lr=1e-3, warmup_epochs=10, epochs=100))()
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{'params': params[:1], 'lr_scale': 0.25}, {'params': params[1:]}], lr=0)
    lrs = lambda: [group['lr'] for group in optimizer.param_groups]
    assert mfm.official_schedule(optimizer, 0, args, 1e-6, 1e-5) == pytest.approx(1e-6)
    assert lrs() == pytest.approx([1e-6, 1e-6])  # the warmup starts from the same value in every group
    mfm.official_schedule(optimizer, 5, args, 1e-6, 1e-5)
    assert lrs() == pytest.approx([1e-6 + (0.25e-3 - 1e-6) / 2, 1e-6 + (1e-3 - 1e-6) / 2])
    mfm.official_schedule(optimizer, 50, args, 1e-6, 1e-5)  # cos(pi / 2) = 0: halfway between min and each peak
    assert lrs() == pytest.approx([(1e-5 + 0.25e-3) / 2, (1e-5 + 1e-3) / 2])
    assert mfm.official_schedule(optimizer, 100, args, 1e-6, 1e-5) == pytest.approx(1e-5)
    assert lrs() == pytest.approx([1e-5, 1e-5])  # and ends at the same minimum


def test_sample_ratio_reaches_the_loader_and_main_s_training_step(tmp_path, monkeypatch):
    """--sample_ratio 1 makes every mask of main's epoch low-pass, 0 every one high-pass (the default is 0.5): the
    loader draws it per sample and main's loss_fn removes that filter's frequencies."""
    seen = {}

    def first_epoch(model, loss_fn, loader, optimizer, epoch, **kwargs):
        seen.update(loss_fn=loss_fn, loader=loader)
        raise Stop

    monkeypatch.setattr(common, 'train_one_epoch', first_epoch)
    for ratio in (0.0, 1.0):
        with pytest.raises(Stop):
            mfm.main(TINY + ['--sample_ratio', str(ratio), '--output_dir', str(tmp_path / str(ratio))])
        removed = []  # what main's loss_fn hands the model: (B, H, W), 1 = removed
        spy = lambda images, mask: (removed.append(mask) or mask.sum(), None, None)
        for images, labels, low_pass in seen['loader']:
            assert torch.equal(low_pass, torch.full((len(images), 1), ratio))
            seen['loss_fn'](spy, images, labels, low_pass)
        expected = mfm.frequency_mask(16, 16 * 16 / 224, torch.full((8,), ratio))  # TINY: 16 px, batch 8
        assert len(removed) == 8 and all(torch.equal(mask, expected) for mask in removed)
        assert expected[:, 8, 8].eq(1 - ratio).all()  # the centre (lowest) frequency: removed by the high-pass only


def test_a_mask_that_removes_nothing_or_everything_is_refused_at_start_up(tmp_path):
    """MFM has no --mask_ratio: its mask is a circle on the spectrum, which holds at least the centre frequency and
    never the corners for 0 < radius < input_size / 2; outside that range the run is refused in one line."""
    cases = [(['--mask_radius', '0'], '--mask_radius must be in (0, input_size / 2)'),
             (['--mask_radius', '8'], '--mask_radius must be in (0, input_size / 2)'),
             (['--sample_ratio', '1.5'], 'argument --sample_ratio: must be in [0, 1]')]
    outs = [tmp_path / f'run{i}' for i in range(len(cases))]
    with ThreadPoolExecutor(2) as pool:  # two at a time: each run is mostly torch's import
        results = list(pool.map(lambda case: run_script('mfm.py', TINY + ['--output_dir', str(case[1]), *case[0]],
                                                        check=False), [(f, o) for (f, _), o in zip(cases, outs)]))
    for (flags, message), out, result in zip(cases, outs, results):
        assert result.returncode != 0 and 'Traceback' not in result.stderr, flags
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()
    for radius in (0.01, 7.99):  # the extremes allowed at 16 px still remove some and keep some frequencies
        for low_pass in (0.0, 1.0):
            removed = mfm.frequency_mask(16, radius, torch.tensor([low_pass]))
            assert 0 < removed.sum() < 16 * 16


@pytest.mark.parametrize('model', ['vit_tiny_patch4', 'resnet_tiny'])
def test_end_to_end_run(tmp_path, model):
    out = str(tmp_path / 'run')
    result = run_script('mfm.py', TINY + ['--model', model, '--output_dir', out, '--finetune_epochs', '1',
                                          '--accum_iter', '2'])
    log = check_run_folder(out, 'spectra.png')
    assert 'linear probe top-1' in result.stdout
    # 64 images, 8 micro-batches of 8, 4 steps of 2: the last step starts at micro-batch 6 and, as main_mfm.py steps
    # timm's scheduler at each step's last micro-batch, runs at micro-batch 5's lr (no warmup; cosine to lr / 120)
    lr = json.load(open(f'{out}/args.json'))['lr']
    assert log[0]['lr'] == pytest.approx(lr / 120 + (lr - lr / 120) * (1 + math.cos(math.pi * 5 / 8)) / 2)


def test_torchrun_two_processes_equal_one_with_the_same_effective_batch(tmp_path):
    """The removed-frequency count differs between processes (their mix of low- and high-pass images): the loss is
    divided by the count of the whole batch, so two processes of 8 images give the weights of one process of 16."""
    flags = TINY + ['--shapes_size', '64', '--probe_epochs', '0', '--knn_k', '0', '--amp', 'none']
    run_script('mfm.py', flags + ['--batch_size', '16', '--output_dir', str(tmp_path / 'one')])
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'mfm.py', *flags, '--batch_size', '8', '--output_dir', str(tmp_path / 'two')], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_weights(f'{tmp_path}/{run}/checkpoint-last.pth') for run in ('one', 'two'))
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), f'{key}: {(one[key] - two[key]).abs().max()}'
