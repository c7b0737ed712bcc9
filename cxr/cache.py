"""Reading the decode-once image cache: every NIH image decoded and preprocessed once into a uint8 memmap.

    cache = ImageCache.open("/fast/nih-256", expected=Preprocessing(256, "clahe", 2.0, 8))
    image = cache.get("00000001_000.png")   # uint8 [256, 256] == Preprocessing(256, ...)(read_xray(path))

Caches are built by cxr.cache_build.build_cache, usually through scripts/prepare_cache.py:

    python scripts/prepare_cache.py --data-dir /data/nih --out /fast/nih-256 --size 256 --workers 16
    python train.py --data-dir /data/nih --cache-dir /fast/nih-256 --image-size 256

A PNG costs ~10 ms of CPU to decode; a cached image is a memcpy, so GPU epochs stop waiting on the
CPUs. The cache holds only the deterministic steps (read_xray + Preprocessing), bit for bit, so
random augmentation still runs per epoch on top. Full NIH at 256 px is ~7.3 GB on disk, paged in by
the OS and never held in process memory. This module is all that training needs (no table code); the stored
parameters are compared with the run's `Preprocessing`, the one preprocessing contract.

Folder: images.u8 (raw uint8 [N, S, S]), index.npy (Image Index of each row, fixed-width unicode),
params.json (preprocessing, count, version), done.npy (rows written so far), COMPLETE (written last).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np

from cxr.errors import CxrError
from cxr.transforms import Preprocessing

CACHE_VERSION = 1
IMAGES_FILE, INDEX_FILE, PARAMS_FILE, DONE_FILE, COMPLETE_MARKER = "images.u8", "index.npy", "params.json", "done.npy", "COMPLETE"
CACHE_FILES = (IMAGES_FILE, INDEX_FILE, PARAMS_FILE, DONE_FILE, COMPLETE_MARKER)


class CacheError(CxrError, RuntimeError):
    """A cache folder that cannot serve the request; the message names the folder and says what to do."""


class CacheMissError(CxrError, KeyError):
    """An image name that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


# ----------------------------------------------------------------------------------------------- parameters
def prepare_command(data_dir: str | Path, out: str | Path, params: dict) -> str:
    """The scripts/prepare_cache.py command line that builds (or finishes) a cache with `params`."""
    return (f"python scripts/prepare_cache.py --data-dir {shlex.quote(str(data_dir))} --out {shlex.quote(str(out))} "
            f"--size {params['size']} --preprocess {params['preprocess']} --clahe-clip {params['clahe_clip']} "
            f"--clahe-grid {params['clahe_grid']}")


def read_params(cache_dir: Path) -> dict:
    """The params.json of a cache folder; CacheError when the folder is not a cache or the file is unreadable."""
    path = cache_dir / PARAMS_FILE
    if not path.is_file():
        raise CacheError(f"{cache_dir}: not an image cache (no {PARAMS_FILE}); build one with scripts/prepare_cache.py")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CacheError(f"{path}: unreadable ({error}); delete {cache_dir} and rebuild the cache") from error


# ----------------------------------------------------------------------------------------------- reading
class ImageCache:
    """Read-only access to a complete cache; the memmap is (re)opened lazily in each process, never pickled."""

    def __init__(self, cache_dir: str | Path, params: dict):
        self.cache_dir, self.params = Path(cache_dir), dict(params)
        self._images: np.memmap | None = None
        self._pid = -1

    @classmethod
    def open(cls, cache_dir: str | Path, expected: Preprocessing | None = None) -> ImageCache:
        """Open a complete cache, checking its stored preprocessing against the run's `expected` one."""
        cache_dir = Path(cache_dir)
        if not cache_dir.is_dir():
            example = (expected or Preprocessing(224)).as_dict()
            raise CacheError(f"--cache-dir {cache_dir}: no such folder; build it first with: "
                             f"{prepare_command('DATA_DIR', cache_dir, example)}")
        params = read_params(cache_dir)
        if params.get("version") != CACHE_VERSION:
            raise CacheError(f"--cache-dir {cache_dir}: cache format version {params.get('version')!r}, this code reads "
                             f"{CACHE_VERSION}; rebuild it: {prepare_command(params.get('data_dir'), cache_dir, params)}")
        if not (cache_dir / COMPLETE_MARKER).is_file():
            try:
                progress = f"{int(np.load(cache_dir / DONE_FILE).sum())} of {params.get('count')} images cached"
            except (OSError, ValueError):
                progress = "progress unknown"
            raise CacheError(f"--cache-dir {cache_dir}: the cache is not complete ({progress}); run "
                             f"{prepare_command(params.get('data_dir'), cache_dir, params)} to finish it")
        differences = expected.differences(params) if expected is not None else []
        if differences:
            wanted = expected.as_dict()
            new_dir = f"{cache_dir}-{wanted['size']}px-{wanted['preprocess']}"
            raise CacheError(f"--cache-dir {cache_dir} was built with other preprocessing than this run needs: "
                             f"{'; '.join(differences)}. Rebuild it for this run with "
                             f"{prepare_command(params.get('data_dir'), new_dir, wanted)} and pass --cache-dir {new_dir} "
                             "(or set --image-size/--preprocess/--clahe-clip/--clahe-grid to the cache's values)")
        cache = cls(cache_dir, params)
        cache._ensure_open()  # fail now on a damaged folder, not in a DataLoader worker
        return cache

    def _ensure_open(self) -> np.memmap:
        if self._images is None or self._pid != os.getpid():
            names = np.load(self.cache_dir / INDEX_FILE)
            size = self.params["size"]
            expected_bytes, actual = len(names) * size * size, (self.cache_dir / IMAGES_FILE).stat().st_size
            if actual != expected_bytes:
                raise CacheError(f"{self.cache_dir / IMAGES_FILE}: {actual} bytes, expected {expected_bytes} for {len(names)} "
                                 f"images of {size}x{size} (damaged); delete {self.cache_dir} and rebuild the cache")
            # Sorted names + searchsorted instead of a dict: numpy arrays only, no per-row objects in every worker.
            self._order = np.argsort(names, kind="stable")
            self._sorted_names, self._names = names[self._order], names
            self._images = np.memmap(self.cache_dir / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(len(names), size, size))
            self._pid = os.getpid()
        return self._images

    @property
    def image_names(self) -> np.ndarray:
        """The Image Index of every cached row, in row order."""
        self._ensure_open()
        return self._names

    def row_of(self, image_name: str) -> int:
        """The cache row of `image_name`; CacheMissError (a KeyError) when the cache does not hold it."""
        self._ensure_open()
        position = int(np.searchsorted(self._sorted_names, image_name))
        if position >= len(self._sorted_names) or self._sorted_names[position] != image_name:
            raise CacheMissError(f"{image_name} is not in the cache {self.cache_dir} ({len(self)} images from "
                                 f"{self.params.get('table')}); rebuild the cache for this table: "
                                 f"{prepare_command(self.params.get('data_dir'), self.cache_dir, self.params)} into a new --out")
        return int(self._order[position])

    def get(self, image_name: str) -> np.ndarray:
        """The cached uint8 [S, S] image, as a writable copy (augmentations may write into it)."""
        return np.array(self._ensure_open()[self.row_of(image_name)])

    def __len__(self) -> int:
        return int(self.params["count"])

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "params": self.params}  # the map is re-opened by whoever unpickles

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_dir"], state["params"])

    def __repr__(self) -> str:
        return f"ImageCache({str(self.cache_dir)!r}, {len(self)} images, {self.params['size']}px {self.params['preprocess']})"
