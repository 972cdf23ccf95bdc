"""Tests for counting.models: architectures, heads, freezing, optimizer groups and weight loading."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_sample_image

from counting.models import (BACKBONES, CountingModel, build_model, decode_indices, imagenet_weights_path,
                             load_lite0_imagenet, probabilities_from_logits)
from counting.preprocess import normalize, resize_square

IMAGENET_DAISY = 985
IMAGENET_PALACE = 698
TEMPLE_CLASSES = {442: "bell cote", 483: "castle", 663: "monastery", 698: "palace"}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def empty_hub(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def sample_photo(name: str) -> torch.Tensor:
    """A scikit-learn sample photo as a uint8 (1, 3, 224, 224) batch, squashed like the product's images."""
    image = torch.from_numpy(np.array(load_sample_image(name))).permute(2, 0, 1)
    return resize_square(image, 224).unsqueeze(0)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_gives_logits_of_the_head_shape(backbone):
    images = torch.rand(2, 3, 32, 32)
    for head, width in (("classification", 5), ("ordinal", 4)):
        model = build_model(backbone, 5, head=head, weights="none").eval()
        with torch.no_grad():
            logits = model(images)
        assert logits.shape == (2, width)
        probs = model.probabilities(logits)
        assert probs.shape == (2, 5)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
        assert build_model(**model.spec, weights="none").spec == model.spec


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_stages_cover_every_backbone_parameter(backbone):
    model = CountingModel(backbone, 3)
    in_stages = {id(p) for stage in model.stages() for module in stage for p in module.parameters()}
    assert in_stages == {id(p) for p in model.backbone.parameters()}


def test_ordinal_probabilities_are_differences_of_cumulative_sigmoids():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, -3.0]])  # second row is not monotone
    probs = probabilities_from_logits(logits, "ordinal", temperature=2.0)
    above = torch.sigmoid(logits[0] / 2.0)
    expected = torch.stack([1 - above[0], above[0] - above[1], above[1] - above[2], above[2]])
    torch.testing.assert_close(probs[0], expected)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


def test_temperature_divides_classification_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(probabilities_from_logits(logits, "classification", 2.0), (logits / 2).softmax(1))
    with pytest.raises(ValueError, match="temperature"):
        probabilities_from_logits(logits, "classification", 0.0)


def test_ordinal_head_starts_from_a_uniform_prior():
    model = CountingModel("resnet18", 5, head="ordinal")
    torch.nn.init.zeros_(model.head.score.weight)
    probs = model.probabilities(model.eval()(torch.rand(1, 3, 32, 32)))
    torch.testing.assert_close(probs, torch.full((1, 5), 0.2))


def test_decodings_read_the_mode_or_the_nearest_expected_count():
    probabilities = torch.tensor([[0.45, 0.10, 0.45], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.0, 0.0, 1.0]])
    assert decode_indices(probabilities).tolist() == [0, 2, 0, 2]
    assert decode_indices(probabilities, "expectation").tolist() == [1, 2, 0, 2]
    model = build_model("resnet18", 3, weights="none", decoding="expectation")
    assert model.spec["decoding"] == "expectation"
    assert build_model(**model.spec, weights="none").decode(probabilities).tolist() == [1, 2, 0, 2]
    with pytest.raises(ValueError, match="unknown decoding 'median'"):
        decode_indices(probabilities, "median")


def test_unfreeze_head_trains_only_the_head_and_keeps_batch_norm_fixed():
    model = build_model("resnet18", 4, weights="none", unfreeze="head")
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(4, 3, 32, 32))
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


@pytest.mark.parametrize("backbone,unfreeze", [("resnet18", 2), ("tf_efficientnet_lite0", "3"),
                                               ("mobilenet_v3_small", 1)])
def test_unfreeze_n_trains_the_last_n_stages(backbone, unfreeze):
    model = build_model(backbone, 3, weights="none", unfreeze=unfreeze).train()
    stages = model.stages()
    n = int(unfreeze)
    for position, stage in enumerate(stages):
        trainable = position >= len(stages) - n
        for module in stage:
            assert all(p.requires_grad == trainable for p in module.parameters())
            assert module.training == trainable


