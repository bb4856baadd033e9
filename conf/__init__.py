"""Hydra configs, installed as the package ``neuralode.conf`` so the wheel ships them."""
