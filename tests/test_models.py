"""Architecture, init, losses and the global BatchNorm layer: the pix2pix numbers, exactly."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pix2pix_dist.global_batchnorm import GlobalBatchNorm2d, convert_to_global_batchnorm
from pix2pix_dist.losses import d_loss, g_gan_loss, l1_loss
from pix2pix_dist.models import PatchDiscriminator, UNetGenerator, count_parameters, init_weights


def test_unet256_matches_pix2pix_parameter_count_and_shape():
    g = UNetGenerator(1, 2)
    assert count_parameters(g) == 54_409_858
    with torch.no_grad():
        out = g.eval()(torch.randn(1, 1, 256, 256))
    assert out.shape == (1, 2, 256, 256)
    assert out.abs().max() <= 1.0  # tanh output


def test_unet_has_dropout_only_in_three_innermost_512_blocks():
    g = UNetGenerator(1, 2)
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3
    assert sum(isinstance(m, nn.Dropout) for m in UNetGenerator(dropout=False).modules()) == 0


def test_unet128_and_options():
    g = UNetGenerator(1, 2, num_downs=7, ngf=32, norm="instance")
    with torch.no_grad():
        assert g(torch.randn(2, 1, 128, 128)).shape == (2, 2, 128, 128)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    with pytest.raises(ValueError):
        UNetGenerator(num_downs=4)


def test_unet_skip_connects_level_i_with_n_minus_i():
    # The decoder of each level receives its own encoder output concatenated (2x channels).
    g = UNetGenerator(1, 2, num_downs=8, ngf=8)
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    downs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert len(ups) == len(downs) == 8
    ups.reverse()  # modules() lists downs outermost first, ups innermost first
    # level i's up conv takes its own down output twice over (the skip), except the innermost
    for down, up in zip(downs[:-1], ups[:-1]):
        assert up.in_channels == 2 * down.out_channels
    assert ups[-1].in_channels == downs[-1].out_channels


def test_patchgan_70x70():
    d = PatchDiscriminator(3)
    assert count_parameters(d) == 2_765_633
    with torch.no_grad():
        assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    strides = [m.stride[0] for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert strides == [2, 2, 2, 1, 1]


def test_init_weights_follows_pix2pix():
    torch.manual_seed(0)
    g = UNetGenerator(1, 2, ngf=64)
    init_weights(g, 0.02)
    convs = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    norms = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.mean().item()) < 1e-3 and abs(convs.std().item() - 0.02) < 1e-3
    assert abs(norms.mean().item() - 1.0) < 5e-3 and abs(norms.std().item() - 0.02) < 5e-3
    biases = [m.bias for m in g.modules() if getattr(m, "bias", None) is not None]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


@pytest.mark.parametrize("mode", ["vanilla", "lsgan", "hinge"])
def test_gan_losses_reward_the_right_side(mode):
    # 1 and 0 are the lsgan targets, and on the right side of 0 for vanilla and hinge
    confident_real = torch.full((2, 1, 4, 4), 1.0)
    confident_fake = torch.full((2, 1, 4, 4), 0.0)
    good_real, good_fake = d_loss(mode, confident_real, confident_fake)
    bad_real, bad_fake = d_loss(mode, confident_fake, confident_real)
    assert good_real < bad_real and good_fake < bad_fake
    # G wants D to call its fakes real
    assert g_gan_loss(mode, confident_real) < g_gan_loss(mode, confident_fake)


def test_vanilla_loss_values():
    zeros = torch.zeros(1, 1, 2, 2)
    real, fake = d_loss("vanilla", zeros, zeros)
    assert torch.isclose(real, torch.log(torch.tensor(2.0))) and torch.isclose(fake, real)
    assert torch.isclose(l1_loss(torch.ones(3), torch.zeros(3)), torch.tensor(1.0))
    with pytest.raises(ValueError):
        d_loss("wgan", zeros, zeros)


@pytest.fixture
def gloo_group_of_one(tmp_path):
    """A real gloo process group with this process alone: the all-reduce runs, and sums over
    one process, so GlobalBatchNorm2d must equal BatchNorm2d (2 processes: test_recipes.py)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum, dtype, tol", [(0.1, torch.float32, 1e-5),
                                                  (None, torch.float32, 1e-5),
                                                  (0.1, torch.bfloat16, 2e-2)])
def test_global_batchnorm_is_batchnorm_on_one_process(gloo_group_of_one, momentum, dtype, tol):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(6, momentum=momentum)
    init_weights(ref)
    nn.init.normal_(ref.bias, 0.0, 0.5)
    ours = convert_to_global_batchnorm(nn.Sequential(copy.deepcopy(ref)), torch.device("cpu"))[0]
    assert type(ours) is GlobalBatchNorm2d
    for step in range(3):  # running statistics follow torch's rule, step after step
        x = (torch.randn(4, 6, 5, 7) * 3 + 2).to(dtype).requires_grad_()
        x_ours = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            y_ref, y_ours = ref(x), ours(x_ours)
        assert y_ours.dtype == y_ref.dtype
        weights = torch.randn(y_ref.shape)  # a loss that is not symmetric in the batch
        (y_ref.float() * weights).sum().backward()
        (y_ours.float() * weights).sum().backward()
        torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(x_ours.grad.float(), x.grad.float(), rtol=tol, atol=tol)
        for name in ("weight", "bias"):
            torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad,
                                       rtol=tol, atol=tol * 10)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=tol, atol=tol)
    ref.eval(), ours.eval()
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))  # eval: running statistics, no communication
    plain = nn.BatchNorm2d(6)
    plain.load_state_dict(ours.state_dict())  # checkpoints and exports load into BatchNorm