def test_unfreeze_all_and_invalid_values():
    model = build_model("resnet18", 3, weights="none", unfreeze="all").train()
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.training
    for bad in ("some", 6, -1, True):
        with pytest.raises(ValueError, match="unfreeze"):
            build_model("resnet18", 3, weights="none", unfreeze=bad)


def test_param_groups_split_head_backbone_and_decay():
    model = build_model("resnet18", 3, head="ordinal", weights="none", unfreeze=1)
    groups = {group["name"]: group for group in model.param_groups(0.1, 0.5, 1e-4)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == 0.1 and groups["backbone"]["lr"] == pytest.approx(0.05)
    assert groups["head"]["weight_decay"] == 1e-4 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for p in groups["head_no_decay"]["params"] + groups["backbone_no_decay"]["params"])
    grouped = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(grouped) < len(list(model.parameters()))
    torch.optim.SGD(model.param_groups(0.1, 0.5, 1e-4), lr=0.1)  # accepted as they are
    with pytest.raises(ValueError, match="backbone_lr_mult"):
        model.param_groups(0.1, -1.0, 0.0)


def test_invalid_arguments_name_the_culprit():
    with pytest.raises(ValueError, match="resnet7"):
        build_model("resnet7", 3, weights="none")
    with pytest.raises(ValueError, match="regression"):
        build_model("resnet18", 3, head="regression", weights="none")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 1, weights="none")
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet18", 3, weights="none", dropout=1.5)


def test_missing_torchvision_weights_say_where_to_put_them(empty_hub):
    expected = empty_hub / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    with pytest.raises(FileNotFoundError) as error:
        build_model("resnet18", 3, weights="imagenet")
    assert str(expected) in str(error.value) and "weights=" in str(error.value)


def test_torchvision_weights_are_read_from_the_hub_cache(empty_hub):
    reference = torchvision.models.resnet18()
    path = empty_hub / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    assert imagenet_weights_path("resnet18") == path
    model = build_model("resnet18", 3, weights="imagenet")
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)


def test_full_model_state_dict_round_trip(tmp_path):
    model = build_model("resnet18", 4, head="ordinal", weights="none")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model(**model.spec, weights=str(path))
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(images), model.eval()(images))
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnet18", 4, head="classification", weights=str(path))


def test_backbone_state_dict_loads_with_a_fresh_head(tmp_path):
    source = torchvision.models.resnet18()  # includes the ImageNet classifier `fc`, which is ignored
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", 3, weights=path)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    assert model.head.weight.shape == (3, 512)


def test_bad_weight_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_model("resnet18", 3, weights=str(tmp_path / "nowhere.pt"))
    wrong = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet34.pt"):
        build_model("resnet18", 3, weights=str(wrong))
    with pytest.raises(ValueError, match="resnet34.pt"):
        build_model("tf_efficientnet_lite0", 3, weights=str(wrong))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        build_model("resnet18", 3, weights=str(garbage))


def test_lite0_imagenet_weights_fill_the_counting_backbone():
    reference = load_lite0_imagenet()
    model = build_model("tf_efficientnet_lite0", 5, weights="imagenet")
    assert model.mean == model.std == (0.5, 0.5, 0.5)
    backbone_state = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(backbone_state[key], value)


def test_lite0_imagenet_recognises_a_temple():
    model = load_lite0_imagenet()
    with torch.no_grad():
        probs = model(normalize(sample_photo("china.jpg"), (0.5,) * 3, (0.5,) * 3)).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in TEMPLE_CLASSES
    assert IMAGENET_PALACE in top5


def test_lite0_imagenet_needs_its_own_input_scaling():
    model = load_lite0_imagenet()
    photo = sample_photo("flower.jpg")
    with torch.no_grad():
        right = model(normalize(photo, (0.5,) * 3, (0.5,) * 3)).softmax(1)[0]
        imagenet = model(normalize(photo, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).softmax(1)[0]
    assert right.argmax() == IMAGENET_DAISY
    assert imagenet.argmax() != IMAGENET_DAISY
