"""Image-text data: loading and transforms, and the DataModules that feed the training modules."""

from .base import ImageTextDataModule, Record
from .csv_folder import CSVImageTextDataModule
from .images import ImageLoadError, ImageTransform, load_image
from .medvqa_gi import MedVQAGIDataModule, MedVQAGIParquetDataModule
from .mimic_cxr import MIMICCXRDataModule
from .rocov2 import ROCOv2DataModule, ROCOv2ParquetDataModule
from .synthetic import SyntheticShapesDataModule, write_synthetic_folder

__all__ = [
    "CSVImageTextDataModule",
    "ImageLoadError",
    "ImageTextDataModule",
    "ImageTransform",
    "MIMICCXRDataModule",
    "MedVQAGIDataModule",
    "MedVQAGIParquetDataModule",
    "ROCOv2DataModule",
    "ROCOv2ParquetDataModule",
    "Record",
    "SyntheticShapesDataModule",
    "load_image",
    "write_synthetic_folder",
]
