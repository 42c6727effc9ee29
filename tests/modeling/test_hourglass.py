"""Tests for the Deep-MARC mask-head networks in masklab_d2/layers/hourglass.py (CPU, torch only).

The expected depths and parameter counts are derived here from the reference structure
(reference/deep_marc.md, section 1, and the TensorFlow hourglass_network.py / resnet_v1.py), not
from the modules, so a structural slip in the implementation shows up as a count mismatch.
"""

import pytest
import torch
from torch import nn

from masklab_d2.layers.hourglass import (
    HOURGLASS_VARIANTS,
    MASK_NETWORK_NAMES,
    RESNET_VARIANTS,
    DeepMaskPredictor,
    HourglassNetwork,
    ResBlock,
    ResNetMaskNetwork,
    SingleValueSafeBatchNorm2d,
    build_mask_network,
    get_norm,
    hourglass_config,
    hourglass_depth,
    resnet_config,
)

IN_CHANNELS = 256  # FPN RoI features
NC = 64  # mask_head.num_filters in the Deep-MARC configs

# The notes' table, typed in independently of HOURGLASS_VARIANTS: (channels at nc=64, blocks).
HOURGLASS_TABLE = {
    "hourglass10": ((128, 128), (1, 1)),
    "hourglass20": ((128, 128, 192), (1, 2, 2)),
    "hourglass32": ((128, 128, 192, 192), (2, 2, 2, 2)),
    "hourglass52": ((128, 128, 192, 192, 192, 256), (2, 2, 2, 2, 2, 4)),
    "hourglass100": ((128, 128, 192, 192, 192, 256), (4, 4, 4, 4, 4, 8)),
}
HOURGLASS_DEPTHS = {
    "hourglass10": 10,
    "hourglass20": 20,
    "hourglass32": 32,
    "hourglass52": 52,
    "hourglass100": 100,
}
# ODAPI ResNetMaskNetwork: (stack widths at nc=64, basic blocks per stack).
RESNET_TABLE = {
    "resnet4": ((128,), (2,)),
    "resnet8": ((128,), (4,)),
    "resnet12": ((128,), (6,)),
    "resnet16": ((128,), (8,)),
    "resnet20": ((128, 192), (8, 2)),
}
# Regression guard on the analytic formulas below (values they give for in=256, nc=64).
EXPECTED_PARAMS = {
    "hourglass10": 1_723_776,
    "hourglass20": 5_649_152,
    "hourglass32": 10_558_592,
    "hourglass52": 23_573_120,
    "hourglass100": 47_339_648,
    "resnet4": 542_272,
    "resnet8": 1_133_632,
    "resnet12": 1_724_992,
    "resnet16": 2_316_352,
    "resnet20": 3_559_808,
}


# ------------------------------------------------------------------------------------------------
# Analytic parameter counts (BN: gamma + beta per channel; convs before a BN have no bias)
# ------------------------------------------------------------------------------------------------
def _bn(c):
    return 2 * c


def _conv_block(k, cin, cout):
    return k * k * cin * cout + _bn(cout)


def _res_block(cin, cout, stride=1, force_skip_conv=False):
    main = _conv_block(3, cin, cout) + 9 * cout * cout + _bn(cout)
    conv_skip = force_skip_conv or stride > 1 or cin != cout
    return main + (_conv_block(1, cin, cout) if conv_skip else 0)


def _stage(dims, blocks):
    c0, c1, b0 = dims[0], dims[1], blocks[0]
    skip = b0 * _res_block(c0, c0)
    down = _res_block(c0, c1, stride=2) + (b0 - 1) * _res_block(c1, c1)
    inner = _stage(dims[1:], blocks[1:]) if len(dims) > 2 else blocks[1] * _res_block(c1, c1)
    up = (b0 - 1) * _res_block(c1, c1) + _res_block(c1, c0)
    return skip + down + inner + up


