"""ResNet-18 recipe for ``stagewatch train --recipe resnet18``: torchvision's ResNet-18 on your own images.

This is for people with a GPU and an image classification data set in folders: CIFAR-10, ImageNet or any
``ImageFolder`` root laid out as ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (or
``ROOT/test/...``). The model starts from random weights (nothing is downloaded), and images of 64 px or less
get the CIFAR stem (see :func:`build_model`). It needs the ``vision`` extra (torchvision, and a torch of the
same release: ``pip install torch torchvision`` as a pair, then ``pip install 'stagewatch[vision]'``).

CIFAR-10 into folders, once, with torchvision (the only step that downloads anything)::

    from pathlib import Path
    from torchvision.datasets import CIFAR10

    for split, train in (("train", True), ("test", False)):
        data = CIFAR10("/data/cifar10-raw", train=train, download=True)
        for i, (image, label) in enumerate(data):
            folder = Path("/data/cifar10", split, data.classes[label])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:05d}.png")

then ``stagewatch train --recipe resnet18 --data /data/cifar10 --device cuda --schedule step --epochs 90``.

Here (CPU-only test machines, no data sets) it is tested with ``--fake-data N``: torchvision's ``FakeData``
random images with random labels, which checks the whole pipeline (loading, augmentation, the model, the
loop, the metrics on the server) but has nothing to learn; plus a tiny ImageFolder written by the test.
See ``tests/test_recipe_vision.py``, which builds the separate ``.venv-vision`` environment (``make
vision-venv``) because torchvision must match its torch release exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.models import resnet18

from trainer.loop import Task

__all__ = ["FAKE_NUM_CLASSES", "SMALL_IMAGE_MAX", "build_model", "make_task", "resolve_device"]

SMALL_IMAGE_MAX = 64  # images up to this side get the CIFAR stem and CIFAR-style augmentation
FAKE_NUM_CLASSES = 10
FAKE_TEST_FRACTION = 8  # --fake-data N keeps N // 8 images (at least 1) as its test split
TEST_SPLITS = ("val", "test")
# ImageNet channel statistics: the usual choice for natural images, and within a few percent of CIFAR-10's own.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def resolve_device(device: str) -> torch.device:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``; an explicit CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)  # RuntimeError on a malformed name
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return resolved


def build_model(num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 with random weights and ``num_classes`` outputs.

    For small images (<= 64 px) the stem is the usual CIFAR one: a 3x3 stride-1 convolution and no max-pool.
    The ImageNet stem (7x7 stride-2 convolution, then a stride-2 max-pool) shrinks the input 4x before the
    first residual block, so a 32 px image would reach the last stage as 1x1 and lose most of its spatial
    detail; with the CIFAR stem the residual stages see 32, 16, 8 and 4 px, as in He et al.'s CIFAR setups.
    """
    model: nn.Module = resnet18(weights=None, num_classes=num_classes)
    if image_size <= SMALL_IMAGE_MAX:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
        model.maxpool = nn.Identity()
    return model


