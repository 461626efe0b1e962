"""Dense CRF and IR labels reproduce the reference's golden outputs exactly."""
import numpy as np
import pytest

from models.crf import DEEPLAB_CRF, CrfParams, crf_from_labels, crf_from_probs
from models.ir_labels import ir_label
from tests.golden_data import load_golden


def test_crf_from_labels_matches_golden():
    g = load_golden("crf")
    out = crf_from_labels(g["image"], g["labels"], int(g["n_labels"]), float(g["gt_prob"]),
                          CrfParams(iterations=int(g["t"])))
    np.testing.assert_array_equal(out, g["out"])


def test_ir_label_matches_golden():
    g = load_golden("ir_label")
    out = ir_label(g["image"], g["keys"], g["cam"].copy(), g["proto_cam"].copy(), float(g["proto_weight"]),
                   float(g["bg_scale"]))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, g["ir_label"])


def test_ir_label_does_not_modify_its_inputs():
    g = load_golden("ir_label")
    cam = g["cam"].copy()
    ir_label(g["image"], g["keys"], cam, g["proto_cam"], 0.7, 0.5)
    np.testing.assert_array_equal(cam, g["cam"])


def test_crf_from_probs_sharpens_towards_image_edges():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255
    probs = np.full((2, 40, 40), 0.5, np.float32)
    probs[0, :, :18] = 0.9
    probs[1, :, :18] = 0.1
    probs[0, :, 22:] = 0.1
    probs[1, :, 22:] = 0.9
    out = crf_from_probs(image, probs, DEEPLAB_CRF)
    assert out.shape == probs.shape
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-4)
    labels = out.argmax(axis=0)
    assert (labels[:, :20] == 0).all() and (labels[:, 20:] == 1).all()


def test_bad_crf_inputs_name_the_problem():
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="0..1"):
        crf_from_labels(image, np.full((10, 12), 2), 2)
    with pytest.raises(ValueError, match="image is"):
        crf_from_labels(image, np.zeros((12, 10), np.int64), 2)
    with pytest.raises(ValueError, match="uint8"):
        crf_from_probs(image.astype(np.float32), np.ones((2, 10, 12), np.float32))
    with pytest.raises(ValueError, match="keys"):
        ir_label(image, np.array([0, 3]), np.zeros((3, 10, 12), np.float32), np.zeros((3, 10, 12), np.float32))
