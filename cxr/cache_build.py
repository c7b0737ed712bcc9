"""Building the decode-once image cache that cxr.cache.ImageCache reads (folder layout: see cxr.cache).

    python scripts/prepare_cache.py --data-dir /data/nih --out /fast/nih-256 --size 256 --workers 16

    summary = build_cache("/data/nih", "/fast/nih-256", Preprocessing(256), workers=16)   # resumable
    print(summary["decoded"], summary["images_per_second"])

Worker processes decode chunks of rows straight into the shared memmap. done.npy records which rows are
written and is saved periodically and on any exit (Ctrl-C included), always after the pixels are fsynced,
so running the same command again decodes only the rows not yet done. COMPLETE is written last, once
every image decoded; a build with bad images raises CacheBuildError naming them and stays resumable.
"""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cxr.cache import (
    CACHE_FILES,
    CACHE_VERSION,
    COMPLETE_MARKER,
    DONE_FILE,
    IMAGES_FILE,
    INDEX_FILE,
    PARAMS_FILE,
    CacheError,
    read_params,
)
from cxr.data import NihIndex, find_table, keep_images_on_disk, locate_images, read_nih_table, table_to_index
from cxr.transforms import ImageReadError, Preprocessing, read_xray

MAX_LISTED_FAILURES = 20


class CacheBuildError(CacheError):
    """Some images could not be decoded: `failures` holds (path, reason) pairs and the cache stays incomplete."""

    def __init__(self, message: str, failures: list[tuple[str, str]], summary: dict):
        super().__init__(message)
        self.failures, self.summary = failures, summary


def _write_atomically(path: Path, write) -> None:
    """Write via a temporary file, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json(path: Path, content: dict) -> None:
    _write_atomically(path, lambda handle: handle.write((json.dumps(content, indent=2) + "\n").encode()))


# ----------------------------------------------------------------------------------------------- building
def _locate(data_dir: Path, skip_missing: bool) -> tuple[Path, NihIndex]:
    """The whole table (all views: the cache serves any filter) with every image located on disk."""
    table_path = find_table(data_dir)
    index = locate_images(table_to_index(read_nih_table(table_path), str(table_path)), data_dir)
    index, _ = keep_images_on_disk(index, data_dir, table_path.name, skip_missing)
    return table_path, index


def _prepare_folder(cache_dir: Path, names: np.ndarray, preprocessing: Preprocessing, data_dir: Path,
                    table_path: Path) -> np.ndarray:
    """Create the cache files, or check a started cache against this build; returns the done bitmap."""
    nbytes = len(names) * preprocessing.size ** 2
    if (cache_dir / PARAMS_FILE).is_file():
        stored = read_params(cache_dir)
        differences = preprocessing.differences(stored)
        if stored.get("version") != CACHE_VERSION:
            differences.append(f"version: cache has {stored.get('version')!r}, this code writes {CACHE_VERSION}")
        if differences:
            raise CacheError(f"--out {cache_dir} already holds a cache built with other parameters ({'; '.join(differences)}); "
                             "delete that folder or pass another --out")
        stored_names = np.load(cache_dir / INDEX_FILE)
        if stored_names.shape != names.shape or not np.array_equal(stored_names, names):
            raise CacheError(f"--out {cache_dir} holds a cache of another image list ({len(stored_names)} images, this table "
                             f"gives {len(names)}: different table or --skip-missing); delete that folder or pass another --out")
        done = np.load(cache_dir / DONE_FILE)
        if done.shape != names.shape or (cache_dir / IMAGES_FILE).stat().st_size != nbytes:
            raise CacheError(f"{cache_dir}: {DONE_FILE} or {IMAGES_FILE} has the wrong size (damaged); delete the folder and rebuild")
        return done.astype(bool)
    strangers = [path.name for path in cache_dir.iterdir() if path.name not in CACHE_FILES and not path.name.endswith(".tmp")]
    if strangers:
        raise CacheError(f"--out {cache_dir} is not empty and is not an image cache (it holds {', '.join(sorted(strangers)[:3])}); "
                         "choose a new or empty folder")
    free = shutil.disk_usage(cache_dir).free
    if free < nbytes:
        raise CacheError(f"--out {cache_dir}: the cache needs {nbytes / 1e9:.2f} GB but {free / 1e9:.2f} GB are free; "
                         "choose another folder or a smaller --size")
    with open(cache_dir / IMAGES_FILE, "wb") as handle:
        try:  # real blocks now: a full disk fails here with a message, not later as SIGBUS inside a worker
            os.posix_fallocate(handle.fileno(), 0, nbytes)
        except (AttributeError, OSError) as error:
            if getattr(error, "errno", None) == errno.ENOSPC:
                raise CacheError(f"--out {cache_dir}: no space left for {nbytes / 1e9:.2f} GB") from error
            handle.truncate(nbytes)  # filesystem without fallocate: a sparse file
    _write_atomically(cache_dir / INDEX_FILE, lambda handle: np.save(handle, names))
    done = np.zeros(len(names), dtype=bool)
    _write_atomically(cache_dir / DONE_FILE, lambda handle: np.save(handle, done))
    # params.json last: its presence means the folder is fully set up and can be resumed.
    _write_json(cache_dir / PARAMS_FILE, {"version": CACHE_VERSION, **preprocessing.as_dict(), "count": len(names),
                                          "data_dir": str(data_dir.resolve()), "table": str(table_path.resolve()),
                                          "opencv": cv2.__version__})
    return done


_WRITABLE_MAPS: dict[tuple, np.memmap] = {}  # per process: each worker maps the file once


def _decode_chunk(task: tuple) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode and preprocess one chunk of rows straight into the memmap; returns the rows written and the failures."""
    images_path, shape, preprocessing, rows, paths = task
    key = (images_path, shape)
    if key not in _WRITABLE_MAPS:
        _WRITABLE_MAPS[key] = np.memmap(images_path, dtype=np.uint8, mode="r+", shape=shape)
    images = _WRITABLE_MAPS[key]
    written, failures = [], []
    for row, path in zip(rows, paths):
        try:
            image = preprocessing(read_xray(path))
        except Exception as error:  # any bad file is reported by name; the rest of the build goes on
            reason = str(error).removeprefix(f"{path}: ")
            failures.append((path, reason if isinstance(error, ImageReadError) else f"{type(error).__name__}: {reason}"))
            continue
        images[row] = image
        written.append(row)
    return np.asarray(written, dtype=np.int64), failures


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes, never forks of the caller: a fork inherits OpenCV's thread pool in a state where
    cv2.setNumThreads deadlocks (seen after any cv2 call in the parent), and without it every worker would run a
    full-size pool. The fork server preloads this module (cxr.cache_build, with cv2, numpy and the cxr.cache reader)
    once, so workers start in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs; then each worker imports it
    return context


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent, which saves progress


