"""Golden parity of the SFC network and losses with the reference implementation (select with -k golden)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.losses import sfc_step_losses
from models.sfc import SFCNet
from tests.golden_data import ATOL, RTOL, golden_model, load_golden


@pytest.fixture(scope="module")
def model():
    torch.set_flush_denormal(True)
    return golden_model()


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=RTOL, atol=atol)


def test_golden_forward(model):
    data = load_golden("sfc_forward")
    with torch.no_grad():
        out = model(torch.from_numpy(data["x"]), torch.from_numpy(data["valid_mask"]))
    assert_close(out.score, data["score"])
    assert_close(out.raw_cam, data["raw_cam"], atol=5e-5)
    assert_close(out.cam, data["cam"])
    assert_close(out.proto_cam, data["proto_cam"])


def test_golden_losses_and_gradients(model):
    data = load_golden("sfc_losses")
    model.zero_grad()
    losses = sfc_step_losses(
        model,
        torch.from_numpy(data["img"]),
        torch.from_numpy(data["valid_mask"]),
        torch.from_numpy(data["labels"]),
        torch.from_numpy(data["class_weights"]),
    )
    losses.total.backward()
    assert_close(losses.cls, data["loss_cls"])
    assert_close(losses.proto, data["loss_proto"])
    assert_close(losses.scale, data["loss_scale"])
    assert_close(model.classifier.weight.grad, data["grad_classifier"])
    assert_close(model.side3.weight.grad, data["grad_side3"])


@pytest.mark.parametrize("scale", ["1.0", "0.5", "1.5", "2.0"])
def test_golden_inference_per_scale(model, scale):
    data = load_golden("sfc_inference")
    label = torch.cat([torch.ones(1), torch.from_numpy(data["labels"])])
    with torch.no_grad():
        out = model.forward_cams(torch.from_numpy(data[f"input_s{scale}"]), label)
    assert_close(out.cam, data[f"cam_s{scale}"])
    assert_close(out.proto_cam, data[f"proto_s{scale}"])


def test_golden_inference_fused(model):
    from models.cam_inference import DEFAULT_SCALES, multiscale_cams

    data = load_golden("sfc_inference")
    pairs = [torch.from_numpy(data[f"input_s{s}"]) for s in DEFAULT_SCALES]
    keys, proto, cam = multiscale_cams(model, pairs, torch.from_numpy(data["labels"]), data["cam"].shape[1:])
    assert keys.tolist() == data["keys"].tolist()
    assert_close(proto, data["proto_cam"])
    assert_close(cam, data["cam"])


def test_golden_inference_with_folded_batchnorm():
    from models.backbone import fold_batchnorm

    data = load_golden("sfc_inference")
    model = golden_model().eval()
    fold_batchnorm(model.backbone)
    label = torch.cat([torch.ones(1), torch.from_numpy(data["labels"])])
    with torch.no_grad():
        out = model.forward_cams(torch.from_numpy(data["input_s1.0"]), label)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert_close(out.cam, data["cam_s1.0"])
    assert_close(out.proto_cam, data["proto_s1.0"])


def test_new_layers_keep_pytorch_default_initialisation():
    """The reference never re-initialises its new layers: PyTorch's default conv init, U(-1/sqrt(fan_in),
    1/sqrt(fan_in)), whose standard deviation is 1/sqrt(3 fan_in) (kaiming_normal would give sqrt(2/fan_in))."""
    torch.manual_seed(0)
    model = SFCNet(20, "resnet50")
    for layer in model.new_layers():
        weight = layer.weight.detach()
        fan_in = weight.shape[1]
        bound = 1 / fan_in ** 0.5
        assert weight.abs().max() <= bound
        assert abs(weight.std().item() - bound / 3 ** 0.5) < 0.05 * bound
