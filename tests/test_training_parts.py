"""Image bank, class weights, augmentation, sampler and optimiser of CAM training."""
import numpy as np
import pytest
import torch
from PIL import Image

from models.class_weights import distribution_weights
from models.image_bank import ImageBank
from models.optim import poly_sgd
from storage.datasets.cam_training import EpochBatchSampler
from storage.datasets.catalog import VOC_CLASSES
from storage.transforms import augment_for_cam_training, random_crop
from tests.golden_data import load_golden


def test_bank_keeps_most_recent_image_per_class_and_samples_reproducibly():
    bank = ImageBank(num_classes=3, crop=4, n_resample=4, seed=1)
    images = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 4, 4)
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0]]).float()
    bank.update(images, torch.ones(3, 1, 4, 4), labels)
    assert bank.images[0, 0, 0, 0] == 1 and bank.images[1, 0, 0, 0] == 2
    assert bank.filled.tolist() == [True, True, False]
    assert bank.labels[2].sum() == 0 and bank.images[2].abs().sum() == 0
    state = bank.state_dict()
    first = bank.sample()
    bank.load_state_dict(state)
    again = bank.sample()
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_bank_skip_empty_never_draws_unfilled_slots():
    bank = ImageBank(num_classes=5, crop=2, n_resample=50, skip_empty=True)
    bank.update(torch.ones(1, 3, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([[0, 0, 1, 0, 0]]).float())
    _, _, labels = bank.sample()
    assert (labels[:, 2] == 1).all()


def test_extend_batch_appends_n_resample():
    bank = ImageBank(num_classes=3, crop=4, n_resample=2)
    out = bank.extend_batch(torch.rand(4, 3, 4, 4), torch.ones(4, 1, 4, 4), torch.eye(3)[[0, 1, 2, 0]])
    assert [t.shape[0] for t in out] == [6, 6, 6]


def test_bank_rejects_checkpoint_of_other_class_set():
    with pytest.raises(ValueError, match="another class set"):
        ImageBank(3, 4).load_state_dict(ImageBank(4, 4).state_dict())


def test_count_weights_follow_recipe_a():
    counts = np.array([100, 10, 1000])
    w = distribution_weights("counts", ["a", "b", "c"], counts, iters_per_epoch=10, n_resample=4)
    r = 10 * 4 * 3 / 3
    expected = 1 / (counts + r)
    np.testing.assert_allclose(w, expected / expected.mean(), rtol=1e-6)
    assert distribution_weights("uniform", ["a", "b"], counts[:2], 1, 1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="needs the 20 VOC classes"):
        distribution_weights("voc", ["a", "b"], counts[:2], 1, 1)


def test_voc_weights_are_the_reference_class_weights():
    """The 20 weights the reference's training loop applied (tests/golden/sfc_losses.npz, by VOC class index); the
    counts and schedule arguments do not enter the voc table."""
    reference = load_golden("sfc_losses")["class_weights"]
    voc = distribution_weights("voc", VOC_CLASSES[1:], np.zeros(20), 1, 1)
    np.testing.assert_allclose(voc, reference, rtol=1e-6)
    assert voc.dtype == np.float32 and voc.argmax() == VOC_CLASSES.index("cow") - 1


def test_random_crop_pads_small_images_with_valid_mask():
    rng = np.random.default_rng(0)
    crop, valid = random_crop(np.ones((10, 40, 3), np.float32), 32, rng)
    assert crop.shape == (32, 32, 3) and valid.sum() == 10 * 32
    assert np.array_equal(crop[..., 0] == 1, valid == 1)


def test_augmentation_is_deterministic_per_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a = augment_for_cam_training(image, 64, (40, 80), np.random.default_rng([1, 2, 3]))
    b = augment_for_cam_training(image, 64, (40, 80), np.random.default_rng([1, 2, 3]))
    assert a[0].shape == (3, 64, 64) and a[1].shape == (1, 64, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_sampler_resumes_mid_epoch_with_same_batches():
    full = list(EpochBatchSampler(10, 3, seed=5, total_steps=7))
    assert len(full) == 7 and all(len(batch) == 3 for batch in full)
    assert list(EpochBatchSampler(10, 3, seed=5, total_steps=7, start_step=4)) == full[4:]
    epoch0 = [i for batch in full[:3] for i, _ in batch]
    assert len(set(epoch0)) == 9


def test_poly_schedule_and_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt, sched = poly_sgd(([a], [b]), lr=0.1, new_layer_lr_mult=10, weight_decay=1e-4, momentum=1e-4,
                          max_steps=10, power=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    for _ in range(5):
        opt.step()
        sched.step()
    assert abs(opt.param_groups[0]["lr"] - 0.1 * 0.5 ** 0.9) < 1e-9
    assert opt.param_groups[0]["momentum"] == 1e-4


def test_corrupted_step_checkpoint_is_set_aside_and_an_older_one_used(tmp_path, caplog):
    from storage import checkpoints
    from tasks.engine.resume import latest_training_state

    folder = str(tmp_path / "checkpoints")
    for step in (2, 4):
        checkpoints.save(checkpoints.step_url(folder, step), {"step": step, "config_hash": "h"})
    newest = checkpoints.step_url(folder, 4)
    with open(newest, "r+b") as handle:
        handle.truncate(20)
    state = latest_training_state(folder, "h")
    assert state["step"] == 2 and "not a readable torch checkpoint" in caplog.text
    assert [s for s, _ in checkpoints.step_checkpoints(folder)] == [2] and (tmp_path / "checkpoints" /
                                                                          "step_0000004.pt.corrupt").exists()
