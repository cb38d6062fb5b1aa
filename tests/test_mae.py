"""MAE: masking, ColorMAE's masks, target, loss and key names, sizes no preset uses, start-up checks, compiled vs eager
steps, the flags reaching main's step; one run of mae.py as a user would start it."""
import math, shutil

import numpy as np
import pytest
import torch

import common
import mae
from conftest import TINY, TINY_DECODER, Stop, check_run_folder, run_script

TINY_VIT = common.vit_config('vit_tiny_patch4')  # patch_size 4, embed_dim 192, depth 12, num_heads 3


def test_random_masking_counts_restore_and_noise():
    x = torch.randn(4, 10, 3)
    noise = torch.rand(4, 10)
    kept, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    keep = int(10 * (1 - 0.75))
    assert kept.shape == (4, keep, 3)
    assert torch.equal(mask.sum(1), torch.full((4,), 10.0 - keep))
    # ids_restore inverts the shuffle: sorting the noise and applying ids_restore gives the noise back
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(10).expand(4, -1))
    # the kept tokens are the visible ones (mask 0), and the same noise gives the same mask
    for b in range(4):
        assert torch.equal(torch.sort(kept[b, :, 0]).values, torch.sort(x[b, mask[b] == 0, 0]).values)
    assert torch.equal(mae.random_masking(x, 0.75, noise)[1], mask)
    assert not torch.equal(mae.random_masking(x, 0.75, torch.rand(4, 10))[1], mask)


def test_mask_noise_is_drawn_from_the_sample_generator():
    noise = mae.mask_noise(16, np.random.default_rng([0, 1, 2]))
    assert noise.shape == (16,) and noise.dtype == np.float32 and 0 <= noise.min() and noise.max() < 1
    assert np.array_equal(noise, mae.mask_noise(16, np.random.default_rng([0, 1, 2])))  # same sample, same mask
    assert not np.array_equal(noise, mae.mask_noise(16, np.random.default_rng([0, 1, 3])))