def expected_hourglass_params(in_channels, nc, dims, blocks):
    return (
        _conv_block(3, in_channels, nc)
        + _res_block(nc, dims[0], force_skip_conv=True)
        + _stage(dims, blocks)
        + _conv_block(3, dims[0], dims[0])
    )


def _basic_block(cin, cout, conv_shortcut):
    shortcut = cin * cout + cout if conv_shortcut else 0  # Keras Conv2D default: with bias
    return _bn(cin) + shortcut + 9 * cin * cout + _bn(cout) + 9 * cout * cout + _bn(cout)


def expected_resnet_params(in_channels, nc, widths, blocks):
    total = in_channels * nc + nc  # 1x1 input conv with bias
    cin = nc
    for width, num in zip(widths, blocks):
        total += _basic_block(cin, width, True) + (num - 1) * _basic_block(width, width, False)
        cin = width
    return total


def expected_predictor_params(in_channels, num_filters, num_classes):
    deconv = in_channels * num_filters * 2 * 2 + num_filters
    return deconv + _bn(num_filters) + num_filters * num_classes + num_classes


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# Variant tables and depth
# ------------------------------------------------------------------------------------------------
def test_variant_tables_match_notes():
    assert set(HOURGLASS_VARIANTS) == set(HOURGLASS_TABLE)
    for name, (dims, blocks) in HOURGLASS_TABLE.items():
        assert hourglass_config(name, NC) == (dims, blocks)
    for name, (dims, blocks) in RESNET_TABLE.items():
        assert resnet_config(name, NC) == (dims, blocks)
    # Widths are relative to nc: a half-width HG-52 is 64, 64, 96, 96, 96, 128.
    assert hourglass_config("hourglass52", 32)[0] == (64, 64, 96, 96, 96, 128)
    assert resnet_config("resnet20", 32)[0] == (64, 96)


@pytest.mark.parametrize("name", sorted(HOURGLASS_DEPTHS))
def test_hourglass_depth_rule(name):
    dims, blocks = HOURGLASS_TABLE[name]
    assert hourglass_depth(dims, blocks) == HOURGLASS_DEPTHS[name]


def _main_path_convs(net):
    """Conv2d layers outside the stage skip branches and the 1x1 residual shortcuts."""
    return [
        name
        for name, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
        and "skip_branch" not in name.split(".")
        and "shortcut" not in name.split(".")
    ]


@pytest.mark.parametrize("name", sorted(HOURGLASS_DEPTHS))
def test_hourglass_module_depth(name):
    net = build_mask_network(name, IN_CHANNELS, NC)
    assert len(_main_path_convs(net)) == HOURGLASS_DEPTHS[name] == net.depth
    # Every main-path conv is 3x3: the 1x1 convs all sit in shortcuts.
    modules = dict(net.named_modules())
    assert all(modules[n].kernel_size == (3, 3) for n in _main_path_convs(net))


@pytest.mark.parametrize("name", sorted(RESNET_VARIANTS))
def test_resnet_module_depth(name):
    net = build_mask_network(name, IN_CHANNELS, NC)
    convs3x3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3x3) == int(name[len("resnet") :]) == net.depth


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------
def test_parameter_counts_match_reference_structure():
    rows = []
    for name, (dims, blocks) in HOURGLASS_TABLE.items():
        net = build_mask_network(name, IN_CHANNELS, NC)
        expected = expected_hourglass_params(IN_CHANNELS, NC, dims, blocks)
        assert _num_params(net) == expected == EXPECTED_PARAMS[name], name
        rows.append((name, expected))
    for name, (widths, blocks) in RESNET_TABLE.items():
        net = build_mask_network(name, IN_CHANNELS, NC)
        expected = expected_resnet_params(IN_CHANNELS, NC, widths, blocks)
        assert _num_params(net) == expected == EXPECTED_PARAMS[name], name
        rows.append((name, expected))
    predictor = DeepMaskPredictor(2 * NC, 1, num_filters=NC)
    predictor_params = expected_predictor_params(2 * NC, NC, 1)
    assert _num_params(predictor) == predictor_params

    print(f"\nMask-network parameters (in_channels={IN_CHANNELS}, nc={NC}, BN)")
    print(f"| {'variant':<13}| {'params':>11} |")
    print(f"|{'-' * 14}|{'-' * 13}|")
    for name, params in rows:
        print(f"| {name:<13}| {params:>11,} |")
    print(f"| {'predictor':<13}| {predictor_params:>11,} |  (2nc -> deconv nc -> 1 logit)")


