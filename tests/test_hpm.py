"""HPM: the relative loss, the hard-patches mask, the teacher; a run of hpm.py, and resume restoring the teacher."""
import math, os

import torch

import hpm, mae
from conftest import TINY, kill_then_resume, read_log, run_script


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
    model = hpm.HPM('vit_tiny_patch4', 16, 32, 1)
    (_, rank_loss), _, _ = model(torch.randn(2, 3, 16, 16), 0.75, torch.rand(2, 16))
    rank_loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(('decoder_blocks.', 'decoder_pred.',
                                                                                     'decoder_norm.')))
    assert model.decoder_pred_losspred.weight.grad.abs().sum() > 0


def test_hard_patches_mask():
    predicted, noise = torch.randn(4, 16), torch.rand(4, 16)
    x = torch.zeros(4, 16, 1)
    # alpha = 0: exactly MAE's random mask for the same noise
    assert torch.equal(mae.random_masking(x, 0.75, hpm.hard_patches_order(predicted, noise, 0.75, 0.0))[1],
                       mae.random_masking(x, 0.75, noise)[1])
    for alpha in (0.25, 0.5, 1.0):
        _, mask, _ = mae.random_masking(x, 0.75, hpm.hard_patches_order(predicted, noise, 0.75, alpha))
        assert torch.equal(mask.sum(1), torch.full((4,), 12.0))  # MAE's count: 16 - int(16 * 0.25)
        k = int(12 * alpha)
        assert torch.all(mask.gather(1, predicted.topk(k, dim=1).indices) == 1)  # the k hardest are masked
    fixed = (torch.rand(4, 16).argsort(1) < 12).float()  # a 0/1 mask passed as the score is reproduced
    assert torch.equal(mae.random_masking(x, 0.75, fixed)[1], fixed)


def test_teacher_update_and_no_gradient():
    torch.manual_seed(0)
    student = hpm.HPM('vit_tiny_patch4', 16, 32, 1)
    teacher = hpm.copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    hpm.update_teacher(teacher, student, 0.9)
    for name, param in student.named_parameters():
        assert torch.allclose(dict(teacher.named_parameters())[name], 0.9 * before[name] + 0.1 * param, atol=1e-6)
    losses = teacher.teacher_losses(torch.randn(2, 3, 16, 16))
    assert losses.shape == (2, 16) and not losses.requires_grad
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_decay_matches_the_official_recipe():
    official = type('Args', (), {'epochs': 200})()  # 200 epochs of 625 steps (ImageNet at batch 2048)
    assert abs(hpm.teacher_decay(0, official, 625) - 0.999) < 1e-9
    assert abs(hpm.teacher_decay(50, official, 625) - 0.99945) < 1e-9
    assert abs(hpm.teacher_decay(100, official, 625) - 0.9999) < 1e-9
    assert abs(hpm.teacher_decay(150, official, 625) - 0.9999) < 1e-9


FLAGS = TINY + ['--decoder_embed_dim', '32', '--decoder_depth', '1']


def test_end_to_end_run(tmp_path):
    out = str(tmp_path / 'run')
    run_script('hpm.py', FLAGS + ['--output_dir', out, '--finetune_epochs', '1'])
    log = read_log(out)
    assert math.isfinite(log[0]['train_reconstruction']) and math.isfinite(log[0]['train_relative'])
    evaluation, finetuned = next(line for line in log if line.get('evaluation')), log[-1]  # fine-tuning logs last
    assert finetuned['finetune_epoch'] == 0 and 0 <= finetuned['finetune_top1'] <= 100
    assert os.path.exists(f'{out}/finetuned.pth')
    assert 'trained_probe_top1' in evaluation and os.path.getsize(f'{out}/reconstruction.png') > 1000


def test_resume_restores_the_teacher(tmp_path):
    flags = FLAGS + ['--shapes_size', '128', '--epochs', '2', '--probe_epochs', '0', '--knn_k', '0']
    straight = str(tmp_path / 'straight')
    run_script('hpm.py', flags + ['--output_dir', straight])
    expected = torch.load(f'{straight}/checkpoint-last.pth', weights_only=True)
    resumed = kill_then_resume('hpm.py', flags, str(tmp_path / 'resumed'), delay=0.0)
    for key in ('model', 'ema_state_dict'):
        for name, value in expected[key].items():
            assert torch.equal(resumed[key][name], value), f'{key}.{name}'
