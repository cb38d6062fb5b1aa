"""MFM: frequency masks, corruption, frequency loss, key names, schedule; runs of mfm.py as a user would start them."""
import math, os, pickle, subprocess, sys
from functools import partial

import numpy as np
import pytest
import torch

import common
import mfm
from conftest import ROOT, TINY, load_weights, read_log, run_script


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


def test_state_dict_keys_equal_official_vit_small():  # configs/vit_small (ViT-B has the same keys)
    state = mfm.MFM('vit_small_patch16', 224).state_dict()
    block = ['norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias', 'attn.qkv.weight', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
             'mlp.fc2.bias']
    expected = {'encoder.cls_token', 'encoder.pos_embed', 'encoder.patch_embed.proj.weight',
                'encoder.patch_embed.proj.bias', 'encoder.norm.weight', 'encoder.norm.bias', 'decoder.0.weight',
                'decoder.0.bias'} | {f'encoder.blocks.{i}.{k}' for i in range(12) for k in block}
    assert set(state) == expected
    assert state['decoder.0.weight'].shape == (768, 384, 1, 1) and state['encoder.pos_embed'].shape == (1, 197, 384)


def test_state_dict_of_resnet50_equals_timm():
    model = mfm.MFM('resnet50', 224)
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
    net = mfm.MFM(model, size).eval()
    imgs = torch.rand(2, 3, size, size)
    with torch.no_grad():
        loss, pred, corrupted = net(imgs, mfm.frequency_mask(size, 16 * size / 224, torch.tensor([1.0, 0.0])))
        assert net.encoder(imgs).shape[-1] == size // stride and net.encoder.stride == stride
        assert net.encoder.features(imgs).shape == (2, net.encoder.num_features)
    assert pred.shape == corrupted.shape == imgs.shape and torch.isfinite(loss)


def test_beit_attention_init_and_timm_layout():
    torch.manual_seed(0)
    model = mfm.MFM('vit_tiny_patch4', 32).eval()
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
    with torch.no_grad():
        assert torch.allclose(plain.features(x), encoder.features(x), atol=1e-5)


def test_schedule_warms_up_then_follows_the_whole_run_cosine():
    args = type('Args', (), dict(lr=1.2e-3, min_lr=1e-5, warmup_epochs=20, epochs=300))()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0)
    assert mfm.official_schedule(optimizer, 0, args) == pytest.approx(1.2e-3 / 1200)
    assert mfm.official_schedule(optimizer, 10, args) == pytest.approx((1.2e-3 + 1e-6) / 2)
    after_warmup = 1e-5 + (1.2e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 300)) / 2  # the cosine counts from step 0
    assert mfm.official_schedule(optimizer, 20, args) == pytest.approx(after_warmup)
    assert mfm.official_schedule(optimizer, 300, args) == pytest.approx(1e-5)
    args.min_lr = None  # default: the official MIN_LR / BASE_LR = 2.5e-6 / 3e-4
    assert mfm.official_schedule(optimizer, 300, args) == pytest.approx(1.2e-3 / 120)


@pytest.mark.parametrize('model', ['vit_tiny_patch4', 'resnet_tiny'])
def test_end_to_end_run(tmp_path, model):
    out = str(tmp_path / 'run')
    result = run_script('mfm.py', TINY + ['--model', model, '--output_dir', out, '--finetune_epochs', '1'])
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and log[0]['images_per_s'] > 0
    evaluation, finetuned = next(line for line in log if line.get('evaluation')), log[-1]  # fine-tuning logs last
    assert finetuned['finetune_epoch'] == 0 and 0 <= finetuned['finetune_top1'] <= 100
    assert os.path.exists(f'{out}/finetuned.pth')
    assert 'trained_knn_top1' in evaluation and 'random_init_probe_top1' in evaluation
    assert os.path.exists(f'{out}/checkpoint-last.pth') and os.path.exists(f'{out}/checkpoint-0.pth')
    assert os.path.getsize(f'{out}/spectra.png') > 1000
    assert 'linear probe top-1' in result.stdout


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