def _checkpoint(cache_dir: Path, done: np.ndarray) -> None:
    """Make the written pixels durable first, then record their rows as done: done.npy never runs ahead."""
    descriptor = os.open(cache_dir / IMAGES_FILE, os.O_RDWR)
    try:
        os.fsync(descriptor)  # covers pages dirtied through any process's mapping of the file
    finally:
        os.close(descriptor)
    _write_atomically(cache_dir / DONE_FILE, lambda handle: np.save(handle, done))


def _decode_rows(cache_dir: Path, index: NihIndex, preprocessing: Preprocessing, done: np.ndarray, workers: int, progress: bool,
                 chunk_rows: int, checkpoint_seconds: float) -> list[tuple[str, str]]:
    """Decode every row not yet done (marking `done` in place, saved periodically and on any exit); returns failures."""
    todo = np.flatnonzero(~done)
    workers = max(1, min(workers, len(todo)))
    chunk = max(1, min(chunk_rows, math.ceil(len(todo) / (4 * workers))))  # several chunks per worker: even finish
    shape = (len(done), preprocessing.size, preprocessing.size)
    tasks = ((str(cache_dir / IMAGES_FILE), shape, preprocessing, rows, [index.image_path(row) for row in rows])
             for rows in np.array_split(todo, math.ceil(len(todo) / chunk)))
    failures: list[tuple[str, str]] = []
    pool = _worker_context().Pool(workers, initializer=_init_worker) if workers > 1 else None
    bar = tqdm(total=len(done), initial=int(done.sum()), unit="img", desc=f"cache {preprocessing.size}px",
               disable=not progress, mininterval=1.0)
    last_checkpoint = time.monotonic()
    try:
        for written, chunk_failures in (pool.imap_unordered(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)):
            done[written] = True
            failures.extend(chunk_failures)
            bar.update(len(written) + len(chunk_failures))
            if time.monotonic() - last_checkpoint >= checkpoint_seconds:
                _checkpoint(cache_dir, done)
                last_checkpoint = time.monotonic()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _WRITABLE_MAPS.clear()  # the in-process path mapped the file here
        _checkpoint(cache_dir, done)
        bar.close()
    return failures


def build_cache(data_dir: str | Path, cache_dir: str | Path, preprocessing: Preprocessing, workers: int | None = None,
                skip_missing: bool = False, progress: bool = True, chunk_rows: int = 128,
                checkpoint_seconds: float = 10.0) -> dict:
    """Decode every image of the table once into `cache_dir` (resumable); raises CacheBuildError naming bad images."""
    start = time.perf_counter()
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    table_path, index = _locate(data_dir, skip_missing)
    cache_dir.mkdir(parents=True, exist_ok=True)
    done = _prepare_folder(cache_dir, index.image_names, preprocessing, data_dir, table_path)
    already_done = int(done.sum())
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    failures = _decode_rows(cache_dir, index, preprocessing, done, workers, progress, chunk_rows, checkpoint_seconds) \
        if already_done < len(done) else []
    seconds = time.perf_counter() - start
    decoded = int(done.sum()) - already_done
    summary = {"cache_dir": str(cache_dir), "images": len(done), "decoded": decoded, "already_done": already_done,
               "failed": len(failures), "complete": not failures, "bytes": len(done) * preprocessing.size ** 2,
               "seconds": round(seconds, 3), "images_per_second": round(decoded / seconds, 1) if seconds else 0.0,
               "workers": workers, "params": preprocessing.as_dict()}
    if failures:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in failures[:MAX_LISTED_FAILURES])
        if len(failures) > MAX_LISTED_FAILURES:
            listed += f"\n  ... and {len(failures) - MAX_LISTED_FAILURES} more"
        raise CacheBuildError(f"{len(failures)} of {len(done)} images could not be decoded, so the cache in {cache_dir} is "
                              f"NOT complete:\n{listed}\nRe-download or fix these files (or remove their rows from "
                              f"{table_path.name}), then run the same command again: only the images not yet cached are decoded.",
                              failures, summary)
    if not (cache_dir / COMPLETE_MARKER).is_file():
        _write_json(cache_dir / COMPLETE_MARKER, {"count": len(done), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return summary