def _transforms(image_size: int) -> tuple[Any, Any]:
    """(train, eval) transforms: the standard augmentation for the image size, then tensor and normalisation."""
    normalise = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    if image_size <= SMALL_IMAGE_MAX:
        # CIFAR style: images are (resized to) the target size, then a random crop with 1/8 padding and a flip.
        fit = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        train = transforms.Compose(
            [
                *fit,
                transforms.RandomCrop(image_size, padding=max(1, image_size // 8)),
                transforms.RandomHorizontalFlip(),
                *normalise,
            ]
        )
        return train, transforms.Compose([*fit, *normalise])
    # ImageNet style: a random-resized crop and a flip for training; resize to 8/7 of the side and centre-crop.
    train = transforms.Compose(
        [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalise]
    )
    evaluation = transforms.Compose(
        [transforms.Resize(round(image_size * 8 / 7)), transforms.CenterCrop(image_size), *normalise]
    )
    return train, evaluation


def _image_folder(root: Path, split: str, transform: Any) -> Any:
    try:
        return datasets.ImageFolder(str(root / split), transform=transform)
    except FileNotFoundError as exc:  # no class folders, or no images in them: say which split
        raise ValueError(f"--data {root}: {split}/: {exc}") from exc


def _image_folders(
    root: Path, train_transform: Any, eval_transform: Any
) -> tuple[Dataset[Any], Dataset[Any], str, int, int, int]:
    """The train and val/test ImageFolders of ``root``, the name of the test split, the number of classes and
    the sizes of the two splits."""
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such folder")
    if not (root / "train").is_dir():
        raise ValueError(f"--data {root}: no train/ folder (expected {root}/train/<class>/<image>)")
    split = next((name for name in TEST_SPLITS if (root / name).is_dir()), None)
    if split is None:
        raise ValueError(f"--data {root}: no val/ or test/ folder (expected {root}/val/<class>/<image>)")
    train = _image_folder(root, "train", train_transform)
    test = _image_folder(root, split, eval_transform)
    if list(train.classes) != list(test.classes):
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ValueError(
            f"--data {root}: train/ and {split}/ have different class folders "
            f"(only in train/: {only_train or 'none'}; only in {split}/: {only_test or 'none'})"
        )
    return train, test, split, len(train.classes), len(train), len(test)


def make_task(
    *,
    data: str | Path | None = None,
    fake_images: int | None = None,
    image_size: int = 32,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
) -> Task:
    """The :class:`trainer.loop.Task` of ``stagewatch train --recipe resnet18``.

    Exactly one of ``data`` (an ImageFolder root with ``train/`` and ``val/`` or ``test/``) and
    ``fake_images`` (that many ``FakeData`` images, ``1/8`` of them, at least one, kept for testing) is
    given. ``seed`` sets the initial weights, the shuffling and the augmentation; ``workers`` DataLoader
    processes load the images; ``batches(epoch)`` yields the minibatches on ``device``. Bad arguments and
    bad folders raise ``ValueError`` (or ``OSError`` from torchvision) with a one-line message.
    """
    if (data is None) == (fake_images is None):
        raise ValueError("give exactly one of --data DIR and --fake-data N")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: full batch is not supported by resnet18; give a size >= 1")
    if image_size < 8:
        raise ValueError(f"--image-size {image_size}: must be at least 8")
    if workers < 0:
        raise ValueError(f"--workers {workers}: must be >= 0")
    target = resolve_device(device)

    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    train_transform, eval_transform = _transforms(image_size)
    train_set: Dataset[Any]
    test_set: Dataset[Any]
    if fake_images is not None:
        if fake_images < 2:
            raise ValueError(f"--fake-data {fake_images}: needs at least 2 images (a train and a test split)")
        num_test = max(1, fake_images // FAKE_TEST_FRACTION)
        num_train = fake_images - num_test
        shape = (3, image_size, image_size)
        # Image i of a FakeData is drawn from seed i + random_offset: the test split continues where train ends.
        train_set = datasets.FakeData(
            size=num_train, image_size=shape, num_classes=FAKE_NUM_CLASSES, transform=train_transform
        )
        test_set = datasets.FakeData(
            size=num_test,
            image_size=shape,
            num_classes=FAKE_NUM_CLASSES,
            transform=eval_transform,
            random_offset=num_train,
        )
        num_classes = FAKE_NUM_CLASSES
        source = f"FakeData({fake_images})"
        test_split = "fake"
    else:
        assert data is not None
        root = Path(data).expanduser().resolve()
        train_set, test_set, test_split, num_classes, num_train, num_test = _image_folders(
            root, train_transform, eval_transform
        )
        source = str(root)

    model = build_model(num_classes, image_size).to(target)
    on_cuda = target.type == "cuda"
    loader_options: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": on_cuda,
        "persistent_workers": workers > 0,
    }
    train_loader: DataLoader[Any] = DataLoader(
        train_set, shuffle=True, generator=torch.Generator().manual_seed(seed), **loader_options
    )
    test_loader: DataLoader[Any] = DataLoader(test_set, shuffle=False, **loader_options)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ARG001 - fixed signature
        for x, y in train_loader:
            yield x.to(target, non_blocking=True), y.to(target, non_blocking=True)

    def evaluate(net: nn.Module) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over the test split."""
        net.eval()
        loss_sum = 0.0
        correct = 0
        seen = 0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(target, non_blocking=True), y.to(target, non_blocking=True)
                logits = net(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                seen += int(y.shape[0])
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    return Task(
        model=model,
        batches=batches,
        steps_per_epoch=math.ceil(num_train / batch_size),
        evaluate=evaluate,
        description={
            "model": "resnet18",
            "data": source,
            "test_split": test_split,
            "num_train": num_train,
            "num_test": num_test,
            "num_classes": num_classes,
            "image_size": image_size,
            "stem": "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet",
            "device": str(target),
            "workers": workers,
        },
    )
