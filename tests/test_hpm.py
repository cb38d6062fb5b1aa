"""HPM: the relative loss, the hard-patches mask, the teacher, sizes no preset uses, start-up checks; a run of hpm.py,
the teacher's update per optimizer step, and resume restoring the teacher."""
import copy, json, math, os, shutil, subprocess, sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import common
import hpm, mae
from conftest import ROOT, TINY, TINY_DECODER, check_run_folder, kill_then_resume, read_log, run_script
from test_mae import first_step, masked_mse
from test_resume_and_ddp import assert_same_weights, without_key_bias

TINY_VIT = common.vit_config('vit_tiny_patch4')  # patch_size 4, embed_dim 192, depth 12, num_heads 3


def tiny_hpm():
    return hpm.HPM(16, **TINY_VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_relative_loss_on_a_hand_made_example():
    predicted = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    errors = torch.tensor([[1.0, 3.0, 2.0, 2.0]])  # patches 2 and 3 tie
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # patch 3 is visible: it takes no part
    total, count = 0.0, 0
    for i in range(3):
        for j in range(3):
            if errors[0, j] == errors[0, i]:
                continue
            p = torch.sigmoid(predicted[0, j] - predicted[0, i])
            total += -torch.log(p + 1e-6) if errors[0, j] > errors[0, i] else -torch.log(1 - p + 1e-6)
            count += 1
    assert count == 6
    assert torch.allclose(hpm.relative_loss(predicted, errors, mask), total / count)
    # ties contribute nothing: make patches 0 and 2 tie, and the loss is the mean over the remaining pairs only
    tied = torch.tensor([[2.0, 3.0, 2.0, 2.0]])
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1)]
    expected = sum(-torch.log(torch.sigmoid(predicted[0, j] - predicted[0, i]) + 1e-6) if tied[0, j] > tied[0, i]
                   else -torch.log(1 - torch.sigmoid(predicted[0, j] - predicted[0, i]) + 1e-6) for i, j in pairs) / 4
    assert torch.allclose(hpm.relative_loss(predicted, tied, mask), expected)


def test_relative_loss_does_not_reach_the_reconstruction_path():
    torch.manual_seed(0)
    model = tiny_hpm()
    (_, rank_loss), _, _ = model(torch.randn(2, 3, 16, 16), 0.75, torch.rand(2, 16))
    rank_loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(('decoder_blocks.', 'decoder_pred.',
                                                                                     'decoder_norm.')))
    assert model.decoder_pred_losspred.weight.grad.abs().sum() > 0


def test_hard_patches_mask():
    predicted, noise = torch.randn(4, 16), torch.rand(4, 16)
    x = torch.zeros(4, 16, 1)
    # alpha = 0: exactly MAE's random mask for the same noise
    assert hpm.hard_count(16, 0.75, 0.0) == 0
    assert torch.equal(mae.random_masking(x, 0.75, hpm.hard_patches_order(predicted, noise, 0))[1],
                       mae.random_masking(x, 0.75, noise)[1])
    for alpha in (0.25, 0.4, 0.5, 1.0):
        k = hpm.hard_count(16, 0.75, alpha)
        assert k == int(12 * alpha) and isinstance(k, int)  # of MAE's 12 masked: 16 - int(16 * 0.25)
        _, mask, _ = mae.random_masking(x, 0.75, hpm.hard_patches_order(predicted, noise, k))
        assert torch.equal(mask.sum(1), torch.full((4,), 12.0))
        assert torch.all(mask.gather(1, predicted.topk(k, dim=1).indices) == 1)  # the k hardest are masked
        others = torch.ones_like(mask).scatter(1, predicted.topk(k, dim=1).indices, 0.0)  # the rest: by the noise
        masked_noise = torch.where((mask == 1) & (others == 1), noise, 2.0).min(1).values  # the random part's
        visible_noise = torch.where(mask == 0, noise, -1.0).max(1).values  # lowest masked noise above every visible
        assert torch.all(masked_noise > visible_noise)
    fixed = (torch.rand(4, 16).argsort(1) < 12).float()  # a 0/1 mask passed as the score is reproduced
    assert torch.equal(mae.random_masking(x, 0.75, fixed)[1], fixed)
    # the random part is MAE's per-sample noise, drawn from the sample's generator in the data loader
    assert np.array_equal(hpm.mask_noise(16, np.random.default_rng([0, 2, 5])),
                          mae.mask_noise(16, np.random.default_rng([0, 2, 5])))


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported() or not (shutil.which('g++') or shutil.which('c++')),
                    reason='torch.compile is unavailable here (no dynamo support or no C++ compiler for inductor)')
