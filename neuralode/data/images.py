"""torchvision MNIST / CIFAR-10 under ``data_dir``, with an offline-friendly error."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

# Files torchvision needs, relative to data_dir; named in the error when missing.
EXPECTED_FILES = {
    "mnist": [f"MNIST/raw/{n}" for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "cifar10": [f"cifar-10-batches-py/{n}" for n in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]],
}


class DataError(RuntimeError):
    """The dataset is missing, could not be downloaded, or its files cannot be read."""


def _missing(name: str, root: Path) -> list[str]:
    return [f for f in EXPECTED_FILES[name] if not (root / f).exists()]


def image_datasets(name: str, data_dir: str | Path, mean: Sequence[float], std: Sequence[float],
                   augment: bool = False, download: bool = True) -> tuple[Dataset, Dataset]:
    """Return (train, test) datasets, downloading into ``data_dir`` if files are missing."""
    from torchvision import datasets, transforms

    if name not in EXPECTED_FILES:
        raise DataError(f"unknown image dataset {name!r}; expected one of {', '.join(EXPECTED_FILES)}")
    root = Path(data_dir).expanduser()
    missing = _missing(name, root)
    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    if missing and download:
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception as e:  # network errors come in many types; all mean the same here
            raise DataError(_missing_message(name, root, missing, f"download failed ({_one_line(e)})")) from None
        missing = _missing(name, root)
    if missing:
        raise DataError(_missing_message(name, root, missing, "dataset.download=false"))

    size = 28 if name == "mnist" else 32
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(([transforms.RandomCrop(size, padding=4)] if augment else []) + normalize)
    test_tf = transforms.Compose(normalize)
    try:  # both read every file here: MNIST parses the idx files, CIFAR-10 checks their MD5 first
        return cls(str(root), train=True, transform=train_tf), cls(str(root), train=False, transform=test_tf)
    except Exception as e:  # torchvision reports damaged files with assorted exception types
        where = (root / EXPECTED_FILES[name][0]).parent.resolve()
        raise DataError(f"{name} files under {where} cannot be read ({type(e).__name__}: {_one_line(e)}); they "
                        f"are damaged: delete them to download afresh (dataset.download=true), or point data_dir at "
                        f"a good copy") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _missing_message(name: str, root: Path, missing: list[str], reason: str) -> str:
    return (f"{name} not found under data_dir={root.resolve()} ({reason}); missing files: {', '.join(missing)}; "
            f"copy them there, or point data_dir at a directory that has them "
            f"(e.g. data_dir=../shared/data/mnist-10k on offline machines)")
