"""Invalid configs raise ValueError naming the field and the allowed values; JSON round-trip."""

import json

import pytest
import torch

from engine.config import ConfigError, LossConfig, ModelConfig, config_from_dict, config_to_dict
from engine.models import build_model


@pytest.mark.parametrize("kwargs, words", [
    ({"xi": 1.5}, ["xi", "[0, 1]"]),
    ({"xi": -0.1}, ["xi", "[0, 1]"]),
    ({"xi": float("nan")}, ["xi"]),
    ({"xi_denominator": "pixels"}, ["xi_denominator", "patches", "feature_map"]),
    ({"num_classes": 0}, ["num_classes"]),
    ({"input_size": (32, -1)}, ["input_size"]),
    ({"input_size": "big"}, ["input_size"]),
    ({"stride_plan": (1, 0, 1, 1)}, ["stride_plan"]),
    ({"patch_kernel": 0}, ["patch_kernel"]),
    ({"timm_output_stride": 4}, ["timm_output_stride", "8, 16 or 32"]),
])
def test_model_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"gamma_max": -0.1}, ["gamma_max", ">= 0"]),
    ({"gamma_max": float("inf")}, ["gamma_max"]),
    ({"ramp_epochs": -1}, ["ramp_epochs"]),
])
def test_loss_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info:
        LossConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    # Names are the registry's to check, when the model is resolved or built.
    ({"backbone": "resnet19"}, ["model.backbone", "resnet18", "vgg11_bn", "small_cnn", "timm:"]),
    ({"backbone": "timm:not_a_model"}, ["timm", "not_a_model"]),
    ({"head": "transformer"}, ["model.head", "loss_attention", "capsule_loss_attention",
                               "plain"]),
    ({"input_size": 8}, ["input_size", "patch kernel"]),                  # smaller than 9x9
    ({"stride_plan": (2, 2, 2, 2)}, ["stride_plan", "no patch fits"]),    # 32 -> 2x2 map
    ({"stride_plan": (1, 1)}, ["stride_plan", "4 entries"]),
    ({"backbone": "vgg11_bn", "stride_plan": (1, 1, 1, 1)}, ["stride_plan", "8 entries"]),
    ({"timm_output_stride": 8}, ["timm_output_stride", "timm"]),
])
def test_build_errors_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as info, torch.device("meta"):
        build_model(ModelConfig(**kwargs))
    for word in words:
        assert word in str(info.value)


def round_trip(cls, cfg):
    """Through JSON text, as config.json and checkpoints store a config."""
    return config_from_dict(cls, json.loads(json.dumps(config_to_dict(cfg))))


def test_json_round_trip_and_unknown_fields():
    cfg = ModelConfig(backbone="small_cnn", input_size=(32, 48), stride_plan=(1, 2, 1),
                      plain_hidden=(64,), xi=0.3)
    assert round_trip(ModelConfig, cfg) == cfg
    assert round_trip(LossConfig, LossConfig(gamma_max=0.5)).gamma_max == 0.5
    with pytest.raises(ConfigError, match="unknown field.*'ksi'"):
        config_from_dict(ModelConfig, {"ksi": 0.1})


def test_resolved_config_records_backbone_defaults():
    model = build_model(ModelConfig(backbone="small_cnn"))
    assert model.config.patch_kernel == 5 and model.config.stride_plan == (1, 2, 1)
    rebuilt = build_model(round_trip(ModelConfig, model.config))
    assert rebuilt.config == model.config
