"""A folder of images as a TFDS dataset (array_record), built without TensorFlow.

    python -m ldm_jax.data.prepare --folder DIR --name NAME [--captions FILE]

- Images (JPEG, PNG, WebP, BMP, GIF, TIFF) lie directly in DIR (no labels) or in class
  subfolders DIR/<class>/... (labels: the sorted subfolder names).
- Captions come from `--captions FILE`, or from DIR/metadata.jsonl / DIR/metadata.csv
  when present (the layout Hugging Face's imagefolder reads): one row per image with its
  path relative to DIR (`file_name` or `file`) and its caption (`caption` or `text`).
- RGB JPEGs and PNGs are stored byte for byte; other images (grey, alpha, palette,
  other formats, EXIF-rotated) are stored as RGB PNG, upright.
- Deterministic: an image goes to `test` when the hash of its relative path falls
  below `test_fraction`, so adding images never moves others between splits; within a
  split the examples are ordered by that hash (subsets like `test[:500]` mix classes).
- Resumable and sharded: the plan (every image, its split and shard) is written first;
  each shard is written under a temporary name and renamed when whole, so a rerun after
  an interruption skips the shards that exist. The dataset appears under
  DATA_DIR/NAME/1.0.0 only once every shard and the metadata are written.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_jax.errors import UserError

VERSION = "1.0.0"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_FILE_COLUMNS, _CAPTION_COLUMNS = ("file_name", "file"), ("caption", "text")
# A shard closes at this many source bytes or examples, whichever comes first.
SHARD_BYTES, SHARD_EXAMPLES = 256 << 20, 10_000
PLAN = "folder_plan.json"
_KEPT_FORMATS = ("JPEG", "PNG")
_ORIENTATION = 0x0112  # the EXIF tag of a camera's rotation
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Entry:
    file: str  # relative to the folder, '/'-separated
    label: int | None
    caption: str | None
    size: int  # bytes on disk, for planning shards


def _hash01(relative: str) -> float:
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# ----- reading the folder ------------------------------------------------------------------
def _walk(folder: epath.Path):
    """Every file below `folder`, hidden names skipped (epath has no recursive glob)."""
    for item in sorted(folder.iterdir()):
        if item.name.startswith("."):
            continue
        if item.is_dir():
            yield from _walk(item)
        else:
            yield item


def _image_files(root: epath.Path) -> list[str]:
    files = [
        p.relative_to(root).as_posix() for p in _walk(root) if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}); check --folder")
    return sorted(files)


def class_names(files: list[str]) -> list[str] | None:
    """The sorted class subfolders, or None when every image lies at the top level."""
    top = [f for f in files if "/" not in f]
    nested = [f for f in files if "/" in f]
    if top and nested:
        raise UserError(
            f"the folder mixes top-level images ({top[0]}) with class subfolders "
            f"({nested[0]}): put every image in a class folder, or none"
        )
    return sorted({f.split("/")[0] for f in nested}) or None


def _rows(path: epath.Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not a JSON line ({e.msg})") from None
    return rows


def _column(row: dict, names: tuple[str, ...], path, n: int) -> str:
    for name in names:
        if name in row:
            return str(row[name])
    raise UserError(f"{path} row {n} has no {' or '.join(repr(c) for c in names)} column")


def read_captions(path: epath.Path, files: list[str]) -> dict[str, str]:
    """{relative file: caption} from a JSONL or CSV file; every image needs one."""
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise UserError(f"captions file {path}: use a .jsonl or a .csv file")
    captions = {}
    for n, row in enumerate(_rows(path), 1):
        file = _column(row, _FILE_COLUMNS, path, n).replace(os.sep, "/").removeprefix("./")
        captions[file] = _column(row, _CAPTION_COLUMNS, path, n)
    unknown = sorted(set(captions) - set(files))
    if unknown:
        raise UserError(
            f"{path} captions {len(unknown)} file(s) that are not images of the folder, "
            f"e.g. {unknown[0]!r}: paths are relative to --folder"
        )
    missing = [f for f in files if f not in captions]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) have no caption in {path}, e.g. {missing[0]!r}: "
            "caption every image (or drop --captions)"
        )
    return captions


def _captions_file(root: epath.Path, captions) -> epath.Path | None:
    if captions:
        path = epath.Path(captions)
        if not path.is_file():
            raise UserError(f"captions file {path} does not exist")
        return path
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    return found[0] if found else None


def scan(root, captions=None) -> tuple[list[Entry], list[str] | None, bool]:
    """(entries in path order, class names or None, whether captioned)."""
    root = epath.Path(root)
    if not root.is_dir():
        raise UserError(f"--folder {root} is not a directory")
    files = _image_files(root)
    names = class_names(files)
    caption_path = _captions_file(root, captions)
    texts = read_captions(caption_path, files) if caption_path else {}
    index = {name: i for i, name in enumerate(names or ())}
    entries = [
        Entry(
            file=f,
            label=index[f.split("/")[0]] if names else None,
            caption=texts.get(f),
            size=(root / f).stat().length,
        )
        for f in files
    ]
    return entries, names, caption_path is not None


# ----- the plan: splits and shards -----------------------------------------------------------
def plan_splits(entries: list[Entry], test_fraction: float) -> dict[str, list[list[Entry]]]:
    """{split: shards}, each shard a list of entries in hash order."""
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test_fraction {test_fraction}: use a value in [0, 1)")
    keyed = sorted(entries, key=lambda e: (_hash01(e.file), e.file))
    splits = {
        "train": [e for e in keyed if _hash01(e.file) >= test_fraction],
        "test": [e for e in keyed if _hash01(e.file) < test_fraction],
    }
    return {name: _shards(items) for name, items in splits.items() if items}


def _shards(items: list[Entry]) -> list[list[Entry]]:
    shards, current, size = [], [], 0
    for e in items:
        if current and (size + e.size > SHARD_BYTES or len(current) >= SHARD_EXAMPLES):
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.size
    return shards + [current]


def _fingerprint(plan, names, captioned: bool) -> str:
    spec = {
        "names": names,
        "captioned": captioned,
        "splits": {
            s: [[dataclasses.astuple(e) for e in sh] for sh in shs] for s, shs in plan.items()
        },
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ----- writing ---------------------------------------------------------------------------------
def features(names, captioned: bool) -> tfds.features.FeaturesDict:
    spec = {"image": tfds.features.Image(shape=(None, None, 3)), "file_name": tfds.features.Text()}
    if names:
        spec["label"] = tfds.features.ClassLabel(names=names)
    if captioned:
        spec["caption"] = tfds.features.Text()
    return tfds.features.FeaturesDict(spec)


def stored_image(data: bytes, where: str) -> bytes:
    """The bytes kept for an image: as they are for an upright RGB JPEG or PNG, else RGB PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rotated = image.getexif().get(_ORIENTATION, 1) != 1
            if image.format in _KEPT_FORMATS and image.mode == "RGB" and not rotated:
                return data
            out = io.BytesIO()
            ImageOps.exif_transpose(image).convert("RGB").save(out, format="PNG", compress_level=6)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{where} is not a readable image ({e}); remove or fix it") from None


