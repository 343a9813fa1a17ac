"""The registered data sets, with the facts a long-tailed run needs (classes, n_max, default model)."""

from __future__ import annotations

from functools import partial

from fedlt.data import sources
from fedlt.options import FileListOptions
from fedlt.registry import DATASETS


def _fashion(root=None, **_):
    return sources.load_fashion_mnist(root)


def _cifar(num_classes, root=None, **_):
    return sources.load_cifar(root, num_classes)


def _file_list(num_classes=None, root=None, train_list="train.txt", test_list="test.txt", image_size=None,
               cache=False, cache_dir=None, decode_device="cpu", **_):
    return sources.load_file_list(root, train_list, test_list, image_size, num_classes, cache, cache_dir, decode_device)


# n_max: the head-class count of the long-tailed profile (kaidic/LDAM-DRW ``get_img_num_per_cls``).
FASHION = dict(mean=(0.2860,), std=(0.3530,))
CIFAR10 = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
CIFAR100 = dict(mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

DATASETS.register("fashion_mnist", _fashion, num_classes=10, n_max=6000, model="small_cnn", channels=1, **FASHION)
DATASETS.register("cifar10", partial(_cifar, 10), num_classes=10, n_max=5000, model="resnet32", channels=3, **CIFAR10)
DATASETS.register("cifar100", partial(_cifar, 100), num_classes=100, n_max=500, model="resnet32", channels=3,
                  **CIFAR100)
# Image root + file list: ImageNet-LT / Places-LT / iNaturalist-2018 lists, or the CIFAR-10 JPEG copy.
# Their lists are long-tailed already: they take data.profile=none (the default exp profile would cut them).
DATASETS.register("file_list", _file_list, options=FileListOptions, num_classes=None, n_max=None, model="resnet18", channels=3, **IMAGENET)
DATASETS.register("cifar10_files", partial(_file_list, 10), options=FileListOptions, num_classes=10, n_max=5000, model="resnet32", channels=3, **CIFAR10)
DATASETS.register("imagenet_lt", partial(_file_list, 1000), options=FileListOptions, num_classes=1000, n_max=None, model="resnet50", channels=3, **IMAGENET)
DATASETS.register("places_lt", partial(_file_list, 365), options=FileListOptions, num_classes=365, n_max=None, model="resnet50", channels=3, **IMAGENET)
DATASETS.register("inaturalist2018", partial(_file_list, 8142), options=FileListOptions, num_classes=8142, n_max=None, model="resnet50", channels=3,
                  **IMAGENET)
