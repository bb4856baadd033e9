"""Datasets for the runner, and a sampler whose order is a pure function of (seed, epoch)."""

from neuralode.data.images import DataError, image_datasets
from neuralode.data.sampler import EpochSampler

__all__ = ["DataError", "image_datasets", "EpochSampler"]