def _template(build_dir: epath.Path, name: str, split: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=build_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=name, split=split, filetype_suffix="array_record",
    )  # fmt: skip


def _write_shard(path: epath.Path, records: Iterable[bytes]) -> None:
    from tensorflow_datasets.core import file_adapters

    partial = path.parent / (path.name + ".partial")
    adapter = file_adapters.ArrayRecordFileAdapter
    adapter.write_examples(partial, ((None, record) for record in records))
    partial.rename(path)  # a shard exists only whole


class FolderBuild:
    """One folder -> one dataset; `run()` writes what is missing and returns the path."""

    def __init__(self, folder, name: str, data_dir, *, captions=None, test_fraction=0.05,
                 workers: int = 4, log: Callable[[str], None] = print):  # fmt: skip
        if not _NAME.match(name):
            raise UserError(f"--name {name!r}: use lower case letters, digits and '_'")
        self.root = epath.Path(folder)
        self.name, self.workers, self.log = name, max(1, workers), log
        self.entries, self.names, self.captioned = scan(self.root, captions)
        self.plan = plan_splits(self.entries, test_fraction)
        self.fingerprint = _fingerprint(self.plan, self.names, self.captioned)
        self.features = features(self.names, self.captioned)
        self.final_dir = epath.Path(data_dir) / name / VERSION
        self.build_dir = epath.Path(data_dir) / name / f"{VERSION}.incomplete"

    def run(self) -> epath.Path:
        if self.final_dir.exists():
            return self._existing()
        self._start_or_resume()
        from tensorflow_datasets.core import example_serializer

        serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())
        split_infos = []
        with ThreadPoolExecutor(self.workers) as pool:
            for split, shards in self.plan.items():
                template = _template(self.build_dir, self.name, split)
                for i, shard in enumerate(shards):
                    path = template.sharded_filepath(shard_index=i, num_shards=len(shards))
                    if path.exists():
                        continue
                    examples = pool.map(self._example, shard)
                    _write_shard(path, (serializer.serialize_example(ex) for ex in examples))
                    self.log(f"{split} shard {i + 1}/{len(shards)}: {len(shard)} images")
                split_infos.append(self._split_info(split, shards, template))
        self._write_metadata(split_infos)
        self.build_dir.rename(self.final_dir)
        return self.final_dir

    def _existing(self) -> epath.Path:
        plan = self.final_dir / PLAN
        if plan.is_file() and json.loads(plan.read_text())["fingerprint"] == self.fingerprint:
            self.log(f"{self.final_dir} is up to date with {self.root}")
            return self.final_dir
        raise UserError(
            f"{self.final_dir} holds another build of '{self.name}' (the folder or its "
            "captions changed since): pick a new --name, or delete that directory to rebuild"
        )

    def _start_or_resume(self) -> None:
        plan = self.build_dir / PLAN
        if plan.is_file():
            if json.loads(plan.read_text())["fingerprint"] == self.fingerprint:
                self.log(f"resuming the build in {self.build_dir}")
                for partial in self.build_dir.glob("*.partial"):  # cut off mid-write
                    partial.unlink()
                return
            # Only this builder's own unfinished shards are there: start them over.
            self.log(f"the folder changed since the build in {self.build_dir}: starting over")
            shutil.rmtree(self.build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        counts = {s: sum(map(len, shards)) for s, shards in self.plan.items()}
        content = {
            "fingerprint": self.fingerprint,
            "folder": os.fspath(self.root),
            "counts": counts,
        }
        (self.build_dir / PLAN).write_text(json.dumps(content, indent=2) + "\n")

    def _example(self, entry: Entry) -> dict:
        data = (self.root / entry.file).read_bytes()
        example = {
            "image": stored_image(data, os.fspath(self.root / entry.file)),
            "file_name": entry.file,
        }
        if self.names:
            example["label"] = entry.label
        if self.captioned:
            example["caption"] = entry.caption
        return self.features.encode_example(example)

    def _split_info(self, split, shards, template) -> tfds.core.SplitInfo:
        paths = template.sharded_filepaths(len(shards))
        return tfds.core.SplitInfo(
            name=split, shard_lengths=[len(s) for s in shards],
            num_bytes=sum(p.stat().length for p in paths), filename_template=template,
        )  # fmt: skip

    def _write_metadata(self, split_infos) -> None:
        from tensorflow_datasets.core import dataset_info

        identity = dataset_info.DatasetIdentity(
            name=self.name, version=tfds.core.Version(VERSION),
            data_dir=os.fspath(self.build_dir), module_name="",
        )  # fmt: skip
        info = dataset_info.DatasetInfo(
            builder=identity, features=self.features,
            description=f"Images of the folder {self.root}, built by ldm_jax.data.folder.",
            supervised_keys=("image", "label") if self.names else None,
        )  # fmt: skip
        info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
        info.set_splits(tfds.core.SplitDict(split_infos))
        info.write_to_directory(self.build_dir)


def build(folder, name: str, data_dir, **kwargs) -> epath.Path:
    """Builds (or resumes, or finds up to date) the dataset `name` of `folder`."""
    return FolderBuild(folder, name, data_dir, **kwargs).run()
