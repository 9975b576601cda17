"""Disk space at real size (issue [9]): a whole Flash artifact is ~156 GB. Writers refuse, before writing, a
destination whose filesystem has no room (models/files.py check_space: the plan's bytes on disk, holes of a sparse
source excluded), and a disk that fills up while they write becomes one clear error with nothing left behind."""

from __future__ import annotations

import errno
import os
from collections import namedtuple

import onnx_ir as ir
import pytest

from dsv4.export import export as export_mod
from dsv4.export.stream import ALIGN
from dsv4.export.weights import CheckpointSource
from dsv4.models import files
from dsv4.models.checkpoint_write import official_entries, write_synthetic
from dsv4.models.config import preset
from dsv4.models.files import RESERVE, DiskSpaceError, allocated_bytes, check_space, writing_dir
from dsv4.tools.cli import main

MiB = 1 << 20
Usage = namedtuple("Usage", "total used free")
GRAPH_DTYPE = {"F8_E4M3": ir.DataType.FLOAT8E4M3FN, "I8": ir.DataType.INT8, "F8_E8M0": ir.DataType.UINT8,
               "F32": ir.DataType.FLOAT, "BF16": ir.DataType.BFLOAT16}


def _free(monkeypatch, free: int) -> None:
    """The filesystem reports `free` bytes free (everywhere, for the test's duration)."""
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: Usage(10 * free, 9 * free, free))


def _leftovers(d):
    return sorted(p.name for p in d.iterdir())


