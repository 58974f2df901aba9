"""Image-text data: loading and transforms, and the DataModules that feed the training modules."""

from .base import ImageTextDataModule, Record
from .csv_folder import CSVImageTextDataModule
from .images import ImageLoadError, ImageTransform, load_image
from .synthetic import SyntheticShapesDataModule, write_synthetic_folder

__all__ = [
    "CSVImageTextDataModule",
    "ImageLoadError",
    "ImageTextDataModule",
    "ImageTransform",
    "Record",
    "SyntheticShapesDataModule",
    "load_image",
    "write_synthetic_folder",
]
