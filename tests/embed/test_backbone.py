"""Pretrained backbones from local weight files: torchvision layout, loading, first-layer
adaptation, resizing, errors. The weight files are made here (no hub, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eocausal.embed import EmbeddingError
from eocausal.embed.backbone import (
    BackboneEmbedder,
    VisionTransformer,
    adapt_first_layer,
    build_backbone,
    flops_per_image,
    load_state_dict,
)

from tests.embed.test_rcf import all_valid, textured_chips


def random_weights(arch: str, path, in_channels: int = 3, seed: int = 0, wrap=None):
    torch.manual_seed(seed)
    model = build_backbone(arch, in_channels)
    # Non-trivial batch-norm statistics, so that loading them visibly matters.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    torch.save(wrap(state) if wrap else state, path)
    return model


# torchvision's documented parameter counts (torchvision.models docs, "Params" column).
@pytest.mark.parametrize("arch, params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_and_key_names_match_torchvision(arch, params):
    model = build_backbone(arch)
    assert sum(p.numel() for p in model.parameters()) == params
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.weight", "fc.bias"):
        assert key in keys
    if arch == "resnet18":
        assert len(keys) == 122
    else:
        assert "layer1.0.downsample.0.weight" in keys and "layer3.5.conv3.weight" in keys


def test_vit_b_16_layout_matches_torchvision():
    model = build_backbone("vit_b_16")
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    state = model.state_dict()
    assert state["encoder.pos_embedding"].shape == (1, 197, 768)
    assert state["class_token"].shape == (1, 1, 768)
    for key in ("conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                "encoder.layers.encoder_layer_11.mlp.3.bias", "encoder.ln.weight", "heads.head.weight"):
        assert key in state


def test_resnet18_embeds_as_the_model_does(tmp_path):
    path = tmp_path / "r18.pth"
    model = random_weights("resnet18", path).eval()
    chips = textured_chips(3, bands=3, size=24) * 1000
    valid = all_valid(chips)
    emb = BackboneEmbedder("resnet18", path, device="cpu", dtype="float32", batch_size=2).fit(chips, valid)
    features = emb.transform(chips, valid)
    assert features.shape == (3, 512) and features.dtype == np.float32
    x = (chips - emb.band_mean_[:, None, None]) / emb.band_std_[:, None, None]
    with torch.no_grad():
        expected = model.features(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    # Standardisation uses the chips' own band statistics.
    np.testing.assert_allclose(emb.band_mean_, chips.mean(axis=(0, 2, 3)), rtol=1e-6)


def test_weights_normalisation_replaces_the_study_statistics(tmp_path):
    path = tmp_path / "r18.pth"
    model = random_weights("resnet18", path).eval()
    chips = textured_chips(2, bands=3, size=24) * 1000  # e.g. reflectance x 10,000
    valid = all_valid(chips)
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": 1e-4}
    emb = BackboneEmbedder("resnet18", path, device="cpu", dtype="float32", normalization=imagenet).fit(chips, valid)
    x = (chips * 1e-4 - np.array(imagenet["mean"])[:, None, None]) / np.array(imagenet["std"])[:, None, None]
    with torch.no_grad():
        expected = model.features(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(emb.transform(chips, valid), expected, rtol=1e-4, atol=1e-5)
    assert emb.config()["normalization"] == imagenet  # part of the embeddings' version
    with pytest.raises(EmbeddingError, match="gives 3 band means and stds, the chips have 6 bands"):
        BackboneEmbedder("resnet18", path, normalization=imagenet).fit(*_chips(bands=6))


def test_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path):
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.ckpt"
    random_weights("resnet18", plain, seed=1)
    random_weights("resnet18", wrapped, seed=1,
                   wrap=lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3})
    a, b = load_state_dict(plain), load_state_dict(wrapped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multiband_chips_use_adapted_first_layer(tmp_path):
    path = tmp_path / "r18.pth"
    random_weights("resnet18", path)
    chips = textured_chips(3, bands=6, size=24) * 1000
    valid = all_valid(chips)
    valid[0, :5, :5] = False
    emb = BackboneEmbedder("resnet18", path, device="cpu", dtype="float32").fit(chips, valid)
    rgb = torch.load(path, weights_only=True)["conv1.weight"]
    np.testing.assert_allclose(emb.model_.conv1.weight[:, :3].detach(), rgb * 0.5, rtol=1e-6)
    np.testing.assert_allclose(emb.model_.conv1.weight[:, 3:].detach(), rgb * 0.5, rtol=1e-6)
    features = emb.transform(chips, valid)
    assert features.shape == (3, 512) and np.isfinite(features).all()
    # Nodata pixels enter as 0 (the band mean): what hides under the mask does not matter.
    refilled = chips.copy()
    refilled[0, :, :5, :5] = 1e6
    np.testing.assert_allclose(emb.transform(refilled, valid), features, rtol=1e-5)


def test_adapt_first_layer():
    rgb = torch.randn(8, 3, 7, 7)
    repeated = adapt_first_layer(rgb, 4, None)  # timm's adapt_input_conv: cycle, scale by 3/4
    assert repeated.shape == (8, 4, 7, 7)
    torch.testing.assert_close(repeated[:, :3], rgb * 0.75)
    torch.testing.assert_close(repeated[:, 3], rgb[:, 0] * 0.75)
    # Whole repeats keep the response to a flat image exactly.
    six = adapt_first_layer(rgb, 6, None)
    torch.testing.assert_close(F.conv2d(torch.ones(1, 6, 7, 7), six), F.conv2d(torch.ones(1, 3, 7, 7), rgb))
    mapped = adapt_first_layer(rgb, 5, [4, 2, 0])
    assert torch.equal(mapped[:, 4], rgb[:, 0]) and torch.equal(mapped[:, 0], rgb[:, 2])
    assert torch.equal(mapped[:, [1, 3]], torch.zeros(8, 2, 7, 7))
    same = adapt_first_layer(rgb, 3, None)
    assert same is rgb
    with pytest.raises(EmbeddingError, match="3 distinct band indexes"):
        adapt_first_layer(rgb, 5, [0, 0, 1])
    with pytest.raises(EmbeddingError, match="3 distinct band indexes"):
        adapt_first_layer(rgb, 3, [0, 1, 3])


def test_resize_and_bf16_autocast(tmp_path):
    path = tmp_path / "r18.pth"
    random_weights("resnet18", path)
    chips = textured_chips(3, bands=3, size=20) * 1000
    valid = all_valid(chips)
    fp32 = BackboneEmbedder("resnet18", path, device="cpu", dtype="float32", input_size_px=40).fit(chips, valid)
    bf16 = BackboneEmbedder("resnet18", path, device="cpu", dtype="bfloat16", input_size_px=40).fit(chips, valid)
    a, b = fp32.transform(chips, valid), bf16.transform(chips, valid)
    native = BackboneEmbedder("resnet18", path, device="cpu", dtype="float32").fit(chips, valid)
    assert not np.allclose(native.transform(chips, valid), a)  # the resize changed the input
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 3e-2  # bf16 autocast: same features, coarser
    assert not np.array_equal(a, b)


def test_small_vit_resizes_its_position_embedding():
    torch.manual_seed(0)
    vit = VisionTransformer(patch=8, layers=2, heads=2, dim=16, hidden=32, image_size=32).eval()
    with torch.no_grad():
        at_trained = vit.features(torch.randn(2, 3, 32, 32))
        larger = vit.features(torch.randn(2, 3, 48, 48))
        # At the trained size nothing is interpolated.
        assert torch.equal(vit._positions(4), vit.encoder.pos_embedding)
    assert at_trained.shape == larger.shape == (2, 16)
    with pytest.raises(EmbeddingError, match="multiple of 8"):
        vit.features(torch.randn(1, 3, 30, 30))


def test_flop_count_of_resnet18_at_224_matches_torchvision():
    # torchvision lists ResNet-18 at 1.81 GFLOPS (multiply-adds) at 224 px; we count 2 per MAC.
    flops = flops_per_image(build_backbone("resnet18"), 3, 224)
    assert abs(flops / 2e9 - 1.81) < 0.02


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EmbeddingError, match="weights file not found.*never downloaded"):
        BackboneEmbedder("resnet18", tmp_path / "nope.pth").fit(*_chips())


def test_wrong_architecture_names_the_mismatch_and_guesses(tmp_path):
    path = tmp_path / "r50.pth"
    random_weights("resnet50", path)
    with pytest.raises(EmbeddingError, match=r"do not match resnet18.*looks like resnet50"):
        BackboneEmbedder("resnet18", path).fit(*_chips())


def test_shape_mismatch_is_reported(tmp_path):
    path = tmp_path / "bad.pth"
    model = build_backbone("resnet18")
    state = model.state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 5, 5)
    torch.save(state, path)
    with pytest.raises(EmbeddingError, match=r"shape mismatches 1: layer3\.0\.conv1\.weight"):
        BackboneEmbedder("resnet18", path).fit(*_chips())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(build_backbone("resnet18"), path)  # a whole pickled module, not a state_dict
    with pytest.raises(EmbeddingError, match="weights_only=True"):
        BackboneEmbedder("resnet18", path).fit(*_chips())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EmbeddingError, match="could not read"):
        BackboneEmbedder("resnet18", junk).fit(*_chips())


def test_bad_settings():
    with pytest.raises(EmbeddingError, match="unknown backbone"):
        BackboneEmbedder("resnet9", "w.pth")
    with pytest.raises(EmbeddingError, match="weights file"):
        BackboneEmbedder("resnet18", None)
    with pytest.raises(EmbeddingError, match="not fitted"):
        next(BackboneEmbedder("resnet18", "w.pth").transform_stream([_chips()]))


def _chips(bands=3):
    chips = textured_chips(2, bands=bands, size=16)
    return chips, all_valid(chips)
