"""Data: the dataset registry, transforms, label policy per stage, Parquet tables, replayable views."""
from kd_ray.data.datasets import DataBundle, DataInfo, build_data, describe, labeled_indices, load_source
from kd_ray.data.parquet import convert_imagefolder_to_parquet
from kd_ray.data.sources import DATASETS, Source
from kd_ray.data.synthetic import write_digits_imagefolder, write_synthetic_imagefolder

__all__ = ["DATASETS", "Source", "DataBundle", "DataInfo", "build_data", "describe", "labeled_indices",
           "load_source", "convert_imagefolder_to_parquet", "write_synthetic_imagefolder", "write_digits_imagefolder"]
