"""Write a compressed qcow2 image from a raw one: clusters deflated in parallel, written in cluster order.

`qemu-img convert -c` compresses one cluster at a time (~25 MB/s of input here); with `-W` it uses
several threads but writes clusters in completion order, so the file changes from run to run. This
writer compresses on every CPU and writes the results in guest cluster order, so the file depends only
on the raw image's bytes (and the zlib library's output, which the build fixes).

What it writes, field by field, per qemu's format specification (docs/interop/qcow2.txt in qemu's
source tree; the names below are the spec's):

- Header (cluster 0): magic "QFI\\xfb", version 3 (qemu-img's default, compat=1.1), cluster_bits 16
  (64 KiB clusters), size = the raw image's size, crypt_method 0, l1_size, l1_table_offset,
  refcount_table_offset, refcount_table_clusters, no snapshots, no backing file, no incompatible,
  compatible or autoclear feature bits (so: no extended L2 entries, no external data file, and no
  compression_type field: header_length is 104, the version 3 minimum, which means zlib), refcount_order
  4 (16-bit refcounts). The header extension area holds only its end marker (type 0).
- Guest clusters that are holes in the raw file (SEEK_DATA/SEEK_HOLE) or all zero are left unallocated
  (L2 entry 0: they read as zeros), as qemu-img does.
- Every other cluster is deflated as qemu's qcow2 driver deflates it (block/qcow2-threads.c:
  `deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)`, raw deflate with a
  4 KiB window, which is what qemu's `inflateInit2(-12)` reads), except for the level: LEVEL (2) rather
  than zlib's default 6. Any level gives a deflate stream every qemu inflates the same way; 2 takes 0.52x
  the CPU time of 6 for a 5% larger file (a closure of ELF and text files, bench/debian_closure.py), which
  on 2 cores is what makes the writer 3x faster than `qemu-img convert -c` (docs/benchmark.md; level 3,
  0.61x, fell just short of it there). With
  level=QEMU_LEVEL the clusters are exactly qemu-img's (tests/test_qcow2.py). A partial last cluster
  is zero-padded to a whole one. As in qemu's qcow2_co_pwritev_compressed_task, which gives deflate
  `cluster_size - 1` bytes of room, a cluster whose deflated form is not smaller is stored uncompressed.
- Space is handed out as qemu's driver hands it out. A compressed cluster goes at a byte cursor, right
  after the previous compressed cluster, in the tail of the host cluster that one ended in, or across
  into the next host cluster when that is the next one at the end of the file (qcow2_alloc_bytes); its
  L2 entry is a "Compressed Clusters Descriptor": host offset in bits 0-53, the number of 512-byte
  sectors it uses beyond the one holding its offset in bits 54-61, bit 62 set, bit 63 clear. An
  uncompressed cluster takes a new host cluster at the end of the file ("Standard Cluster Descriptor",
  bit 63 "refcount is exactly one" set). An L2 table (8192 entries, one cluster) takes a new host
  cluster as soon as the guest clusters it maps are done, so only one is held in memory; an L2 table
  that would map nothing is not written (its L1 entry stays 0).
- After the data: the L1 table (bit 63 set on every entry: each L2 table is referenced once), the
  refcount blocks and the refcount table. Refcounts count references the way qemu's qcow2_alloc_bytes
  and `qemu-img check` do: every compressed cluster adds one to each host cluster its bytes touch, so a
  host cluster shared by several compressed clusters has a refcount above one; metadata and uncompressed
  clusters have refcount one. The refcount blocks cover themselves and the refcount table.
- The file ends at a host cluster boundary.

The raw size must be a multiple of 512 bytes: qemu counts the virtual size in 512-byte sectors (and
`qemu-img convert` rounds other sizes up), so no qcow2 could hold such a disk exactly.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

from ..errors import BuildError
from .sparse import data_ranges

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
SECTOR = 512
L2_ENTRIES = CLUSTER // 8
MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE (block/qcow2.h): larger images do not open
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu's default
REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> REFCOUNT_ORDER
REFTABLE_ENTRIES_PER_CLUSTER = CLUSTER // 8
HEADER_LENGTH = 104
COPIED = 1 << 63  # L1/L2 entry: the cluster's refcount is exactly one
COMPRESSED = 1 << 62
CSIZE_SHIFT = 62 - (CLUSTER_BITS - 8)  # where the sector count starts in a compressed cluster descriptor
QEMU_LEVEL = zlib.Z_DEFAULT_COMPRESSION  # 6: what qemu-img convert -c uses
LEVEL = 2  # what this writer uses (module docstring)
BATCH = 16  # clusters read and deflated per task (1 MiB)
MAX_IN_FLIGHT = 48  # tasks submitted and not yet written: bounds memory to ~2 x 48 MiB
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_ZERO_CLUSTER = bytes(CLUSTER)

# (guest cluster index, the bytes to store, whether they are deflated)
Cluster = tuple[int, bytes, bool]


def default_workers() -> int:
    """Threads to deflate with: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0))