def test_compiled_mask_does_not_recompile_each_epoch():
    """alpha_t changes every epoch: the step takes k = hard_count(...), a whole number that torch.compile makes dynamic
    after its first change (with a float alpha it recompiled every epoch, and after 8 gave up: eager from then on)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    order = torch.compile(lambda predicted, noise, k: hpm.hard_patches_order(predicted * 1, noise, k))
    predicted, noise = torch.randn(4, 196), torch.rand(4, 196)
    for epoch in range(12):
        k = hpm.hard_count(196, 0.75, 0.5 * (epoch + 1) / 12)
        assert torch.equal(order(predicted, noise, k), hpm.hard_patches_order(predicted, noise, k))
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] <= 3  # k in {0, 1} are specialised, then dynamic


def test_teacher_update_and_no_gradient():
    torch.manual_seed(0)
    student = tiny_hpm()
    teacher = hpm.copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    common.update_ema(teacher, student, 0.9)  # the teacher's update in hpm.main
    moved = student.state_dict()
    for name, value in teacher.state_dict().items():  # every float entry, the frozen sin-cos tables included
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * moved[name], atol=1e-6), name
    assert not torch.equal(teacher.blocks[0].attn.qkv.weight, before['blocks.0.attn.qkv.weight'])
    losses = teacher.teacher_losses(torch.randn(2, 3, 16, 16))
    assert losses.shape == (2, 16) and not losses.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())


def official_decay(epoch):  # engine_pretrain.py, per epoch, whatever the run length
    return 0.999 + epoch / 100 * 0.0009 if epoch < 100 else 0.9999


def test_teacher_decay_matches_the_official_recipe():
    assert abs(hpm.teacher_decay(0) - 0.999) < 1e-9
    assert abs(hpm.teacher_decay(50) - 0.99945) < 1e-9
    assert abs(hpm.teacher_decay(100) - 0.9999) < 1e-9
    assert abs(hpm.teacher_decay(150) - 0.9999) < 1e-9
    for epochs in (200, 800, 50):  # the official values, at 200 epochs (the recipe) as at any other length
        args = hpm.parse_args(['--data', 'imagenet', '--data_path', '.', '--epochs', str(epochs)])
        assert tuple(args.ema_decay) == (0.999, 0.9999) and args.ema_ramp_epochs == 100
        for epoch in range(epochs):
            assert hpm.teacher_decay(epoch, *args.ema_decay, args.ema_ramp_epochs) == \
                pytest.approx(official_decay(epoch), abs=1e-12), (epochs, epoch)
    shapes = hpm.parse_args([])  # the shapes preset's faster teacher (difference 4)
    assert tuple(shapes.ema_decay) == (0.84, 0.984) and shapes.ema_ramp_epochs == 2.5
    assert [hpm.teacher_decay(e, *shapes.ema_decay, shapes.ema_ramp_epochs) for e in range(4)] == \
        pytest.approx([0.84, 0.84 + 0.144 / 2.5, 0.84 + 0.288 / 2.5, 0.984])
    with pytest.raises(SystemExit, match=r'argument --ema_decay: must be in \[0, 1\), got 1.0'):
        hpm.parse_args(['--ema_decay', '0.9', '1.0'])


# ---- the official forward, written out: models_mae_learn_loss.py + engine_pretrain.py, read at c15ae90 ------------
def small_hpm(norm_pix_loss):
    torch.manual_seed(0)
    return hpm.HPM(16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=2,
                   decoder_num_heads=2, norm_pix_loss=norm_pix_loss)


def official_decoders(model, imgs, mask):
    """forward_encoder + forward_decoder for a boolean mask (B, L), True = masked, the same count in every image: the
    visible tokens in index order, then one mask token per masked patch, each with its own decoder position; no
    unshuffle. -> pixels (B, L, P) and predicted losses (B, L), both in that order, and the masked count."""
    B = len(imgs)
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]  # (B, L, D)
    x = x[~mask].reshape(B, -1, x.shape[-1])
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    for block in model.blocks:
        x = block(x)
    x = model.decoder_embed(model.norm(x))
    positions = model.decoder_pos_embed[:, 1:].expand(B, -1, -1)  # (B, L, Dd)
    visible = positions[~mask].reshape(B, -1, x.shape[-1])
    masked = positions[mask].reshape(B, -1, x.shape[-1])
    x = torch.cat([x[:, :1] + model.decoder_pos_embed[:, :1], x[:, 1:] + visible, model.mask_token + masked], dim=1)
    pixels, losses = x, x
    for block in model.decoder_blocks:
        pixels = block(pixels)
    for block in model.decoder_blocks_losspred:
        losses = block(losses)
    pixels = model.decoder_pred(model.decoder_norm(pixels))[:, 1:]
    losses = model.decoder_pred_losspred(model.decoder_norm_losspred(losses))[:, 1:].mean(dim=-1)
    return pixels, losses, masked.shape[1]


def official_losses(model, imgs, mask):
    """engine_pretrain.py's step after the mask: forward_loss on pix_pred[:, -mask_num:] against the masked patches'
    targets (norm-pix: per patch, unbiased variance), then forward_learning_loss(relative=True) on loss_pred[:,
    -mask_num:] with the detached per-patch errors. -> (reconstruction, relative, predicted pixels of the masked)."""
    pixels, losses, count = official_decoders(model, imgs, mask)
    B, p, h = len(imgs), model.patch_size, imgs.shape[2] // model.patch_size
    target = torch.einsum('nchpwq->nhwpqc', imgs.reshape(B, 3, h, p, h, p)).reshape(B, h * h, p * p * 3)
    target = target[mask].reshape(B, -1, p * p * 3)
    if model.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    errors = ((pixels[:, -count:] - target) ** 2).mean(dim=-1)  # (B, N_m), the masked patches in index order
    predicted = losses[:, -count:]
    above = errors.unsqueeze(1) > errors.unsqueeze(2)
    below = errors.unsqueeze(1) < errors.unsqueeze(2)
    logit = predicted.unsqueeze(1) - predicted.unsqueeze(2)
    rank = -above.int() * torch.log(torch.sigmoid(logit) + 1e-6) - below.int() * torch.log(1 - torch.sigmoid(logit)
                                                                                           + 1e-6)
    return errors.mean(), rank.sum() / (above + below).sum(), pixels[:, -count:]


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_losses_equal_the_official_forward_written_out(norm_pix_loss):
    """Guards the masked-only sums of both losses, the unshuffle, the loss head's cls slot and mean, and norm-pix's
    unbiased variance: the official step computes each differently (index order, mask tokens last)."""
    model = small_hpm(norm_pix_loss)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        k = hpm.hard_count(16, 0.75, 0.5)
        score = hpm.hard_patches_order(model.teacher_losses(imgs), torch.rand(3, 16), k)
        (loss, rank_loss), pred, mask = model(imgs, 0.75, score)
        expected_loss, expected_rank, expected_pred = official_losses(model, imgs, mask.bool())
    assert torch.allclose(pred[mask.bool()].reshape(3, 12, 48), expected_pred, atol=1e-5)
    assert torch.allclose(loss, expected_loss, atol=1e-6) and torch.allclose(rank_loss, expected_rank, atol=1e-5)


def test_teacher_losses_are_the_official_ema_view_of_the_full_image():
    """engine_pretrain.py: model_ema.ema(samples, mask=all False), so every patch is visible, no mask token, and
    loss_pred is in index order."""
    model = small_hpm(False)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = official_decoders(model, imgs, torch.zeros(2, 16, dtype=torch.bool))[1]
    assert torch.allclose(model.teacher_losses(imgs), expected, atol=1e-5)


def test_relative_loss_keeps_the_official_epsilon():
    """log(sigmoid(z) + 1e-6), not logsigmoid(z): a pair ranked backwards with logit 40 costs -log(1e-6 + e^-40) =
    13.8, where logsigmoid would give 40."""
    predicted, errors = torch.tensor([[40.0, 0.0]]), torch.tensor([[1.0, 2.0]])  # patch 1 is harder, predicted easier
    expected = -math.log(1 / (1 + math.exp(40)) + 1e-6)  # both orders (i, j) of the pair cost the same
    assert hpm.relative_loss(predicted, errors, torch.ones(1, 2)).item() == pytest.approx(expected, rel=1e-5)


def test_initialisation_is_the_official_one():
    """initialize_weights: patch_embed Xavier-uniform on its (D, 3 p p) view, Linears Xavier-uniform with zero bias,
    LayerNorms 1 / 0, cls and mask tokens normal(0, 0.02)."""
    torch.manual_seed(0)
    model = hpm.HPM(16, **TINY_VIT, decoder_embed_dim=256, decoder_depth=1, decoder_num_heads=2)
    for name, weight in [('patch_embed.proj', model.patch_embed.proj.weight.flatten(1)),
                         ('decoder_pred_losspred', model.decoder_pred_losspred.weight),
                         ('blocks.0.attn.qkv', model.blocks[0].attn.qkv.weight)]:
        bound = math.sqrt(6 / sum(weight.shape))  # U(-b, b), b = sqrt(6 / (fan_in + fan_out))
        assert 0.97 * bound < weight.abs().max() <= bound, name
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.all(module.bias == 0)
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    assert 0.017 < model.mask_token.std() < 0.023 and 0.017 < model.cls_token.std() < 0.023


def test_another_imagenet_length_says_the_batch_is_the_200_epoch_recipes(capsys):
    hpm.parse_args(['--data', 'imagenet', '--data_path', '.'])
    assert 'note' not in capsys.readouterr().out
    hpm.parse_args(['--data', 'imagenet', '--data_path', '.', '--epochs', '800'])
    assert "--epochs 800 at PRETRAIN.md's 200-epoch batch of 2048" in capsys.readouterr().out


def test_pretraining_defaults_are_the_official_recipe():
    """scripts/pretrain_base.sh + main_pretrain.py: mask 0.75, blr 1.5e-4, wd 0.05, warmup 40, plain pixels, decoders
    512 x 8 x 16 heads, crop scale 0.2; generate_mask's 0.5 at the last epoch; the loss scaler's clip at 5;
    PRETRAIN.md's 200 epochs for ImageNet."""
    args = hpm.parse_args(['--data', 'imagenet', '--data_path', '.'])
    assert (args.mask_ratio, args.alpha_final, args.norm_pix_loss, args.epochs) == (0.75, 0.5, False, 200)
    assert (args.blr, args.weight_decay, args.warmup_epochs, args.min_lr, args.clip_grad) == (1.5e-4, 0.05, 40, 0, 5)
    assert (args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads, args.crop_scale) == (512, 8, 16, 0.2)


