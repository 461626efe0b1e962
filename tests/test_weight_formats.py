"""Weights files as published: deeplab-pytorch's DeepLabV2 checkpoints (its COCO-pretrained initialisation) read
into our segmenter, torchvision files checked by the SHA-256 in their names, and every wrong file a one-line error.

The deeplab-pytorch files come from tests/deeplab_pytorch_files.py (its layout written independently of
models/deeplab_pytorch.py); each block's output is compared with the same computation done by hand.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from models.backbone import CAFFE_MEAN, IMAGENET_MEAN, IMAGENET_STD, ResNetBackbone
from models.deeplab import DeepLab
from storage import checkpoints
from storage.errors import CheckpointError
from tasks.runtime.weights import load_segmenter_weights
from tasks.train_seg import TrainSegConfig, build_segmenter
from tests.deeplab_pytorch_files import deeplab_pytorch_state


def _conv_bn_relu(x: torch.Tensor, state: dict, prefix: str, stride: int = 1, padding: int = 0,
                  dilation: int = 1, relu: bool = True) -> torch.Tensor:
    """deeplab-pytorch's ``_ConvBnReLU`` in eval mode, by hand."""
    y = F.conv2d(x, state[f"{prefix}.conv.weight"], None, stride, padding, dilation)
    y = F.batch_norm(y, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
                     state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], False, 0.0, 1e-5)
    return F.relu(y) if relu else y


def _caffe_input(rgb: torch.Tensor) -> torch.Tensor:
    """deeplab-pytorch's input: BGR on 0..255 minus the caffe mean."""
    return (255 * rgb - torch.tensor(CAFFE_MEAN).view(1, 3, 1, 1)).flip(1)


def _ours(rgb: torch.Tensor) -> torch.Tensor:
    """The pipeline's input: RGB in [0, 1] normalised by ImageNet mean and std."""
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def coco_init(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    state = deeplab_pytorch_state()
    url = str(tmp_path_factory.mktemp("weights") / "deeplabv1_resnet101-coco.pth")
    torch.save(state, url)
    return url, state


@pytest.fixture(scope="module")
def segmenter(coco_init: tuple[str, dict]) -> DeepLab:
    cfg = TrainSegConfig(weights=coco_init[0], weights_format="deeplab-pytorch")
    return build_segmenter(cfg, 21).eval()


@torch.no_grad()
def test_the_stem_equals_deeplab_pytorchs_on_caffe_input(coco_init: tuple[str, dict], segmenter: DeepLab) -> None:
    state = coco_init[1]
    rgb = torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    by_hand = F.max_pool2d(_conv_bn_relu(_caffe_input(rgb), state, "layer1.conv1", 2, 3), 3, 2, 1, ceil_mode=True)
    backbone = segmenter.backbone
    ours = backbone.stage0(backbone.input_adapter(_ours(rgb)))
    assert ours.shape == by_hand.shape == (1, 64, 10, 12)  # ceil_mode: 19x23 -> 10x12
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(("stage", "layer", "stride", "dilation"), [(1, 2, 1, 1), (2, 3, 2, 1), (3, 4, 1, 2),
                                                                    (4, 5, 1, 4)])
def test_each_layers_first_block_equals_deeplab_pytorchs(coco_init: tuple[str, dict], segmenter: DeepLab,
                                                          stage: int, layer: int, stride: int, dilation: int) -> None:
    """The first Bottleneck of each layer, stride on the 1x1 ``reduce`` (caffe), layer4/5 dilated 2/4."""
    state, name = coco_init[1], f"layer{layer}.block1"
    in_ch = state[f"{name}.reduce.conv.weight"].shape[1]
    x = torch.randn(1, in_ch, 11, 13, generator=torch.Generator().manual_seed(layer))
    h = _conv_bn_relu(x, state, f"{name}.reduce", stride)
    h = _conv_bn_relu(h, state, f"{name}.conv3x3", 1, dilation, dilation)
    h = _conv_bn_relu(h, state, f"{name}.increase", relu=False)
    by_hand = F.relu(h + _conv_bn_relu(x, state, f"{name}.shortcut", stride, relu=False))
    ours = segmenter.backbone.stages[stage][0](x)
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=1e-4)


def test_every_backbone_tensor_lands_and_a_foreign_head_is_not_used(coco_init: tuple[str, dict],
                                                                    segmenter: DeepLab) -> None:
    state, ours = coco_init[1], segmenter.backbone.state_dict()
    assert torch.equal(ours["stage3.22.conv2.weight"], state["layer4.block23.conv3x3.conv.weight"])
    assert torch.equal(ours["stage4.0.downsample.1.running_var"], state["layer5.block1.shortcut.bn.running_var"])
    assert torch.equal(ours["stage0.1.bias"], state["layer1.conv1.bn.bias"])
    loaded = sum(1 for k in ours if not k.endswith("num_batches_tracked"))
    assert loaded == sum(1 for k in state if not k.endswith("num_batches_tracked") and not k.startswith("aspp"))
    assert segmenter.head.branches[0].weight.shape == (21, 2048, 3, 3)  # 91 COCO classes: not used
    assert segmenter.head.branches[0].weight.std() < 0.02


