"""What a copy of CIFAR-10 holds: its classes in label order, the image files a folder copy may have.

Shared by the archive checks (archive.py) and the readers (sources.py), and by whatever names a class.
"""

from __future__ import annotations

# CIFAR-10's official label order (torchvision.datasets.CIFAR10.classes); alphabetical, so an
# ImageFolder of these class names gets the official indices.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# What torchvision's ImageFolder accepts as images; anything else in a class folder is skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