def deflate_cluster(data: bytes, level: int = LEVEL) -> bytes | None:
    """A cluster deflated with qemu's parameters (at `level`), or None when that is not smaller than the cluster."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
    packed = compressor.compress(data) + compressor.flush()
    return packed if len(packed) < CLUSTER else None


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Exactly `length` bytes of fd at offset (pread may return less)."""
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise BuildError(f"the raw image ended at byte {offset} while being read")
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _read_and_deflate(fd: int, size: int, first: int, count: int, level: int) -> list[Cluster]:
    """Read guest clusters [first, first+count) and deflate each one that is not all zero (runs in a thread)."""
    start = first * CLUSTER
    data = _pread_exact(fd, min(count * CLUSTER, size - start), start)
    out: list[Cluster] = []
    for i in range(count):
        cluster = data[i * CLUSTER:(i + 1) * CLUSTER]
        if len(cluster) < CLUSTER:  # the last cluster of a size that is not a cluster multiple
            cluster += bytes(CLUSTER - len(cluster))
        if cluster == _ZERO_CLUSTER:
            continue
        packed = deflate_cluster(cluster, level)
        out.append((first + i, cluster, False) if packed is None else (first + i, packed, True))
    return out


def _batches(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(first cluster, count) of up to BATCH guest clusters at a time, in order, covering every data segment."""
    run_start, run_end = -1, -1  # the current run of clusters holding data, [start, end)
    for begin, end in data_ranges(fd, 0, size):
        first, last = begin // CLUSTER, (end + CLUSTER - 1) // CLUSTER
        if first <= run_end:  # touches the run (segments can share a cluster)
            run_end = max(run_end, last)
            continue
        if run_end > run_start:
            yield from _split(run_start, run_end)
        run_start, run_end = first, last
    if run_end > run_start:
        yield from _split(run_start, run_end)


def _split(start: int, end: int) -> Iterator[tuple[int, int]]:
    """Cut clusters [start, end) into (first, count) pieces of at most BATCH."""
    for first in range(start, end, BATCH):
        yield first, min(BATCH, end - first)


def _deflated_clusters(fd: int, size: int, workers: int, level: int) -> Generator[Cluster, None, None]:
    """Every non-zero guest cluster, deflated by `workers` threads, yielded in guest order.

    zlib releases the GIL while it deflates and os.pread while it reads, so threads run in parallel;
    at most MAX_IN_FLIGHT batches are read and not yet yielded, which bounds the memory used.
    """
    pending: deque[Future[list[Cluster]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcow2-deflate")
    try:
        for first, count in _batches(fd, size):
            pending.append(pool.submit(_read_and_deflate, fd, size, first, count, level))
            if len(pending) >= min(MAX_IN_FLIGHT, 4 * workers):
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of data at offset (pwrite may write less)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _big_endian(values: array[int]) -> bytes:
    """The array's bytes in big-endian order (qcow2 stores every number big-endian)."""
    if sys.byteorder == "little":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


class _Writer:
    """Places clusters and metadata in the image file, tracking host refcounts, the L2 table being filled and
    the L1 table.

    Space is handed out as qemu's qcow2 driver does: whole clusters at the end of the file (uncompressed
    data, tables), compressed clusters at a byte cursor that continues in the tail of the last cluster it
    used (qcow2_alloc_bytes), or across into the next cluster when that is the next one at the end.
    """

    def __init__(self, fd: int, virtual_size: int) -> None:
        self.fd = fd
        self.end = 0  # the file's end: the first host cluster not handed out
        self.free_byte = 0  # where the next compressed cluster may start (0: no cluster tail open)
        self.refcounts = array("H")  # per host cluster
        self.virtual_size = virtual_size
        self.l1 = array("Q", bytes(8 * -(-virtual_size // (CLUSTER * L2_ENTRIES))))
        self.l2_index = -1  # the L1 entry whose L2 table is being filled
        self.l2 = array("Q", bytes(8 * L2_ENTRIES))
        self.l2_used = False

    def _reference(self, start: int, length: int) -> None:
        """Add one to the refcount of each host cluster that bytes [start, start+length) touch."""
        first, last = start >> CLUSTER_BITS, (start + length - 1) >> CLUSTER_BITS
        if last >= len(self.refcounts):
            self.refcounts.frombytes(bytes(2 * (last + 1 - len(self.refcounts))))
        for cluster in range(first, last + 1):
            self.refcounts[cluster] += 1

    def _put_clusters(self, data: bytes) -> int:
        """Write data into new whole clusters at the end of the file (refcount one each); their offset."""
        offset = self.end
        self.end += -(-len(data) // CLUSTER) * CLUSTER
        self._reference(offset, self.end - offset)
        _pwrite_all(self.fd, data, offset)
        return offset

    def _put_compressed(self, data: bytes) -> int:
        """Write a deflated cluster at the byte cursor (or at the end of the file); its offset."""
        offset = self.free_byte
        if offset:
            tail_end = -(-offset // CLUSTER) * CLUSTER
            if offset + len(data) > tail_end and tail_end != self.end:
                offset = 0  # it does not fit and the next cluster is taken: leave the tail unused
        if not offset:
            offset = self.end
        while offset + len(data) > self.end:
            self.end += CLUSTER
        self._reference(offset, len(data))
        _pwrite_all(self.fd, data, offset)
        self.free_byte = (offset + len(data)) % CLUSTER and offset + len(data)
        return offset

    def _flush_l2(self) -> None:
        """Write the L2 table being filled, if it maps anything, and point its L1 entry at it."""
        if self.l2_used:
            self.l1[self.l2_index] = self._put_clusters(_big_endian(self.l2)) | COPIED
            self.l2 = array("Q", bytes(8 * L2_ENTRIES))
            self.l2_used = False

    def header_cluster(self) -> None:
        """Reserve cluster 0 for the header, written last."""
        self._put_clusters(_ZERO_CLUSTER)

    def add(self, index: int, data: bytes, compressed: bool) -> None:
        """Store guest cluster `index` (clusters must come in increasing order)."""
        if index // L2_ENTRIES != self.l2_index:
            self._flush_l2()
            self.l2_index = index // L2_ENTRIES
        if compressed:
            offset = self._put_compressed(data)
            extra_sectors = (offset + len(data) - 1) // SECTOR - offset // SECTOR
            entry = COMPRESSED | extra_sectors << CSIZE_SHIFT | offset
        else:
            entry = self._put_clusters(data) | COPIED
        self.l2[index % L2_ENTRIES] = entry
        self.l2_used = True

    def finish(self) -> None:
        """Write the last L2 table, the L1 table, the refcount blocks and table, then the header; the file
        ends at a cluster boundary."""
        self._flush_l2()
        l1_offset = self.end
        if len(self.l1):
            self._put_clusters(_big_endian(self.l1))
        reftable_offset, reftable_clusters = self._write_refcounts()
        os.ftruncate(self.fd, self.end)
        _pwrite_all(self.fd, _HEADER.pack(
            b"QFI\xfb", 3, 0, 0, CLUSTER_BITS, self.virtual_size, 0, len(self.l1), l1_offset,
            reftable_offset, reftable_clusters, 0, 0, 0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH), 0)

    def _write_refcounts(self) -> tuple[int, int]:
        """Write refcount blocks covering every host cluster (themselves and the table included), then the
        refcount table; return the table's offset and its size in clusters."""
        used = self.end // CLUSTER
        blocks, table = 0, 0
        while True:  # the blocks and the table need refcounts too: grow until they cover themselves
            need = (-(-(used + blocks + table) // REFCOUNTS_PER_BLOCK),
                    max(1, -(-blocks // REFTABLE_ENTRIES_PER_CLUSTER)))
            if need == (blocks, table):
                break
            blocks, table = need
        blocks_offset = self.end
        table_offset = blocks_offset + blocks * CLUSTER
        self.end = table_offset + table * CLUSTER
        self._reference(blocks_offset, self.end - blocks_offset)
        self.refcounts.frombytes(bytes(2 * (blocks * REFCOUNTS_PER_BLOCK - len(self.refcounts))))
        _pwrite_all(self.fd, _big_endian(self.refcounts), blocks_offset)
        offsets = array("Q", (blocks_offset + i * CLUSTER for i in range(blocks)))
        _pwrite_all(self.fd, _big_endian(offsets), table_offset)
        return table_offset, table


def write_compressed_qcow2(raw: Path, dest: Path, workers: int | None = None, level: int = LEVEL) -> None:
    """Write dest as a compressed qcow2 image of raw; the bytes do not depend on `workers`."""
    workers = max(1, workers or default_workers())
    fd = os.open(raw, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size % SECTOR:
            raise BuildError(f"the raw image {raw} is {size} bytes, not a multiple of {SECTOR}: "
                             "qcow2 readers count the virtual size in 512-byte sectors")
        if -(-size // (CLUSTER * L2_ENTRIES)) * 8 > MAX_L1_BYTES:
            raise BuildError(f"the raw image is {size} bytes: qcow2 with 64 KiB clusters holds at most "
                             f"{MAX_L1_BYTES // 8 * CLUSTER * L2_ENTRIES} (qemu refuses an L1 table over 32 MiB)")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writer = _Writer(out, size)
            writer.header_cluster()
            with closing(_deflated_clusters(fd, size, workers, level)) as clusters:
                for index, data, compressed in clusters:
                    writer.add(index, data, compressed)
            writer.finish()
        finally:
            os.close(out)
    finally:
        os.close(fd)