def test_a_fitting_head_and_the_msc_prefix_load(tmp_path) -> None:
    state = deeplab_pytorch_state((3, 4, 6, 3), n_classes=21, prefix="base.")
    url = str(tmp_path / "deeplabv2_resnet50_msc-voc.pth")
    torch.save(state, url)
    model = DeepLab(21, backbone="resnet50", style="caffe")
    summary = load_segmenter_weights(model, url, "deeplab-pytorch")
    assert "backbone and ASPP head" in summary
    assert torch.equal(model.head.branches[3].weight, state["base.aspp.c3.weight"])
    assert torch.equal(model.backbone.stage3[5].conv3.weight, state["base.layer4.block6.increase.conv.weight"])


def test_a_trained_caffe_segmenter_reloads_for_evaluation(tmp_path, segmenter: DeepLab) -> None:
    from tasks.eval_seg import load_segmenter

    names = [f"c{i}" for i in range(21)]
    url = str(tmp_path / "final.pt")
    meta = {"kind": "segmenter", "arch": "deeplabv2", "backbone": "resnet101", "norm": "frozen",
            "output_stride": 8, "aspp_rates": [6, 12, 18, 24], "style": "caffe", "class_names": names}
    checkpoints.save(url, {"model": segmenter.state_dict(), "meta": meta})
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        torch.testing.assert_close(load_segmenter(url, names)(x), segmenter(x))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer3.block2.")}, "missing keys (layer3.block2"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer1.")}, "lacks its keys"),
    (lambda s: s | {"layer2.block1.reduce.conv.weight": torch.zeros(64, 64, 3, 3)}, "do not fit resnet101"),
])
def test_a_partial_or_misshapen_file_names_what_is_wrong(tmp_path, coco_init: tuple[str, dict], change,
                                                         message: str) -> None:
    url = str(tmp_path / "broken.pth")
    torch.save(change(coco_init[1]), url)
    with pytest.raises(CheckpointError, match=r"broken\.pth") as err:
        load_segmenter_weights(DeepLab(21, style="caffe"), url, "deeplab-pytorch")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_resnet101_file_for_a_resnet50_backbone_says_so(tmp_path, coco_init: tuple[str, dict]) -> None:
    url = str(tmp_path / "coco.pth")
    torch.save(coco_init[1], url)
    with pytest.raises(CheckpointError, match=r"of resnet101 that does not fit resnet50: 255 unexpected keys "
                                              r"\(layer4\.block7"):
        load_segmenter_weights(DeepLab(21, backbone="resnet50", style="caffe"), url, "deeplab-pytorch")


def test_a_caffe_file_where_torchvision_is_expected_is_one_line(coco_init: tuple[str, dict]) -> None:
    with pytest.raises(CheckpointError, match="set weights_format: deeplab-pytorch"):
        build_segmenter(TrainSegConfig(weights=coco_init[0]), 21)
    with pytest.raises(CheckpointError, match="where a torchvision-format ResNet is expected"):
        from tasks.runtime.weights import load_backbone_weights
        load_backbone_weights(ResNetBackbone("resnet101"), coco_init[0])


def test_a_torchvision_file_given_as_deeplab_pytorch_is_one_line(tmp_path) -> None:
    url = str(tmp_path / "tv.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, url)
    with pytest.raises(CheckpointError, match="needs weights_format: torchvision"):
        load_segmenter_weights(DeepLab(21, style="caffe"), url, "deeplab-pytorch")


def test_the_caffe_format_needs_a_bottleneck_backbone_and_a_file() -> None:
    with pytest.raises(ValueError, match="needs backbone resnet101"):
        TrainSegConfig(backbone="resnet18", weights="w.pth", weights_format="deeplab-pytorch")
    with pytest.raises(ValueError, match="needs weights"):
        TrainSegConfig(weights=None, weights_format="deeplab-pytorch")


def test_a_truncated_or_altered_published_file_is_caught_by_its_name(tmp_path) -> None:
    buffer = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(2)}, buffer)
    data = buffer.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"resnet-{digest[:8]}.pth"
    good.write_bytes(data)
    assert set(checkpoints.load_pretrained(str(good))) == {"conv1.weight"}
    truncated = tmp_path / f"resnet-{digest[:8]}.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"differs from the .* in its name .*truncated or altered"):
        checkpoints.load_pretrained(str(truncated))
    unnamed = tmp_path / "resnet.pth"
    unnamed.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        checkpoints.load_pretrained(str(unnamed))