def test_half_width_parameter_count():
    dims, blocks = hourglass_config("hourglass52", 32)
    net = HourglassNetwork(IN_CHANNELS, 32, dims, blocks)
    assert _num_params(net) == expected_hourglass_params(IN_CHANNELS, 32, dims, blocks)


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hourglass10", "hourglass20", "hourglass52", "hourglass100"])
@pytest.mark.parametrize("size", [32, 28, 14])
def test_hourglass_output_shapes(name, size):
    torch.manual_seed(0)
    net = build_mask_network(name, IN_CHANNELS, NC).eval()
    predictor = DeepMaskPredictor(net.out_channels, 3, num_filters=NC).eval()
    x = torch.randn(2, IN_CHANNELS, size, size)
    with torch.no_grad():
        features = net(x)
        logits = predictor(features)
    assert features.shape == (2, 2 * NC, size, size)
    assert logits.shape == (2, 3, 2 * size, 2 * size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(RESNET_VARIANTS))
def test_resnet_output_shapes(name):
    net = build_mask_network(name, IN_CHANNELS, NC).eval()
    with torch.no_grad():
        out = net(torch.randn(2, IN_CHANNELS, 32, 32))
    assert out.shape == (2, net.out_channels, 32, 32)
    assert net.out_channels == (3 * NC if name == "resnet20" else 2 * NC)