def test_a_size_no_preset_uses_trains_and_impossible_sizes_are_refused():
    torch.manual_seed(0)
    sizes = dict(img_size=24, patch_size=6, embed_dim=40, depth=2, num_heads=5, decoder_embed_dim=24,
                 decoder_depth=1, decoder_num_heads=3, mlp_ratio=2.0)
    model = hpm.HPM(**sizes, norm_pix_loss=True)
    state = model.state_dict()
    shapes = {'pos_embed': (1, 17, 40), 'decoder_pos_embed': (1, 17, 24), 'patch_embed.proj.weight': (40, 3, 6, 6),
              'blocks.1.mlp.fc1.weight': (80, 40), 'decoder_blocks.0.mlp.fc1.weight': (48, 24),
              'decoder_blocks_losspred.0.attn.qkv.weight': (72, 24), 'decoder_pred.weight': (108, 24),
              'decoder_pred_losspred.weight': (108, 24)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert 'blocks.2.norm1.weight' not in state and 'decoder_blocks_losspred.1.norm1.weight' not in state
    imgs = torch.randn(3, 3, 24, 24)
    (loss, rank_loss), pred, mask = model(imgs, 0.75, torch.rand(3, 16))
    assert pred.shape == (3, 16, 108) and mask.shape == (3, 16) and torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert torch.isfinite(loss) and torch.isfinite(rank_loss)
    (loss + rank_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.teacher_losses(imgs).shape == (3, 16) and model.features(imgs).shape == (3, 40)
    for kwargs, message in [(dict(num_heads=6), 'width 40 is not divisible by its 6 heads'),
                            (dict(decoder_num_heads=5), 'width 24 is not divisible by its 5 heads'),
                            (dict(img_size=26), 'image side 26 is not divisible by the patch size 6')]:
        with pytest.raises(ValueError, match=message):
            hpm.HPM(**{**sizes, **kwargs})


FLAGS = TINY + ['--decoder_embed_dim', '32', '--decoder_depth', '1', '--decoder_num_heads', '2']


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    run_script('hpm.py', FLAGS + ['--output_dir', out, '--finetune_epochs', '1'])
    log = check_run_folder(out, 'reconstruction.png', loss='train_reconstruction')
    assert math.isfinite(log[0]['train_relative'])
    assert log[0]['teacher_decay'] == pytest.approx(0.84)  # the shapes preset's decay at epoch 0
    assert not os.path.exists(f'{out}/finetune/checkpoint-last.pth')  # removed once the fine-tune is done


def test_teacher_is_updated_once_per_optimizer_step(tmp_path, monkeypatch):
    """--accum_iter 2 over 4 micro-batches: 2 optimizer steps, so 2 teacher updates, each with the epoch's decay."""
    calls = []
    update = common.update_ema
    monkeypatch.setattr(common, 'update_ema', lambda ema, model, decay: calls.append(decay) or update(ema, model,
                                                                                                     decay))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    hpm.main(FLAGS + ['--shapes_size', '32', '--accum_iter', '2', '--probe_epochs', '0', '--knn_k', '0',
                      '--output_dir', str(tmp_path / 'run')])
    assert calls == pytest.approx([0.84, 0.84])
    with open(tmp_path / 'run' / 'args.json') as f:
        assert json.load(f)['accum_iter'] == 2


def test_main_mines_with_the_teacher_and_moves_it_towards_the_student(tmp_path, monkeypatch):
    """hpm.main over 4 epochs, each epoch's training stubbed: k = int(N_m * 0.5 * (epoch + 1) / epochs) hard patches
    (generate_mask), mined by the EMA teacher, not the student; loss = reconstruction + relative (weight 1); after a
    step the teacher = d * teacher + (1 - d) * student (timm's ModelEma), the student left alone."""
    seen, miners = [], []
    teacher_losses = hpm.HPM.teacher_losses
    monkeypatch.setattr(hpm.HPM, 'teacher_losses', lambda self, imgs: miners.append(self) or teacher_losses(self, imgs))

    def one_epoch(model, loss_fn, loader, optimizer, epoch, on_step, **_):
        seen.append(loss_fn.keywords['k'])
        if epoch == 0:
            total, logs = loss_fn(model, *next(iter(loader)))
            assert torch.allclose(total, logs['reconstruction'] + logs['relative'])
            teacher = miners[-1]
            assert teacher is not model and not any(p.requires_grad for p in teacher.parameters())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            before, student = copy.deepcopy(teacher.state_dict()), copy.deepcopy(model.state_dict())
            on_step()
            for name, value in teacher.state_dict().items():  # the shapes preset's decay at epoch 0: 0.84
                assert torch.allclose(value, 0.84 * before[name] + 0.16 * student[name], atol=1e-6), name
                assert torch.equal(model.state_dict()[name], student[name]), name
        return {}

    monkeypatch.setattr(common, 'train_one_epoch', one_epoch)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    hpm.main(FLAGS + ['--shapes_size', '32', '--epochs', '4', '--probe_epochs', '0', '--knn_k', '0',
                      '--finetune_epochs', '0', '--output_dir', str(tmp_path / 'run')])
    assert seen == [int(12 * 0.5 * (epoch + 1) / 4) for epoch in range(4)] == [1, 3, 4, 6]  # N_m = 16 - int(16 / 4)


@pytest.mark.parametrize('ratio,norm_pix_loss,masked', [(0.5, False, 8), (0.6, True, 10)])
def test_main_steps_with_the_given_mask_ratio_and_norm_pix_loss(ratio, norm_pix_loss, masked, tmp_path, monkeypatch):
    """hpm.main's step on its loader's first batch: 16 - int(16 * (1 - ratio)) patches masked (the default 0.75: 12),
    k = int(masked * alpha_0) of them mined (1 epoch: alpha_0 = 0.5), and the reconstruction loss against plain or
    norm-pix targets as the flag says (DEFAULTS: off, the shapes preset: on)."""
    seen = first_step(hpm, monkeypatch, FLAGS + [
        '--shapes_size', '8', '--mask_ratio', str(ratio), '--norm_pix_loss' if norm_pix_loss else '--no-norm_pix_loss',
        '--output_dir', str(tmp_path)])
    images, _, noise = seen['batch']
    (total, logs), [((imgs, _, order), ((loss, rank_loss), pred, mask))] = seen['result'], seen['calls']
    k = seen['loss_fn'].keywords['k']
    assert k == int(masked * 0.5) and torch.equal((order == 2).sum(1), torch.full((8,), k))  # the k hardest: 2.0
    assert torch.equal(torch.where(order == 2, noise, order), noise) and torch.equal(imgs, common.normalize(images))
    assert torch.equal(mask.sum(1), torch.full((8,), float(masked)))
    assert torch.equal(logs['reconstruction'], loss) and torch.equal(total, loss + rank_loss)
    assert torch.allclose(loss, masked_mse(imgs, pred, mask, 4, norm_pix_loss), rtol=1e-5)
    assert not torch.allclose(loss, masked_mse(imgs, pred, mask, 4, not norm_pix_loss), rtol=1e-2)


def test_teacher_flag_evaluates_the_teacher_after_training(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(common, 'evaluate', lambda args, trained, *_: seen.update(trained=trained.state_dict()))
    monkeypatch.setattr(common, 'export_encoder', lambda args, state: seen.update(exported=state))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    hpm.main(FLAGS + ['--shapes_size', '32', '--teacher', '--output_dir', str(tmp_path / 'run')])
    teacher = torch.load(tmp_path / 'run' / 'checkpoint-last.pth', weights_only=True)['ema_state_dict']
    for name, value in seen['exported'].items():  # what --teacher exports and fine-tunes: the teacher's encoder
        assert torch.equal(value, teacher[name]) and torch.equal(seen['trained'][name], value), name  # was: student


def test_resume_restores_the_teacher(tmp_path):
    flags = FLAGS + ['--shapes_size', '128', '--epochs', '2', '--probe_epochs', '0', '--knn_k', '0']
    straight = str(tmp_path / 'straight')
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside the killed one: one core each
        done = pool.submit(run_script, 'hpm.py', flags + ['--output_dir', straight])
        resumed = kill_then_resume('hpm.py', flags, str(tmp_path / 'resumed'), delay=0.0)
        done.result()
    assert resumed['epoch'] == 1 and resumed['args']['resume'] == 'auto'  # the resumed run trained the last epoch
    expected = torch.load(f'{straight}/checkpoint-last.pth', weights_only=True)
    for key in ('model', 'ema_state_dict'):
        for name, value in expected[key].items():
            assert torch.equal(resumed[key][name], value), f'{key}.{name}'


def test_torchrun_two_processes_equal_one_student_and_teacher(tmp_path):
    """HPM under DDP: the loss predictor's decoder, the pairwise loss and the teacher's EMA (over the unwrapped
    student) give one process's weights, 2 x 8 against 1 x 16 images per step (fp32)."""
    flags = TINY + TINY_DECODER + ['--epochs', '2', '--warmup_epochs', '1', '--probe_epochs', '0', '--knn_k', '0',
                                   '--amp', 'none']
    run_script('hpm.py', flags + ['--batch_size', '16', '--output_dir', str(tmp_path / 'one')])
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'hpm.py', *flags, '--batch_size', '8', '--output_dir', str(tmp_path / 'two')], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / 'checkpoint-last.pth', weights_only=True) for name in ('one', 'two'))
    for key in ('model', 'ema_state_dict'):
        assert_same_weights(without_key_bias(two[key]), without_key_bias(one[key]), 1e-5)
    assert [line['train_loss'] for line in read_log(tmp_path / 'one')[:2]] == pytest.approx(
        [line['train_loss'] for line in read_log(tmp_path / 'two')[:2]], rel=1e-5)
