"""The GPU paths against their CPU / fp32 counterparts: SFC training steps under fp16 autocast + GradScaler +
channels_last, CAM inference on CUDA, DeepLab inference under autocast. CUDA only (``-m cuda``; ``make bench-gpu``
runs them); imports torch, numpy and models/ only, so they run on a bare GPU machine."""
import pytest
import torch

from models.cam_inference import multiscale_cams, prepare_for_inference
from models.deeplab import DeepLab
from models.losses import sfc_step_losses
from models.seg_inference import multiscale_logits
from models.sfc import SFCNet

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on CUDA for the comparisons with the CPU (TF32 would add ~1e-3 relative error)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _batch(size: int = 64, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, 20)
    labels[torch.arange(n), torch.randint(0, 20, (n,), generator=gen)] = 1
    return torch.randn(n, 3, size, size, generator=gen), torch.ones(n, 1, size, size), labels


def sfc_losses_on(device: str, amp: bool) -> dict[str, float]:
    """The three SFC losses of one step of a seeded ResNet-18 SFC network (ordinary BN on batch statistics, which
    keeps a random network's activations in fp16 range), on ``device``, with fp16 autocast + channels_last when
    ``amp``; the step's scaled backward must give finite gradients."""
    torch.manual_seed(0)
    model = SFCNet(20, "resnet18", norm="batch").to(device).train()
    images, valid, labels = (t.to(device) for t in _batch())
    if amp:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 8, enabled=amp)
    with torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16, enabled=amp):
        losses = sfc_step_losses(model, images, valid, labels, torch.ones(20, device=device))
    scaler.scale(losses.total).backward()
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return {key: float(getattr(losses, key).detach()) for key in ("cls", "proto", "scale")}


def test_sfc_step_under_autocast_matches_fp32():
    cpu, fp32, mixed = sfc_losses_on("cpu", False), sfc_losses_on("cuda", False), sfc_losses_on("cuda", True)
    for key in cpu:
        assert fp32[key] == pytest.approx(cpu[key], rel=1e-4, abs=1e-6), key
        assert mixed[key] == pytest.approx(fp32[key], rel=5e-2, abs=1e-3), key


def cams_on(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys, P, K of one 80 x 96 image at scales 1.0 and 0.5 (+ flips) from a seeded ResNet-18 SFC network."""
    torch.manual_seed(0)
    model = prepare_for_inference(SFCNet(20, "resnet18", norm="batch"), torch.device(device))
    image = torch.randn(3, 80, 96, generator=torch.Generator().manual_seed(1))
    pairs = [torch.stack([x, x.flip(-1)]).to(device) for x in
             (image, torch.nn.functional.interpolate(image[None], scale_factor=0.5, mode="bilinear")[0])]
    if device == "cuda":
        pairs = [p.contiguous(memory_format=torch.channels_last) for p in pairs]
    label = torch.zeros(20, device=device)
    label[[3, 14]] = 1
    with torch.no_grad():
        return tuple(t.cpu() for t in multiscale_cams(model, pairs, label, (80, 96)))


def test_cam_inference_on_cuda_equals_cpu():
    (keys_cpu, p_cpu, k_cpu), (keys_gpu, p_gpu, k_gpu) = cams_on("cpu"), cams_on("cuda")
    assert keys_cpu.tolist() == keys_gpu.tolist() == [0, 4, 15]
    assert torch.allclose(p_gpu, p_cpu, atol=1e-3) and torch.allclose(k_gpu, k_cpu, atol=1e-3)


def test_deeplab_inference_under_autocast_agrees_with_fp32():
    torch.manual_seed(0)
    model = DeepLab(21, "deeplabv2", "resnet18", "batch").cuda().eval()
    canvas = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        fp32 = multiscale_logits(model, canvas, (0.5, 1.0))
        with torch.autocast("cuda", dtype=torch.float16):
            mixed = multiscale_logits(model.to(memory_format=torch.channels_last),
                                      canvas.contiguous(memory_format=torch.channels_last), (0.5, 1.0))
    assert mixed.dtype == torch.float32 and mixed.shape == fp32.shape
    assert (mixed.argmax(1) == fp32.argmax(1)).float().mean() > 0.99
