"""What the project's TFDS builders share: offline builds without TensorFlow."""

import inspect
import io

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    """PNG-encoded with PIL: tfds' Image feature needs TensorFlow to encode arrays."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


class ProjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the project's builders (not a dataset itself)."""

    # tfds' default code_path probes `importlib_resources` (not installed) for packaged
    # builders; pointing it at the builder's own file also keeps tfds from looking for
    # checksum files.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))