def test_allocated_bytes_counts_data_and_not_holes(tmp_path):
    p = tmp_path / "sparse.bin"
    with open(p, "wb") as f:  # 1 MiB data | 8 MiB hole | 1 MiB data | 2 MiB hole
        f.write(b"\x01" * MiB)
        f.seek(9 * MiB)
        f.write(b"\x02" * MiB)
        f.truncate(12 * MiB)
    if allocated_bytes(p, MiB, 8 * MiB) == 8 * MiB:
        pytest.skip("this filesystem does not report holes (SEEK_DATA)")
    assert allocated_bytes(p, 0, 12 * MiB) == 2 * MiB
    assert allocated_bytes(p, MiB, 8 * MiB) == 0
    assert allocated_bytes(p, MiB // 2, 9 * MiB) == MiB  # half of each data run
    assert allocated_bytes(p, 10 * MiB, 2 * MiB) == 0  # the trailing hole (ENXIO)


def test_check_space_names_the_sizes_and_keeps_a_reserve(tmp_path, monkeypatch):
    _free(monkeypatch, RESERVE + 2_000_000_000)
    check_space(tmp_path, 2_000_000_000, "--out x")  # exactly fits with the reserve
    with pytest.raises(DiskSpaceError, match=r"^--out x: needs 2\.00 GB of disk \(\+ 0\.27 GB kept free\); the "
                                             rf"filesystem of {tmp_path} has 2\.27 GB free; nothing was written$"):
        check_space(tmp_path, 2_000_000_001, "--out x")


def test_checkpoint_make_refuses_a_disk_without_room_and_writes_nothing(tmp_path, monkeypatch, capsys):
    total = sum(e.nbytes for group in official_entries(preset("tiny")) for e in group)
    _free(monkeypatch, RESERVE + total // 2)
    out = tmp_path / "ck"
    assert main(["checkpoint", "make", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: checkpoint make {out}: needs {total / 1e9:.2f} GB of disk")
    assert f"the filesystem of {tmp_path} has" in err  # the directory the user named, not a temporary
    assert _leftovers(tmp_path) == []
    assert main(["checkpoint", "make", "--preset", "tiny", "--out", str(tmp_path / "forced"), "--no-space-check"]) == 0
    # a sparse checkpoint takes no data blocks: the same disk holds it
    assert main(["checkpoint", "make", "--preset", "tiny", "--sparse", "--out", str(out)]) == 0
    assert (out / "config.json").exists()


def test_a_disk_that_fills_while_writing_leaves_the_old_output(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(DiskSpaceError, match=rf"^--out: the filesystem of {tmp_path} filled up while writing {out} "
                                             r"\(No space left on device\); the partial write was removed"):
        with writing_dir(out, overwrite=True) as tmp:
            (tmp / "weights.data").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert _leftovers(tmp_path) == ["art"] and (out / "manifest.json").read_text() == "old"
    with pytest.raises(OSError, match="Permission"):  # other write errors pass through unchanged
        with writing_dir(out, overwrite=True):
            raise PermissionError(errno.EACCES, "Permission denied")


def _graph_of(src: CheckpointSource, names: list[str]) -> ir.Model:
    """A graph whose initializers are checkpoint tensors the writer copies byte for byte."""
    g = ir.Graph([], [], nodes=[], name="g")
    for n in names:
        t = src.ck.tensors[n]
        dt, shape = GRAPH_DTYPE[t.dtype], ir.Shape(list(t.shape))
        v = ir.Value(name=n, shape=shape, type=ir.TensorType(dt),
                     const_value=ir.ExternalTensor(export_mod.PENDING, 0, t.nbytes, dt, shape=shape, name=n))
        g.register_initializer(v)
    return ir.Model(g, ir_version=10)


def test_the_weights_writer_asks_for_its_bytes_on_disk_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    """disk_bytes = every tensor's bytes (aligned); from a sparse checkpoint only what is not a hole. A refusal
    comes before the weights file exists."""
    sparse = write_synthetic(preset("tiny"), tmp_path / "sparse", sparse=True, shard_size="256KB", progress=False)
    asked = {}
    for kind, ck in (("real", tiny_checkpoint), ("sparse", sparse)):
        src = CheckpointSource(ck)
        names = sorted(n for n, t in src.ck.tensors.items() if t.dtype in GRAPH_DTYPE)
        expect = sum(src.ck.tensors[n].nbytes + ALIGN for n in names)
        out = tmp_path / f"{kind}.data"
        stats = export_mod.bind_weights({"g": _graph_of(src, names)}, src, {}, {}, out,
                                        space=lambda n, kind=kind: asked.setdefault(kind, n))
        assert stats["copied_bytes"] == expect - ALIGN * len(names)
        asked[f"{kind} expect"] = expect
        asked[f"{kind} shards"] = len({src.ck.tensors[n].file for n in names})
        src.close()
    assert asked["real"] == asked["real expect"]
    # the sparse shards' data is holes; a block shared with a shard's header may count (4 KiB per shard at most)
    assert ALIGN * len(names) <= asked["sparse"] <= ALIGN * len(names) + 4096 * asked["sparse shards"]
    _free(monkeypatch, RESERVE + asked["real"] - 1)
    src = CheckpointSource(tiny_checkpoint)
    with pytest.raises(DiskSpaceError, match=r"needs 0\.\d\d GB of disk"):
        export_mod.bind_weights({"g": _graph_of(src, names)}, src, {}, {}, tmp_path / "refused.data",
                                space=lambda n: check_space(tmp_path, n, "--out x"))
    assert not (tmp_path / "refused.data").exists()


def test_a_full_disk_while_writing_weights_raises_and_closes(tiny_checkpoint, tmp_path, monkeypatch):
    """ENOSPC from the weights file's write (after the check passed: another writer took the space) reaches the
    caller as that OSError; inside an artifact's writing_dir it becomes a DiskSpaceError and nothing is left."""
    from dsv4.export import artifact, stream

    src = CheckpointSource(tiny_checkpoint)
    names = sorted(n for n, t in src.ck.tensors.items() if t.dtype in GRAPH_DTYPE)
    real = stream.WeightsFile._out

    def full(self, view):
        if self.offset > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, view)

    def no_flush(fd):  # a failed file is closed without truncate + fsync (another error would mask ENOSPC)
        raise AssertionError("fsync of a failed weights file")

    monkeypatch.setattr(stream.WeightsFile, "_out", full)
    monkeypatch.setattr(stream.os, "fsync", no_flush)
    with pytest.raises(OSError) as e:  # outside a writing directory: the OSError itself
        export_mod.bind_weights({"g": _graph_of(src, names)}, src, {}, {}, tmp_path / "plain.data")
    assert e.value.errno == errno.ENOSPC
    (tmp_path / "plain.data").unlink()
    out = tmp_path / "art"
    with pytest.raises(DiskSpaceError, match="filled up while writing"):
        with artifact.writing(out) as tmp:
            export_mod.bind_weights({"g": _graph_of(src, names)}, src, {}, {}, tmp / "weights.data")
    assert _leftovers(tmp_path) == []


def test_export_refuses_a_disk_without_room_before_writing_weights(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`dsv4 export`: one line naming --out and the sizes, exit 2, nothing under the parent; --no-space-check
    writes anyway (a filesystem whose free count is wrong, e.g. compressed or thin-provisioned)."""
    _free(monkeypatch, RESERVE + 1000)
    out = tmp_path / "art"
    cmd = ["export", str(tiny_checkpoint), "--layers", "1", "--no-passes", "--no-progress", "--out", str(out)]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --out {out}: needs 0.0") and err.endswith("nothing was written")
    assert _leftovers(tmp_path) == []
    assert main([*cmd, "--no-space-check"]) == 0
    assert (out / "weights.data").stat().st_size > 1000


def test_without_seek_data_every_byte_is_data(tmp_path, monkeypatch):
    """A filesystem without SEEK_DATA (EINVAL): allocated_bytes counts the whole range and the writer copies it
    (an error other than ENXIO is not a hole: that would turn weights into zeros)."""
    from dsv4.export import stream

    src = tmp_path / "src.bin"
    payload = bytes(range(256)) * 4096  # 1 MiB
    src.write_bytes(payload)
    real = os.lseek

    def lseek(fd, pos, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    assert allocated_bytes(src, 1000, 5000) == 5000
    wf = stream.WeightsFile(tmp_path / "w.data")
    wf.copy(src, 1000, 5000)
    wf.close()
    assert (tmp_path / "w.data").read_bytes() == payload[1000:6000]


def test_a_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    """writing_dir moves an existing --out aside before renaming the new one in; if that rename fails (e.g. ENOSPC
    on a filesystem that allocates directory blocks), the old output is renamed back: "as it was" holds."""
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # the new directory into place
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(DiskSpaceError, match="is as it was"):
        with writing_dir(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert _leftovers(tmp_path) == ["art"] and (out / "manifest.json").read_text() == "old"
