"""The pieces the synthetic demo adds: resnet_mini, repeat-factor sampling, the loss at the crop's size, ASPP rates
and segmenters initialised from a CAM checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbone import ResNetBackbone, resnet_mini
from models.deeplab import DeepLab, msc_cross_entropy
from models.sfc import SFCNet
from storage import checkpoints
from storage.datasets.cam_training import EpochBatchSampler, repeat_factors
from tasks.runtime.weights import load_backbone_weights, unresolved_cam_weights
from tasks.train_seg import TrainSegConfig, build_segmenter


def test_resnet_mini_is_a_torchvision_style_resnet_with_output_stride_16():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet_mini", trainable_from=0, norm="batch").eval()
    assert backbone.channels.as_tuple() == (32, 64, 128, 128)
    outputs = backbone(torch.randn(1, 3, 96, 128))
    assert [tuple(o.shape[1:]) for o in outputs] == [(32, 24, 32), (64, 12, 16), (128, 6, 8), (128, 6, 8)]
    state = resnet_mini().state_dict()
    assert {k.split(".")[0] for k in state} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    fresh = ResNetBackbone("resnet_mini", trainable_from=0, norm="batch")
    fresh.load_torchvision_state_dict(state)
    assert torch.equal(fresh.stage4[0].conv1.weight, state["layer4.0.conv1.weight"])


def test_resnet_mini_step_is_much_cheaper_than_resnet18():
    def multiply_adds(name: str) -> int:
        total = 0

        def count(module, inputs, output):
            nonlocal total
            total += output.numel() * module.in_channels // module.groups * module.kernel_size[0] ** 2

        model = SFCNet(20, name, norm="batch")
        hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model(torch.randn(1, 3, 96, 96), torch.ones(1, 21, 6, 6))
        for hook in hooks:
            hook.remove()
        return total

    assert multiply_adds("resnet_mini") < multiply_adds("resnet18") / 8


def test_repeat_factors_repeat_rare_classes_only():
    labels = np.zeros((100, 3), dtype=np.float32)
    labels[:, 0] = 1            # in every image
    labels[:5, 1] = 1           # in 5 %: sqrt(0.2 / 0.05) = 2
    labels[5:6, 2] = 1          # in 1 %: sqrt(0.2 / 0.01) = 4.47 -> 4
    factors = repeat_factors(labels, 0.2)
    assert factors[:5].tolist() == [2] * 5 and factors[5] == 4 and set(factors[6:].tolist()) == {1}


def test_sampler_with_repeats_shows_each_item_that_often_per_epoch():
    repeats = np.array([1, 3, 1, 2])
    sampler = EpochBatchSampler(4, 7, seed=0, total_steps=1, repeats=repeats)
    (batch,) = list(sampler)
    assert np.bincount([index for index, _ in batch], minlength=4).tolist() == [1, 3, 1, 2]
    assert len({position for _, position in batch}) == 7  # every draw gets its own augmentation


def test_loss_at_input_size_sees_boundaries_that_shrunk_labels_lose():
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, 9:] = 1                                   # the boundary falls inside a logit cell of 8 px
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 0, :, 0] = 10.0                              # the left cell says background,
    logits[:, 1, :, 1] = 10.0                              # the right cell class 1
    shrunk = msc_cross_entropy([logits], labels)
    full = msc_cross_entropy([logits], labels, upsample_logits=True)
    assert shrunk < 1e-3 < full                            # 16 px labels: column 8 is wrong, the loss sees it
    expected = F.cross_entropy(F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False), labels)
    assert torch.allclose(full, expected)


def test_aspp_rates_are_configurable():
    model = DeepLab(21, "deeplabv2", "resnet_mini", "batch", 8, (1, 2, 3, 4))
    assert [branch.dilation[0] for branch in model.head.branches] == [1, 2, 3, 4]


def test_segmenter_starts_from_a_cam_checkpoints_backbone(tmp_path):
    torch.manual_seed(0)
    cam = SFCNet(20, "resnet_mini", norm="batch")
    url = str(tmp_path / "final.pt")
    checkpoints.save(url, {"model": cam.state_dict(), "meta": {}})
    segmenter = build_segmenter(TrainSegConfig(backbone="resnet_mini", norm="batch", weights=url), 21)
    assert torch.equal(segmenter.backbone.stage3[0].conv1.weight, cam.backbone.stage3[0].conv1.weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(ResNetBackbone("resnet18"), url)
    with pytest.raises(ValueError, match="'cam' is resolved by the pipeline flow"):
        unresolved_cam_weights("train_seg", "cam")
