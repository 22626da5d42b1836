"""A user's own data for `--data-dir`: a folder of images (one subfolder per class) or a CSV
table (numeric columns and a label column). A file that cannot be read is named, with the entry
at fault (the image, the row and column), before anything trains."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "I", "I;16", "F")


def is_image_folder(path: Path) -> bool:
    """A directory with at least one subdirectory: the image-folder layout, not IDX files."""
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def _image_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .DS_Store and the like
        if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not a PNG or JPEG image (a class folder holds only "
                             f"{', '.join(IMAGE_SUFFIXES)} files)")
        files.append(path)
    if not files:
        raise ValueError(f"{folder}: a class folder without images")
    return files


def read_image_folder(directory: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images [N, C, S, S] as float32 in [0, 1] (C = 1 if every image is grey, else 3 for RGB),
    labels [N] as the index of the class subfolder in sorted order, and the class names."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(child.name for child in directory.iterdir()
                     if child.is_dir() and not child.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{directory}: an image folder needs at least two class subfolders, "
                         f"found {len(classes)}")
    pictures, labels = [], []
    first: tuple[Path, tuple[int, int]] | None = None
    for label, name in enumerate(classes):
        for path in _image_files(directory / name):
            try:
                with Image.open(path) as image:
                    image.load()
                    picture = image.copy()
            except (OSError, UnidentifiedImageError) as error:
                raise ValueError(f"{path}: not a readable PNG or JPEG image ({error})") from None
            if first is None:
                first = (path, picture.size)
                if picture.size[0] != picture.size[1]:
                    raise ValueError(f"{path}: {picture.size[0]}x{picture.size[1]} pixels; "
                                     f"peerd's CNN takes square images")
            elif picture.size != first[1]:
                raise ValueError(f"{path}: {picture.size[0]}x{picture.size[1]} pixels, but "
                                 f"{first[0]} has {first[1][0]}x{first[1][1]}: every image "
                                 f"must have one size")
            pictures.append(picture)
            labels.append(label)
    grey = all(picture.mode in GREY_MODES for picture in pictures)
    arrays = [np.asarray(picture.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
              for picture in pictures]
    images = np.stack(arrays)
    images = images[:, None] if grey else images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), classes


def _label_order(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order (2 before 10), then the others alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def read_csv_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features [N, F] as float32 from every column but `label_column`, labels [N] as the index
    of each row's label among the sorted distinct labels, and those labels."""
    if not path.is_file():
        raise ValueError(f"{path}: no such CSV file")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file, expected a header row") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error})") from None
        if label_column not in header:
            raise ValueError(f"{path}: no column {label_column!r} (--label-column) in the "
                             f"header {header}")
        label_index = header.index(label_column)
        rows, raw_labels = [], []
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                     f"the header {len(header)}")
                values = []
                for index, cell in enumerate(row):
                    if index == label_index:
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        value = math.nan
                    if not math.isfinite(value):
                        raise ValueError(f"{path}: line {reader.line_num}, column "
                                         f"{header[index]!r}: {cell!r} is not a finite number")
                    values.append(value)
                rows.append(values)
                raw_labels.append(row[label_index].strip())
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text after line {reader.line_num} "
                             f"({error})") from None
    if not rows:
        raise ValueError(f"{path}: no data rows under the header")
    names = sorted(set(raw_labels), key=_label_order)
    if len(names) < 2:
        raise ValueError(f"{path}: column {label_column!r} has one label, {names}; "
                         f"classification needs at least two")
    index_of = {name: index for index, name in enumerate(names)}
    labels = np.asarray([index_of[label] for label in raw_labels], dtype=np.int64)
    return np.asarray(rows, dtype=np.float32), labels, names
