"""MAE: masking, target, loss and key names, sizes no preset uses, start-up checks, compiled vs eager steps; one run
of mae.py as a user would start it."""
import math, shutil

import numpy as np
import pytest
import torch

import common
import mae
from conftest import TINY, check_run_folder, run_script

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


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    result = run_script('mae.py', TINY + ['--output_dir', out, '--decoder_embed_dim', '32', '--decoder_depth', '1',
                                          '--decoder_num_heads', '2'])
    check_run_folder(out, 'reconstruction.png', finetuned=False)
    assert 'linear probe top-1' in result.stdout
