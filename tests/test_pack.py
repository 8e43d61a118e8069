"""Packed k-fold (train.pack): the stacked model (fastcifar.pack) against its members' solo forward and backward,
for every model the registry marks stackable; then whole runs, packed against sequential (fastcifar.pack_train)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastcifar.models import create_model, model_entry, model_names
from fastcifar.pack import NotPackable, PackedNet, split_logits, stack_inputs

STACKABLE = [n for n in model_names() if model_entry(n).stackable]
# The smallest width each model takes (0: fixed-width models); 16-px images keep the fixed-width ResNets quick.
WIDTHS = {"softmax": 0, "mlp": 16, "cnn": 8, "cnn_bn": 8, "resnet9": 8, "speedrun_net": 8, "speedrun_net95": 8,
          "speedrun_net96": 8}
SIZE = 16


def _members(name: str, k: int, dropout: float = 0.0) -> list[torch.nn.Module]:
    out = []
    for j in range(k):
        torch.manual_seed(j)
        m = create_model(name, num_classes=10, image_size=SIZE, width=WIDTHS.get(name, 0), dropout=dropout)
        m = m.to(memory_format=torch.channels_last)
        if hasattr(m, "init_whitening"):  # each member fits its own whitening to its own images
            images = torch.randint(0, 256, (40, SIZE, SIZE, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(j))
            m.init_whitening(images, (0.5,) * 3, (0.25,) * 3)
        out.append(m.train())
    return out


@pytest.mark.parametrize("name", STACKABLE)
def test_packed_forward_backward_and_bn_statistics_match_each_member_alone(name):
    """Two training steps of 3 members packed, each on its own batch, against each member's own forward and
    backward: logits within 1e-5 relative (measured: bitwise equal for the small nets), gradients within 1e-4 of
    their largest (the grouped convolution's weight gradient sums in another order: measured up to 2e-5 relative
    for speedrun_net), BatchNorm running statistics and batch counts within 1e-6 (measured: equal)."""
    k = 3
    members = _members(name, k)
    solo = [copy.deepcopy(m) for m in members]
    net = PackedNet(members)
    net.bind()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        xs = [torch.randn(4, 3, SIZE, SIZE, generator=g).to(memory_format=torch.channels_last) for _ in range(k)]
        ys = [torch.randint(0, 10, (4,), generator=g) for _ in range(k)]
        for m in (*members, *solo):
            m.zero_grad(set_to_none=True)
        logits = split_logits(net(stack_inputs(xs)), k)
        torch.stack([F.cross_entropy(out, y) for out, y in zip(logits, ys)]).sum().backward()
        for j in range(k):
            alone = solo[j](xs[j])
            F.cross_entropy(alone, ys[j]).backward()
            torch.testing.assert_close(logits[j], alone, rtol=1e-5, atol=1e-6)
            for (pname, p), q in zip(members[j].named_parameters(), solo[j].parameters()):
                if q.grad is None:
                    assert p.grad is None, pname
                    continue
                scale = float(q.grad.abs().max()) or 1.0
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * scale, msg=f"{name} {pname}")
            for (bname, a), b in zip(members[j].named_buffers(), solo[j].buffers()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} {bname}")
    net.unbind()
    for m in members:  # each member owns its buffers again: nothing of the pack is left in it
        for b in m.buffers():
            assert b.untyped_storage().nbytes() == b.numel() * b.element_size()


def test_a_member_computes_the_same_whatever_else_is_in_its_pack():
    """What resume relies on (fastcifar.pack_train.Packs): a member's logits, gradients and statistics are bitwise
    the same whatever the other members are and wherever it sits in the pack, for one pack size."""
    base = _members("speedrun_net", 4)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, SIZE, SIZE, generator=g).to(memory_format=torch.channels_last) for _ in range(4)]
    ys = [torch.randint(0, 10, (4,), generator=g) for _ in range(4)]

    def member_1(order: list[int]) -> list[torch.Tensor]:
        ms = [copy.deepcopy(base[i]) for i in order]
        net = PackedNet(ms)
        net.bind()
        logits = split_logits(net(stack_inputs([xs[i] for i in order])), len(order))
        torch.stack([F.cross_entropy(out, ys[i]) for out, i in zip(logits, order)]).sum().backward()
        net.unbind()
        j = order.index(1)
        return [logits[j].detach(), *(p.grad for p in ms[j].parameters()), *ms[j].buffers()]

    ref = member_1([0, 1, 2])
    for order in ([1, 0, 2], [3, 1, 2], [2, 3, 1]):
        assert all(torch.equal(a, b) for a, b in zip(member_1(order), ref)), order


def test_what_cannot_be_packed_is_named():
    with pytest.raises(NotPackable, match=r"^model\.dropout: 0\.3 cannot be packed"):
        PackedNet(_members("cnn_bn", 2, dropout=0.3))
    effnet = [create_model("efficientnet_b2", num_classes=10, image_size=32) for _ in range(2)]
    with pytest.raises(NotPackable, match=r"^model\.name: EfficientNet cannot be packed; set train\.pack = 1$"):
        PackedNet(effnet)
    assert not model_entry("efficientnet_b2").stackable
