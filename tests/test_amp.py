"""bf16 autocast stays exact where it must (issue 12 §1): under torch.autocast the matcher, the criterion's losses
(class CE, sigmoid BCE, Dice, point sampling) and the preservation KL equal their float32 values computed from the
same bf16 predictions cast to float32."""

from __future__ import annotations

import torch

from tmtseg.adapt.regularisers import PreserveKL, class_distribution
from tmtseg.losses.criterion import semantic_targets

from .test_criterion import H, K, Q, W, criterion, label_map


def _bf16_predictions(seed: int) -> dict:
    """A deep-supervised output as a bf16 forward pass leaves it: three layers, bf16 logits, masks and point weights."""
    g = torch.Generator().manual_seed(seed)

    def layer() -> dict:
        return {
            "pred_logits": (3 * torch.randn(2, Q, K + 1, generator=g)).bfloat16(),  # [B, Q, K+1]
            "pred_masks": (3 * torch.randn(2, Q, H // 4, W // 4, generator=g)).bfloat16(),  # [B, Q, h, w]
        }

    layers = [layer() for _ in range(3)]
    point_weight = (1 + torch.rand(2, 1, H // 4, W // 4, generator=g)).bfloat16()  # [B, 1, h, w]
    return {**layers[-1], "aux_outputs": layers[:-1], "point_weight": point_weight}


def _as_float(x):
    if isinstance(x, dict):
        return {k: _as_float(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_as_float(v) for v in x]
    return x.float()


def _targets() -> list[dict]:
    labels = [label_map(), label_map().flip(1)]
    labels[1][:4] = 255  # some void
    return [semantic_targets(lab, num_classes=K, ignore_index=255) for lab in labels]


def test_criterion_under_bf16_autocast_equals_float32_losses_of_the_same_predictions():
    out, targets = _bf16_predictions(0), _targets()
    crit = criterion(True)
    torch.manual_seed(1)  # the same matcher and importance points in both calls
    expected = crit(_as_float(out), targets)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(out, targets)
    assert got.keys() == expected.keys() and len(got) == 10  # three layers x (ce, mask, dice) + the sum
    for key, value in got.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, expected[key]), f"{key}: {value.item()} != {expected[key].item()}"


def test_matcher_costs_under_bf16_autocast_are_the_float32_costs(monkeypatch):
    """Every cost matrix handed to the Hungarian solver is the float32 one (its BCE and Dice are matmuls, which
    autocast would run in bf16), and so is the matching."""
    import tmtseg.losses.matcher as matcher_mod

    seen: list = []
    solve = matcher_mod.linear_sum_assignment
    monkeypatch.setattr(matcher_mod, "linear_sum_assignment", lambda cost: (seen.append(cost), solve(cost))[1])
    out, targets = _bf16_predictions(2), _targets()
    matcher = criterion(True).matcher
    layers = [*out["aux_outputs"], out]
    torch.manual_seed(3)
    expected = matcher.match_layers(_as_float(layers), targets)
    expected_costs, seen[:] = list(seen), []
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher.match_layers(layers, targets)
    assert len(seen) == len(expected_costs) == 3 * len(targets)
    for cost, expected_cost in zip(seen, expected_costs, strict=True):
        assert cost.dtype == expected_cost.dtype == "float32" and (cost == expected_cost).all()
    for got_layer, expected_layer in zip(got, expected, strict=True):
        for (rows, cols), (rows_f, cols_f) in zip(got_layer, expected_layer, strict=True):
            assert torch.equal(rows, rows_f) and torch.equal(cols, cols_f)


class _FixedTeacher(torch.nn.Module):
    """A stand-in source model that returns a fixed output whatever the images."""

    def __init__(self, outputs: dict) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> dict:  # noqa: ARG002
        return self.outputs


def _kl(teacher_outputs: dict) -> PreserveKL:
    kl = PreserveKL(weight=1.0, domains=("source",), weighting="uniform")
    kl.set_source(_FixedTeacher(teacher_outputs))
    return kl


def test_preservation_kl_under_bf16_autocast_is_the_float32_kl():
    """The KL's class distribution is an einsum, which autocast would run in bf16."""
    student, teacher = _bf16_predictions(4), _bf16_predictions(5)
    images = torch.zeros(2, 3, H, W)
    weight = torch.rand(2, 1, H // 4, W // 4).bfloat16()  # [B, 1, h, w]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = class_distribution(student["pred_logits"], student["pred_masks"])  # [B, K, h, w]
        got = _kl(teacher).term(images, student, weight)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2, H // 4, W // 4))
    # the reference: float32 all through, from the same bf16 values (the teacher's too)
    expected = _kl(_as_float(teacher)).term(images, _as_float(student), weight.float())
    assert got.dtype == torch.float32 and torch.equal(got, expected), (got.item(), expected.item())


def test_a_frozen_linear_casts_its_weight_once_and_computes_what_autocast_computes():
    from tmtseg.modeling.layers import FrozenCastLinear

    torch.manual_seed(0)
    plain, cast = torch.nn.Linear(24, 40), FrozenCastLinear(24, 40)
    cast.load_state_dict(plain.state_dict())
    for layer in (plain, cast):
        layer.requires_grad_(False)
    x = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = cast(x), plain(x)
        copy = cast._cast[1]
        assert copy.dtype == torch.bfloat16 and torch.equal(out, want)
        cast(x)
        assert cast._cast[1] is copy  # kept between calls
        with torch.no_grad():  # an in-place change (an optimizer step, load_state_dict) is seen at the next call
            for layer in (plain, cast):
                layer.weight.mul_(-2.0)
        assert torch.equal(cast(x), plain(x)) and cast._cast[1] is not copy
    assert torch.equal(cast(x), plain(x)) and cast(x).dtype == torch.float32  # outside autocast: the fp32 weight
    # a weight that trains is never cast ahead: its gradient flows as nn.Linear's
    cast.requires_grad_(True)
    cast._cast = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast(x).float().sum().backward()
    assert cast._cast is None and cast.weight.grad is not None


def test_group_norm_of_a_bf16_channels_last_map_equals_nn_group_norm_and_leaves_float32_alone():
    from tmtseg.modeling.layers import group_norm

    torch.manual_seed(0)
    norm, plain = group_norm(64), torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(2, 64, 12, 10).contiguous(memory_format=torch.channels_last)  # as the pyramid's convs return
    grad = torch.randn(2, 64, 12, 10)
    # float32: the same kernel on the same layout, bit for bit (the float32 step does not change)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((norm, plain), xs)]
    assert outs[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(outs[0], outs[1])
    for out in outs:
        out.backward(grad)
    assert torch.equal(xs[0].grad, xs[1].grad)
    # bf16: normalised in the standard layout, equal to the channels-last kernel within bf16 rounding, both against
    # the float64 reference
    xb = [x.bfloat16().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((norm, plain), xb)]
    assert outs[0].dtype == torch.bfloat16 and outs[0].is_contiguous()
    ref_x = xb[0].detach().double().requires_grad_(True)
    ref = torch.nn.functional.group_norm(ref_x, 32, norm.weight.double(), norm.bias.double(), norm.eps)
    ref.backward(grad.double())
    for out in outs:
        assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()
        out.backward(grad.bfloat16())
    for xi in xb:
        assert (xi.grad.double() - ref_x.grad).abs().max() < 0.05 * ref_x.grad.abs().max()
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=0.02, atol=0.02)
    assert torch.allclose(xb[0].grad.float(), xb[1].grad.float(), rtol=0.05, atol=0.05)


def test_fused_attention_of_bf16_inputs_on_cpu_is_float32_attention_of_the_same_values():
    import torch.nn.functional as F

    from tmtseg.modeling.layers import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    bias = torch.zeros(2, 1, 6, 10).masked_fill(torch.rand(2, 1, 6, 10) < 0.4, float("-inf"))
    bias[..., 0] = 0.0  # every query sees a key
    # float32 inputs: the plain fused call, bit for bit
    assert torch.equal(attention(q, k, v, bias=bias)[0], F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    # bf16 inputs under autocast (as the decoder's projections return them): float32 attention of those bf16 values
    xs = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    refs = [t.detach().float().requires_grad_(True) for t in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = attention(*xs, bias=bias)
    want = F.scaled_dot_product_attention(*refs, attn_mask=bias)
    assert probs is None and out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    grad = torch.randn(out.shape)
    out.backward(grad.bfloat16())
    want.backward(grad.bfloat16().float())
    for x, ref in zip(xs, refs, strict=True):
        assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, ref.grad.bfloat16())
