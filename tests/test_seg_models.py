"""DeepLab segmenters: shapes at odd sizes, dilation and ASPP rates, parameter groups, MSC training outputs and loss,
batched multi-scale + flip inference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.deeplab import ASPPv2, DeepLab, msc_cross_entropy, msc_outputs, resize_labels
from models.seg_inference import canvas_probabilities, multiscale_logits
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


def _stride_out(n: int, halvings: int) -> int:
    for _ in range(halvings):
        n = (n - 1) // 2 + 1
    return n


@pytest.mark.parametrize("arch,output_stride", [("deeplabv2", 8), ("deeplabv2", 16), ("deeplabv3", 8)])
def test_logits_shape_at_odd_sizes(arch, output_stride):
    torch.manual_seed(0)
    model = DeepLab(5, arch, "resnet18", "batch", output_stride).eval()
    halvings = 3 if output_stride == 8 else 4
    for height, width in ((33, 47), (16, 16), (41, 29)):
        with torch.no_grad():
            logits = model(torch.randn(2, 3, height, width))
        assert logits.shape == (2, 5, _stride_out(height, halvings), _stride_out(width, halvings))


def test_dilation_and_aspp_rates():
    model = DeepLab(4, "deeplabv2", "resnet18", "frozen", 8)
    for stage, dilation in ((model.backbone.stage3, 2), (model.backbone.stage4, 4)):
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        assert all(m.stride == (1, 1) for m in convs)
        assert {m.dilation for m in convs if m.kernel_size == (3, 3)} == {(dilation, dilation)}
    branches = model.head.branches
    assert [b.dilation for b in branches] == [(r, r) for r in (6, 12, 18, 24)]
    assert all(b.padding == b.dilation and b.kernel_size == (3, 3) and b.out_channels == 4 for b in branches)
    x = torch.randn(1, model.backbone.channels.stage4, 7, 9)
    assert torch.allclose(model.head(x), sum(b(x) for b in branches), atol=1e-6)
    v3 = DeepLab(4, "deeplabv3", "resnet18", "frozen", 8)
    rates = [m[0].dilation for m in v3.head[0].convs[1:4]]
    assert rates == [(12, 12), (24, 24), (36, 36)]


def test_parameter_groups_partition_trainable_parameters():
    for norm in ("frozen", "batch"):
        model = DeepLab(3, "deeplabv3", "resnet18", norm)
        groups = model.parameter_groups()
        ids = [id(p) for group in groups for p in group]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        bn_weight = model.backbone.stage0[1].weight
        assert (id(bn_weight) in ids) == (norm == "batch")
        assert all(p.ndim > 1 for p in groups[1]) and all(p.ndim == 1 for p in groups[2])


def test_msc_outputs_and_loss():
    torch.manual_seed(0)
    model = ASPPv2(3, 2, rates=(1,))
    images = torch.randn(2, 3, 16, 20)
    outputs = msc_outputs(model, images, (0.5, 0.75))
    assert [o.shape[2:] for o in outputs] == [(16, 20), (8, 10), (12, 15), (16, 20)]
    resized = [F.interpolate(o, size=(16, 20), mode="bilinear", align_corners=False) for o in outputs[1:3]]
    assert torch.equal(outputs[3], torch.stack([outputs[0], *resized]).amax(0))
    assert len(msc_outputs(model, images, ())) == 1

    labels = torch.randint(0, 2, (2, 16, 20))
    labels[0, :4] = 255
    expected = F.cross_entropy(outputs[0], labels, ignore_index=255)
    assert torch.allclose(msc_cross_entropy(outputs[:1], labels), expected)
    assert float(msc_cross_entropy(outputs, torch.full_like(labels, 255)).detach()) == 0.0


def test_labels_are_resized_at_cell_centres_as_pil_nearest():
    # columns 0..5 downsampled to 3 cells: centres 0.5, 2.5, 4.5 of the input fall in columns 1, 3, 5
    labels = torch.arange(6).repeat(2, 4, 1)
    assert resize_labels(labels, (2, 3))[0].tolist() == [[1, 3, 5], [1, 3, 5]]
    # deeplab-pytorch's PIL NEAREST on float label maps, at the logit sizes of a 321 crop under MSC (41, 21, 31)
    pattern = torch.from_numpy(np.random.default_rng(0).integers(0, 21, (2, 321, 321)))
    for size in ((41, 41), (21, 21), (31, 31)):
        expected = [np.asarray(Image.fromarray(p.float().numpy()).resize(size[::-1], Image.NEAREST)) for p in pattern]
        assert torch.equal(resize_labels(pattern, size), torch.from_numpy(np.stack(expected)).long())
    # elsewhere too, except where a centre falls exactly on a cell boundary: PIL accumulates the step in floating
    # point and rounds some of those ties down
    pattern, (h, w) = pattern[:, :, :300], (41, 38)
    expected = np.asarray(Image.fromarray(pattern[0].float().numpy()).resize((w, h), Image.NEAREST))
    tie_rows, tie_cols = ((2 * np.arange(n) + 1) * size % (2 * n) == 0 for n, size in ((h, 321), (w, 300)))
    same = resize_labels(pattern, (h, w))[0].numpy() == expected
    assert tie_cols.sum() == 2 and same[np.ix_(~tie_rows, ~tie_cols)].all()
    # the loss sees them: logits that predict the centre-sampled labels give a near-zero loss
    logits = F.one_hot(resize_labels(labels, (2, 3)), 6).permute(0, 3, 1, 2).float() * 50
    assert float(msc_cross_entropy([logits], labels)) < 1e-6


def test_batched_multiscale_flip_inference_matches_a_per_image_loop():
    torch.manual_seed(0)
    model = DeepLab(3, "deeplabv2", "resnet18", "frozen").eval()
    canvas = torch.randn(3, 3, 40, 40)
    scales = (0.5, 1.0)
    batched = multiscale_logits(model, canvas, scales, flip=True, fusion="max")
    with torch.no_grad():
        for index in range(3):
            image = canvas[index:index + 1]
            per_scale = []
            for scale in scales:
                x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                             align_corners=False)
                per_scale.append((model(x) + model(x.flip(-1)).flip(-1)) / 2)
            size = per_scale[-1].shape[2:]
            fused = torch.stack([F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                 for x in per_scale]).amax(0)
            assert torch.allclose(batched[index:index + 1], fused, atol=1e-4)
    mean = multiscale_logits(model, canvas, scales, flip=False, fusion="mean")
    assert mean.shape == batched.shape
    with pytest.raises(ValueError, match="unknown fusion"):
        multiscale_logits(model, canvas, scales, fusion="sum")


def test_canvas_probabilities_crop_and_restore_sizes():
    logits = torch.randn(2, 4, 6, 6)
    probs = canvas_probabilities(logits, (48, 48), [(48, 30), (20, 48)], [(48, 30), (40, 96)])
    assert [p.shape for p in probs] == [(4, 48, 30), (4, 40, 96)]
    assert all(torch.allclose(p.sum(0), torch.ones(p.shape[1:])) for p in probs)
