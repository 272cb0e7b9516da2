"""Real datasets, synthetic-data reader, partitioners and feature transforms."""

from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, get_spec
from gptfl_ray.data.registry import load_dataset

__all__ = ["ArrayDataset", "DatasetSpec", "Splits", "get_spec", "load_dataset"]
