"""MAE: masking, target, loss and key names; one run of mae.py as a user would start it."""
import math, os

import torch

import mae
from conftest import TINY, read_log, run_script


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


def test_norm_pix_target_statistics():
    target = mae.pixel_target(torch.randn(2, 3, 16, 16) * 3 + 1, 8, norm_pix_loss=True)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-4)  # unbiased, eps 1e-6 inside


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = mae.MAE('vit_tiny_patch4', 16, 32, 1, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    _, pred, mask = model(imgs, 0.75, torch.rand(2, 16))
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred + 5.0 * (1 - mask)[..., None]  # move only the visible patches' predictions
    assert torch.equal(model.forward_loss(imgs, changed, mask), loss)
    assert not torch.equal(model.forward_loss(imgs, pred + 5.0 * mask[..., None], mask), loss)


def official_keys(depth, decoder_depth):
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
             'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    return ({'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
             'mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias', 'decoder_norm.weight',
             'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'}
            | {f'blocks.{i}.{k}' for i in range(depth) for k in block}
            | {f'decoder_blocks.{i}.{k}' for i in range(decoder_depth) for k in block})


def test_state_dict_keys_equal_official_vit_base():
    state = mae.MAE('vit_base_patch16', 224, 512, 8).state_dict()
    assert set(state) == official_keys(12, 8)
    shapes = {'pos_embed': (1, 197, 768), 'decoder_pos_embed': (1, 197, 512), 'mask_token': (1, 1, 512),
              'decoder_pred.weight': (768, 512), 'blocks.0.attn.qkv.weight': (2304, 768),
              'patch_embed.proj.weight': (768, 3, 16, 16), 'decoder_blocks.7.mlp.fc1.weight': (2048, 512)}
    assert all(tuple(state[k].shape) == v for k, v in shapes.items())


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    result = run_script('mae.py', TINY + ['--output_dir', out, '--decoder_embed_dim', '32', '--decoder_depth', '1'])
    log = read_log(out)
    assert math.isfinite(log[0]['train_loss']) and log[0]['images_per_s'] > 0
    assert 'trained_knn_top1' in log[-1] and 'random_init_probe_top1' in log[-1]
    assert os.path.exists(f'{out}/checkpoint-last.pth') and os.path.exists(f'{out}/checkpoint-0.pth')
    assert os.path.getsize(f'{out}/reconstruction.png') > 1000
    assert 'linear probe top-1' in result.stdout
