"""VBench-style video metrics: temporal flickering against a hand-computed value, the consistency
formula, and the pluggable feature extractors (a tiny random DINO-style ViT saved locally)."""

import numpy as np
import pytest

from vchitect.eval.metrics import (consistency, flicker_mae, load_feature_extractor, temporal_flickering,
                                   video_metrics)


def test_temporal_flickering_matches_a_hand_computed_value():
    # 3 frames of 2×2 pixels: frame 1 all 10, frame 2 all 30, frame 3 half 30 / half 90.
    v = np.zeros((3, 2, 2, 3), np.uint8)
    v[0] = 10
    v[1] = 30
    v[2, 0] = 30
    v[2, 1] = 90
    # |f2 − f1| = 20 everywhere; |f3 − f2| = 0 on one row, 60 on the other → 30; mean = (20 + 30) / 2 = 25
    assert flicker_mae(v) == pytest.approx(25.0)
    static = np.full((4, 2, 2, 3), 7, np.uint8)
    # two videos: MAE 25 and 0 → mean 12.5 → (255 − 12.5) / 255
    assert temporal_flickering([v, static]) == pytest.approx((255 - 12.5) / 255)
    assert temporal_flickering([static]) == 1.0


def test_consistency_formula():
    # d1 = e1, d2 = e2, d3 = e1 → t=2: ½(0 + 0) = 0; t=3: ½(1 + 0) = ½ → mean ¼
    f = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert consistency(f) == pytest.approx(0.25)
    assert consistency(np.ones((5, 4))) == pytest.approx(1.0)


def test_pixel_fallback_and_metrics_of_a_moving_square():
    v = np.full((8, 16, 16, 3), 240, np.uint8)
    for t in range(8):
        v[t, 6:10, t:t + 4] = (220, 30, 30)
    m = video_metrics([v, np.repeat(v[:1], 8, axis=0)])
    assert m["subject_features"] == "pixels" and m["videos"] == 2
    assert 0.5 < m["subject_consistency"] < 1.0 and 0.9 < m["temporal_flickering"] < 1.0


def test_dino_extractor_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(cfg).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    name, fn = load_feature_extractor(f"dino:{tmp_path}")
    feats = fn(np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8))
    assert name == "dino" and feats.shape == (3, 32)
    with pytest.raises(ValueError, match="dino:PATH"):
        load_feature_extractor("resnet:/x")
