"""Served arrays come with this process's page tables filled, so no request faults them in."""

from __future__ import annotations

import mmap
import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.artifacts import IdMap, map_in_full

_KERNEL = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or _KERNEL < (5, 14), reason="MADV_POPULATE_READ: Linux 5.14+"
)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _faults_touching(view: np.ndarray) -> int:
    """Minor page faults taken reading one byte of every page of ``view``: at least one per
    2 MiB when nothing is mapped yet (a fault maps at most a page-cache folio, up to 2 MiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    int(view[:: _PAGE // view.itemsize].sum())
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "items.npy"
    np.save(path, np.arange(8 << 20, dtype=np.int64))  # 64 MiB, sorted and unique: an id map
    return path


def test_a_loaded_artifact_is_mapped_in_full(tmp_path):
    path = _file(tmp_path)
    plain = np.load(path, mmap_mode="r")  # the control: mapped the ordinary way
    assert _faults_touching(plain) >= 32
    served = IdMap.load(path).values
    assert type(served) is np.ndarray  # no memmap subclass on the request path
    assert _faults_touching(served) <= 2


def test_a_libraries_own_mapping_of_a_file_is_filled_too(tmp_path):
    path = _file(tmp_path)
    with open(path, "rb") as f:
        control = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        theirs = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # as faiss maps its index
    assert _faults_touching(np.frombuffer(control, dtype=np.uint8)) >= 32
    map_in_full(path)
    assert _faults_touching(np.frombuffer(theirs, dtype=np.uint8)) <= 2