def test_odd_size_upsampling_is_x2_then_crop():
    """Nearest interpolation to the skip size == x2 nearest upsampling cropped to that size."""
    for size in range(1, 66):
        low = torch.randn(1, 2, (size + 1) // 2, (size + 1) // 2)
        resized = nn.functional.interpolate(low, size=(size, size), mode="nearest")
        doubled = low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[..., :size, :size]
        assert torch.equal(resized, doubled), size


@pytest.mark.parametrize("name", ["hourglass52", "resnet20"])
@pytest.mark.parametrize("train", [False, True])
def test_no_rois(name, train):
    net = build_mask_network(name, IN_CHANNELS, NC).train(train)
    predictor = DeepMaskPredictor(net.out_channels, 1).train(train)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    running_mean = bn.running_mean.clone()
    x = torch.zeros(0, IN_CHANNELS, 32, 32, requires_grad=train)
    logits = predictor(net(x))
    assert logits.shape == (0, 1, 64, 64)
    if train:
        logits.sum().backward()  # the 0 * loss a detector produces for an empty batch
    assert torch.equal(bn.running_mean, running_mean)


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_single_roi_training_reaches_1x1(norm):
    """HG-52 downsamples 32 -> 1; one RoI in training must not trip BN's one-value check.

    SyncBN outside a process group (one GPU, the CPU) falls back to plain batch norm, which
    raised "Expected more than 1 value per channel" here.
    """
    net = build_mask_network("hourglass52", IN_CHANNELS, NC, norm=norm).train()
    out = net(torch.randn(1, IN_CHANNELS, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 2 * NC, 32, 32) and torch.isfinite(out).all()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()


def test_single_value_batch_norm_matches_keras():
    bn = SingleValueSafeBatchNorm2d(3).train()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    out = bn(torch.randn(1, 3, 1, 1))
    assert torch.allclose(out.flatten(), bn.bias)  # centred input is 0 -> output is beta
    assert torch.equal(bn.running_var, torch.ones(3))  # running stats untouched
    x = torch.randn(4, 3, 5, 5)  # everything else is plain nn.BatchNorm2d
    ref = nn.BatchNorm2d(3).train()
    ref.load_state_dict(bn.state_dict())
    assert torch.allclose(bn(x), ref(x))


# ------------------------------------------------------------------------------------------------
# Gradients, norms, errors, init
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hourglass20", "resnet8"])
def test_gradients_reach_input_and_all_parameters(name):
    torch.manual_seed(0)
    net = build_mask_network(name, IN_CHANNELS, 16)
    predictor = DeepMaskPredictor(net.out_channels, 1, num_filters=16)
    x = torch.randn(3, IN_CHANNELS, 16, 16, requires_grad=True)
    predictor(net(x)).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for pname, p in list(net.named_parameters()) + list(predictor.named_parameters()):
        assert p.grad is not None, pname


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "GN", "", "none", None])
def test_norm_variants_build(norm):
    net = build_mask_network("hourglass20", IN_CHANNELS, 32, norm=norm)
    predictor = DeepMaskPredictor(net.out_channels, 1, norm=norm, num_filters=32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    has_norm = norm in ("BN", "SyncBN", "GN")
    assert all((c.bias is None) == has_norm for c in convs)  # bias only without a norm
    if norm != "SyncBN":  # SyncBN needs a process group to run in training mode
        x = torch.randn(2, IN_CHANNELS, 16, 16)
        assert predictor(net(x)).shape == (2, 1, 32, 32)


def test_norm_layers_settings():
    hg = build_mask_network("hourglass10", IN_CHANNELS, NC)
    bns = [m for m in hg.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.9 and m.eps == 1e-5 for m in bns)  # Keras momentum 0.1
    rn = build_mask_network("resnet4", IN_CHANNELS, NC)
    assert all(
        m.momentum == 0.01 and m.eps == 1.001e-5
        for m in rn.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    assert get_norm("GN", 192, 0.9).num_groups == 32
    assert get_norm("GN", 48, 0.9).num_groups == 24  # 32 does not divide 48
    assert isinstance(get_norm("SyncBN", 8, 0.9), nn.SyncBatchNorm)
    assert get_norm("BN", 8, bn_momentum=0.5).momentum == 0.5


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="hourglass52") as err:
        build_mask_network("hourglass54", IN_CHANNELS)
    assert all(n in str(err.value) for n in MASK_NETWORK_NAMES)
    with pytest.raises(ValueError, match="resnet20"):
        ResNetMaskNetwork(IN_CHANNELS, NC, depth=18)
    with pytest.raises(ValueError, match="SyncBN"):
        build_mask_network("hourglass10", IN_CHANNELS, norm="LN")
    with pytest.raises(ValueError, match="GN"):
        get_norm("FrozenBN", 8)
    with pytest.raises(ValueError):
        HourglassNetwork(IN_CHANNELS, NC, channel_dims=(128, 128))  # blocks missing
    with pytest.raises(ValueError):
        hourglass_depth((128, 128), (1,))
    with pytest.raises(ValueError):
        ResBlock(64, 128, skip_conv=False)


def test_default_hourglass_is_hg52():
    net = HourglassNetwork(IN_CHANNELS)
    assert net.depth == 52 and net.channel_dims == HOURGLASS_TABLE["hourglass52"][0]


def test_predictor_init_is_variance_scaling_fan_out():
    torch.manual_seed(0)
    predictor = DeepMaskPredictor(128, 1, num_filters=64)
    # VarianceScaling(2, fan_out): std = sqrt(2 / fan_out); deconv fan_out = 128 * 2 * 2 = 512.
    assert abs(predictor.deconv.weight.std().item() - (2 / 512) ** 0.5) < 0.003
    assert torch.count_nonzero(predictor.deconv.bias) == 0
    assert torch.count_nonzero(predictor.predictor.bias) == 0


def test_hourglass_convs_use_glorot_uniform():
    net = build_mask_network("hourglass10", IN_CHANNELS, NC)
    w = net.input_conv.conv.weight  # [64, 256, 3, 3]
    limit = (6 / (9 * 256 + 9 * 64)) ** 0.5
    assert w.abs().max() <= limit and w.abs().max() > 0.95 * limit
