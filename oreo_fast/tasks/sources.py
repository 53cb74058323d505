"""Where records come from: JSONL, or the ``datasets`` library's formats.

``read_records(source)`` yields ``(row, record)`` (1-based row, a dict per example) from

- a JSONL file (``.jsonl``, ``.json``): ``oreo_fast.io.read_jsonl``;
- a parquet file (``.parquet``) or an arrow file (``.arrow``: the IPC stream ``save_to_disk``
  writes, or the IPC file / Feather format): through ``pyarrow``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a hub dataset name (``openai/gsm8k``), resolved from the local ``datasets`` cache only
  (offline: nothing is downloaded; ``load_dataset`` it once where the network is reachable).

A folder or a hub name holding several splits needs ``split`` (the jobs default to ``train``,
evaluation to ``test``); ``subset`` names a hub dataset's configuration (GSM8K's ``main``).
``pyarrow`` and ``datasets`` are optional: ``pip install 'oreo_fast[datasets]'``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from oreo_fast.errors import DataError
from oreo_fast.io import read_jsonl

INSTALL_HINT = "pip install 'oreo_fast[datasets]'"
TABLE_SUFFIXES = (".parquet", ".arrow")


def _need(module: str, source):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(f"reading this source needs the {module.split('.')[0]} package: "
                        f"{INSTALL_HINT}", source) from None


def read_records(source: str | os.PathLike, split: str | None = None,
                 subset: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row, record)`` for every example of ``source`` (see the module docstring)."""
    path = Path(source)
    if path.is_file():
        if path.suffix in TABLE_SUFFIXES:
            yield from enumerate(map(_present, _read_table(path).to_pylist()), start=1)
        else:
            yield from read_jsonl(path)
        return
    if path.is_dir():
        dataset = _load_from_disk(path)
    elif path.suffix in TABLE_SUFFIXES + (".jsonl", ".json") or \
            str(source).startswith((".", os.sep)):
        raise DataError("no such file", source)
    else:
        dataset = _load_cached(str(source), subset, source)
    dataset = _pick_split(dataset, split, source)
    yield from enumerate(map(_present, dataset), start=1)


def _present(row) -> dict:
    """A table row without its null cells: a column some rows lack (``turns`` next to
    ``response`` in a mixed trajectory file) is absent from those rows, as in JSONL."""
    return {key: value for key, value in dict(row).items() if value is not None}


def _read_table(path: Path):
    pa = _need("pyarrow", path)
    try:
        if path.suffix == ".parquet":
            return _need("pyarrow.parquet", path).read_table(path)
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable {path.suffix[1:]} file ({str(e)[:120]})", path) from None


def _load_from_disk(path: Path):
    datasets = _need("datasets", path)
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"not a datasets folder written by save_to_disk ({str(e)[:120]})",
                        path) from None


def _load_cached(name: str, subset: str | None, source):
    """A hub dataset from the local cache, never the network. Offline mode is switched on for
    the call through the libraries' own flags (their environment variables are read once, at
    import, and transformers has imported huggingface_hub by now)."""
    datasets = _need("datasets", source)
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, subset)
    except Exception as e:  # datasets raises many kinds (ConnectionError, ValueError, ...)
        raise DataError(f"neither a file nor a folder, and not a dataset in the local datasets "
                        f"cache ({type(e).__name__}: {str(e)[:160]}); load_dataset({name!r}) "
                        "once online, or save_to_disk / to_parquet it", source) from None
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _pick_split(dataset, split: str | None, source):
    if not hasattr(dataset, "keys"):  # a single Dataset
        return dataset
    splits = list(dataset.keys())
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise DataError(f"split {split!r} not found; it has {splits} (set split=...)", source)
    return dataset[split]


def is_table(path: str | os.PathLike) -> bool:
    """A trajectory or problem file read through pyarrow (parquet or arrow)."""
    return Path(path).suffix in TABLE_SUFFIXES
