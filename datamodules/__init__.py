"""Image-text data: loading and transforms, and the DataModules that feed the training modules."""

from .lazy import lazy_attributes

# Public name -> the submodule that defines it, imported when the name is first used.
_WHERE = {
    "ImageTextDataModule": ".base",
    "Record": ".base",
    "CSVImageTextDataModule": ".csv_folder",
    "ImageLoadError": ".images",
    "ImageTransform": ".images",
    "load_image": ".images",
    "MedVQAGIDataModule": ".medvqa_gi",
    "MedVQAGIParquetDataModule": ".medvqa_gi",
    "MIMICCXRDataModule": ".mimic_cxr",
    "ROCOv2DataModule": ".rocov2",
    "ROCOv2ParquetDataModule": ".rocov2",
    "SyntheticScenesDataModule": ".scenes",
    "SyntheticShapesDataModule": ".synthetic",
    "write_synthetic_folder": ".synthetic",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
