"""Downstream models: ``build_model(name, num_classes, input_shape)``."""

from gptfl_ray.models.registry import MODELS, build_model, count_parameters

__all__ = ["MODELS", "build_model", "count_parameters"]