def spectrum_gains(fields):
    """(N, S, S) fields -> their mean power at low (0 < f < 0.06 cycles per patch), middle (0.1 to 0.2) and high (above
    0.3) radial frequencies, each divided by that of white noise (a seeded N(0, 1) draw of the same shape)."""
    def band_powers(f):
        power = torch.fft.fft2(torch.as_tensor(f, dtype=torch.float64)).abs() ** 2
        freq = torch.fft.fftfreq(f.shape[-1], dtype=torch.float64)
        r = (freq[:, None] ** 2 + freq[None] ** 2).sqrt()
        return torch.stack([power[..., b].mean() for b in ((r > 0) & (r < 0.06), (r > 0.1) & (r < 0.2), r > 0.3)])
    white = torch.randn(fields.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return (band_powers(fields) / band_powers(white)).tolist()


def test_color_noise_banks_have_their_colours_spectra():
    """ColorMAE Sec. 3.2 (difference 6): red G_2 W is low-pass, blue W - G_1 W high-pass, green G_1 W - G_2 W
    band-pass and purple W - (G_1 W - G_2 W) band-stop, each measured against white noise in three frequency bands."""
    assert spectrum_gains(np.random.default_rng(2).standard_normal((32, 64, 64))) == pytest.approx([1, 1, 1], abs=0.1)
    gains = {color: spectrum_gains(mae.noise_bank(color)) for color in mae.COLORS}
    low, mid, high = gains['red']
    assert low > 0.5 and low > 10 * mid and high < 0.01  # measured: 0.81, 0.045, 0.0
    low, mid, high = gains['blue']
    assert high > 0.8 and high > 5 * mid and low < 0.01  # 0.002, 0.15, 0.93
    low, mid, high = gains['green']
    assert mid > 0.1 and mid > 10 * max(low, high)  # 0.012, 0.2, 0.003
    low, mid, high = gains['purple']
    assert min(low, high) > 0.7 and mid < 0.5 * min(low, high)  # 0.87, 0.31, 0.93
    bank = mae.noise_bank('green')  # made at start-up from seed 0: every process and every resume has the same one
    assert bank.shape == (32, 64, 64) and bank.dtype == np.float32 and np.array_equal(bank, mae.noise_bank('green'))


def bank_window(bank, noise, grid):
    """Where a ColorMAE mask noise (L,) lies in its bank -> (pattern, top, left, flipped left-right, flipped up-down)
    of the grid x grid window equal to -noise, or None."""
    for lr in (False, True):
        for ud in (False, True):
            window = -noise.reshape(grid, grid)
            window = window[:, ::-1] if lr else window
            window = window[::-1] if ud else window
            for n, top, left in np.argwhere(bank == window[0, 0]):  # continuous values: the corner, found once
                if np.array_equal(bank[n, top:top + grid, left:left + grid], window):
                    return n, top, left, lr, ud
    return None


@pytest.mark.parametrize('color', mae.COLORS)
def test_color_mask_is_a_flipped_window_of_its_pattern_with_the_highest_values_visible(color):
    """Difference 6: a sample's noise is a grid x grid window of one of its colour's 32 patterns (pattern, place and
    both flips drawn), negated so that random_masking's ascending argsort keeps the window's highest values visible
    (ColorMAE's descending sort); every sample masks the mask ratio's count."""
    grid, bank, draw, found = 5, mae.noise_bank(color), mae.mask_drawer(color, 5), []
    for i in range(40):
        noise = draw(np.random.default_rng([0, 0, i]))
        assert noise.shape == (25,) and noise.dtype == np.float32
        assert (where := bank_window(bank, noise, grid)) is not None, i
        found.append(where)
        window = -torch.from_numpy(noise)
        for ratio, masked in ((0.75, 19), (0.5, 13)):  # 25 - int(25 * (1 - ratio))
            _, mask, _ = mae.random_masking(torch.zeros(1, 25, 1), ratio, torch.from_numpy(noise)[None])
            assert mask.sum() == masked and window[mask[0] == 0].min() > window[mask[0] == 1].max(), (i, ratio)
    patterns, places, flips = {w[0] for w in found}, {w[1:3] for w in found}, {w[3:] for w in found}
    assert len(patterns) > 10 and len(places) > 30 and len(flips) == 4  # of 32 patterns, 60 x 60 places, 4 flips


def test_color_mask_depends_only_on_the_sample_generator():
    """Differences 1 and 6 (b): a sample's ColorMAE noise comes from its own generator alone, not numpy's or torch's
    global state, so a resume or N processes draw the same masks; another sample's generator draws another mask."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng():
            for color in mae.COLORS:
                draw = mae.mask_drawer(color, 8)
                np.random.seed(1)
                torch.manual_seed(1)
                first = draw(np.random.default_rng([0, 1, 2]))
                np.random.seed(2)
                torch.manual_seed(2)
                assert np.array_equal(draw(np.random.default_rng([0, 1, 2])), first), color
                assert np.array_equal(mae.mask_drawer(color, 8)(np.random.default_rng([0, 1, 2])), first), color
                assert not np.array_equal(draw(np.random.default_rng([0, 1, 3])), first), color
    finally:
        np.random.set_state(state)


def test_norm_pix_target_statistics():
    target = mae.pixel_target(torch.randn(2, 3, 16, 16) * 3 + 1, 8, norm_pix_loss=True)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-4)  # unbiased, eps 1e-6 inside


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = mae.MAE(16, **TINY_VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    _, pred, mask = model(imgs, 0.75, torch.rand(2, 16))
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred + 5.0 * (1 - mask)[..., None]  # move only the visible patches' predictions
    assert torch.equal(model.forward_loss(imgs, changed, mask), loss)
    assert not torch.equal(model.forward_loss(imgs, pred + 5.0 * mask[..., None], mask), loss)


def official_forward(model, imgs, mask_ratio, noise):
    """models_mae.py's forward, step by step, over the model's own layers: positions added to the patches before
    masking, cls + its position prepended, the mask tokens appended and unshuffled, the decoder's positions added,
    the cls prediction dropped, the norm-pix MSE over masked patches."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, D))
    mask = torch.gather(torch.cat([torch.zeros(B, keep), torch.ones(B, L - keep)], 1), 1, ids_restore)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    for block in model.blocks:
        x = block(x)
    x = model.decoder_embed(model.norm(x))
    x_ = torch.cat([x[:, 1:], model.mask_token.repeat(B, L + 1 - x.shape[1], 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + model.decoder_pos_embed
    for block in model.decoder_blocks:
        x = block(x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    target = common.patchify(imgs, model.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum(), pred, mask


def test_forward_is_the_official_data_flow():
    torch.manual_seed(0)
    model = mae.MAE(16, **TINY_VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        for found, expected in zip(model(imgs, 0.75, noise), official_forward(model, imgs, 0.75, noise)):
            assert torch.allclose(found, expected, atol=1e-5)


def test_initialisation_is_the_official_one():
    """models_mae.py initialize_weights: patch_embed's weight Xavier-uniform on its (D, P) view, every Linear
    Xavier-uniform with zero bias, LayerNorm 1 / 0 (eps 1e-6), cls and mask tokens N(0, 0.02); both position tables
    the fixed sin-cos one."""
    torch.manual_seed(0)
    model = mae.MAE(16, **TINY_VIT, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    xavier = lambda w: math.sqrt(6 / (w.shape[0] + w[0].numel()))  # fan_out + fan_in of the (out, in) view
    for name, m in [('patch_embed', model.patch_embed.proj), *[(n, m) for n, m in model.named_modules()
                                                                if isinstance(m, torch.nn.Linear)]]:
        bound = xavier(m.weight)  # (PyTorch's default bound, 1 / sqrt(fan_in), is at most 0.91 of it here)
        assert 0.98 * bound < m.weight.abs().max() <= bound, name
        assert not m.bias.any() or name == 'patch_embed', name  # (the conv's bias keeps PyTorch's init, as there)
    for m in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
        assert (m.weight == 1).all() and not m.bias.any() and m.eps == 1e-6  # norm_layer=partial(nn.LayerNorm, 1e-6)
    for token in (model.cls_token, model.mask_token):
        assert 0.013 < token.std().item() < 0.027 and token.abs().max() < 0.02 * 5
    for table, dim in ((model.pos_embed, 192), (model.decoder_pos_embed, 64)):
        assert torch.equal(table[0], common.sincos_pos_embed(dim, 4)) and not table.requires_grad


def official_keys(depth, decoder_depth):
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    return ({'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
             'mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias', 'decoder_norm.weight',
             'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'}
            | {f'blocks.{i}.{k}' for i in range(depth) for k in block}
            | {f'decoder_blocks.{i}.{k}' for i in range(decoder_depth) for k in block})


def test_state_dict_keys_equal_official_vit_base():
    state = mae.MAE(224, 16, 768, 12, 12, 512, 8, 16).state_dict()  # ViT-B/16, the official decoder
    assert set(state) == official_keys(12, 8)
    shapes = {'pos_embed': (1, 197, 768), 'decoder_pos_embed': (1, 197, 512), 'mask_token': (1, 1, 512),
              'decoder_pred.weight': (768, 512), 'blocks.0.attn.qkv.weight': (2304, 768),
              'patch_embed.proj.weight': (768, 3, 16, 16), 'decoder_blocks.7.mlp.fc1.weight': (2048, 512)}
    assert all(tuple(state[k].shape) == v for k, v in shapes.items())


def test_a_size_no_preset_uses_trains_and_impossible_sizes_are_refused():
    torch.manual_seed(0)
    model = mae.MAE(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, decoder_embed_dim=24,
                    decoder_depth=1, decoder_num_heads=3, mlp_ratio=2.0, norm_pix_loss=True)
    assert (model.grid_size, model.num_patches, len(model.blocks), len(model.decoder_blocks)) == (4, 16, 2, 1)
    state = model.state_dict()
    shapes = {'pos_embed': (1, 17, 40), 'decoder_pos_embed': (1, 17, 24), 'patch_embed.proj.weight': (40, 3, 6, 6),
              'blocks.1.attn.qkv.weight': (120, 40), 'blocks.1.mlp.fc1.weight': (80, 40),
              'decoder_blocks.0.mlp.fc1.weight': (48, 24), 'decoder_pred.weight': (108, 24)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert model.blocks[0].attn.num_heads == 5 and model.decoder_blocks[0].attn.num_heads == 3
    imgs = torch.randn(3, 3, 24, 24)
    loss, pred, mask = model(imgs, 0.75, torch.rand(3, 16))
    assert pred.shape == (3, 16, 108) and mask.shape == (3, 16) and torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trained)
    assert model.features(imgs).shape == (3, 40)
    for kwargs, message in [(dict(num_heads=6), 'width 40 is not divisible by its 6 heads'),
                            (dict(decoder_num_heads=5), 'width 24 is not divisible by its 5 heads'),
                            (dict(img_size=26), 'image side 26 is not divisible by the patch size 6')]:
        with pytest.raises(ValueError, match=message):
            mae.MAE(**{**dict(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, decoder_embed_dim=24,
                              decoder_depth=1, decoder_num_heads=3, mlp_ratio=2.0), **kwargs})


def compiled_and_eager_steps(compile):
    """One bf16 training step of a 1-block MAE on fixed data and weights -> (loss, the step's change of every weight:
    SGD with lr 1 and no decay, so minus the gradient)."""
    torch.manual_seed(0)
    model = mae.MAE(16, 4, 32, 1, 2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator)
    noise = torch.rand(8, 16, generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(8), noise), batch_size=8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)

    def loss_fn(model, images, labels, noise):
        loss, _, _ = model(common.normalize(images), 0.75, noise)
        return loss, {}
    stats = common.train_one_epoch(model, loss_fn, loader, optimizer, 0, torch.device('cpu'), amp=torch.bfloat16,
                                   compile=compile)
    return stats['train_loss'], {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported() or not (shutil.which('g++') or shutil.which('c++')),
                    reason='torch.compile is unavailable here (no dynamo support or no C++ compiler for inductor)')
def test_compiled_training_step_agrees_with_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_loss, eager_step = compiled_and_eager_steps(compile=False)
    assert not torch._dynamo.utils.counters['stats']['unique_graphs']
    compiled_loss, compiled_step = compiled_and_eager_steps(compile=True)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] >= 1  # the step did run compiled
    assert math.isfinite(eager_loss) and compiled_loss == pytest.approx(eager_loss, rel=1e-2)  # bf16: 8-bit mantissa
    assert {k for k, step in eager_step.items() if not step.abs().sum()} == {'pos_embed', 'decoder_pos_embed'}
    for key, step in eager_step.items():  # every trained tensor moved, and by the same step (measured: 5e-4 apart)
        assert (compiled_step[key] - step).abs().max().item() <= 2e-2 * step.abs().max().item() + 1e-7, key


def first_step(module, monkeypatch, argv):
    """Run module.main(argv) until it trains: the stubbed common.train_one_epoch calls the step main built (loss_fn)
    on the loader's first batch, the model's forward spied -> dict(batch, result: loss_fn's, calls: forward's
    [(inputs, outputs)], loss_fn)."""
    seen = {}

    def first_epoch(model, loss_fn, loader, *args, **kwargs):
        batch, calls, forward = next(iter(loader)), [], model.forward
        model.forward = lambda *inputs: calls.append((inputs, forward(*inputs))) or calls[-1][1]
        seen.update(batch=batch, result=loss_fn(model, *batch), calls=calls, loss_fn=loss_fn)
        raise Stop
    monkeypatch.setattr(common, 'train_one_epoch', first_epoch)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    with pytest.raises(Stop):
        module.main(argv)
    return seen


def masked_mse(imgs, pred, mask, patch_size, norm_pix_loss):  # the objective written out: masked patches only
    target = common.patchify(imgs, patch_size)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize('ratio,norm_pix_loss,masked', [(0.5, False, 8), (0.6, True, 10)])
def test_main_steps_with_the_given_mask_ratio_and_norm_pix_loss(ratio, norm_pix_loss, masked, tmp_path, monkeypatch):
    """mae.main's step on its loader's first batch: 16 - int(16 * (1 - ratio)) patches masked (the default 0.75: 12),
    the loader's noise, and the MSE against plain or norm-pix targets as the flag says (the shapes preset: on)."""
    seen = first_step(mae, monkeypatch, TINY + TINY_DECODER + [
        '--shapes_size', '8', '--mask_ratio', str(ratio), '--norm_pix_loss' if norm_pix_loss else '--no-norm_pix_loss',
        '--output_dir', str(tmp_path)])
    images, _, noise = seen['batch']
    (loss, _), [((imgs, _, given_noise), (model_loss, pred, mask))] = seen['result'], seen['calls']
    assert torch.equal(mask.sum(1), torch.full((8,), float(masked)))
    assert torch.equal(given_noise, noise) and torch.equal(imgs, common.normalize(images))
    assert torch.equal(loss, model_loss)
    assert torch.allclose(loss, masked_mse(imgs, pred, mask, 4, norm_pix_loss), rtol=1e-5)
    assert not torch.allclose(loss, masked_mse(imgs, pred, mask, 4, not norm_pix_loss), rtol=1e-2)


def test_main_draws_the_mask_type_noise_in_its_loader(tmp_path, monkeypatch):
    """--mask_type blue: every sample's noise in main's batches is a window of the blue bank at the model's 4 x 4 grid
    (MAE's uniform noise is not), and it is the noise the step masks with."""
    seen = first_step(mae, monkeypatch, TINY + TINY_DECODER + ['--shapes_size', '8', '--mask_type', 'blue',
                                                               '--output_dir', str(tmp_path)])
    _, _, noise = seen['batch']
    bank = mae.noise_bank('blue')
    assert noise.shape == (8, 16) and all(bank_window(bank, row.numpy(), 4) is not None for row in noise)
    [((_, _, given_noise), _)] = seen['calls']
    assert torch.equal(given_noise, noise)


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    result = run_script('mae.py', TINY + ['--output_dir', out, '--decoder_embed_dim', '32', '--decoder_depth', '1',
                                          '--decoder_num_heads', '2'])
    check_run_folder(out, 'reconstruction.png', finetuned=False)
    assert 'linear probe top-1' in result.stdout
