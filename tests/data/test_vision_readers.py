"""advreg.data.vision: each official format written by an independent writer here, a few images each."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advreg.data import vision
from advreg.data.vision import READERS, VisionData, data_root, read

RNG = np.random.default_rng(0)


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)
    return message


def assert_pair(pair, images, labels):
    x, y = pair
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(np.asarray(images, dtype=np.uint8)))
    assert torch.equal(y, torch.tensor(labels, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ CIFAR binary


def cifar_record_bytes(image, label_bytes):
    """Bytes of one record, pixel by pixel: R plane, G plane, B plane, each row-major (as the CIFAR page says)."""
    pixels = bytearray(3072)
    for c in range(3):
        for r in range(32):
            for k in range(32):
                pixels[c * 1024 + r * 32 + k] = int(image[c, r, k])
    return bytes(label_bytes) + bytes(pixels)


def write_cifar_binary(path, images, labels, coarse=None):
    columns = ([coarse] if coarse is not None else []) + [labels]
    records = np.concatenate([np.stack(columns, 1).astype(np.uint8), images.reshape(len(images), -1)], axis=1)
    records.astype(np.uint8).tofile(path)


def test_cifar_record_layout_is_channel_planes_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    image = RNG.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    record = bytearray(cifar_record_bytes(image, 1))
    record[0] = 7
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(bytes(record))
    data = vision.read_cifar10(tmp_path)
    assert data.train[0].shape == (5, 3, 32, 32) and data.test[0].shape == (1, 3, 32, 32)
    assert torch.equal(data.test[0][0], torch.from_numpy(image))
    assert data.train[1].tolist() == [7] * 5


def test_cifar10_binary_round_trip_and_truncated_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    sizes = [2, 3, 1, 2, 2, 3]
    batches = [(RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), RNG.integers(0, 10, n)) for n in sizes]
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, (images, labels) in zip(names, batches):
        write_cifar_binary(folder / name, images, labels)
    data = read("cifar10", tmp_path)
    assert isinstance(data, VisionData) and data.num_classes == 10 and data.name == "cifar10"
    assert_pair(data.train, np.concatenate([b[0] for b in batches[:5]]), np.concatenate([b[1] for b in batches[:5]]))
    assert_pair(data.test, batches[5][0], batches[5][1])

    (folder / "data_batch_3.bin").write_bytes(bytes(1000))
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, folder / "data_batch_3.bin", "3073", "1000 bytes", "cifar-10-binary.tar.gz", tmp_path)
    (folder / "test_batch.bin").unlink()
    (folder / "data_batch_3.bin").write_bytes(b"")
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, "data_batch_3.bin")


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    splits = {}
    for name, n in (("train.bin", 4), ("test.bin", 3)):
        images = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine, coarse = RNG.integers(0, 100, n), RNG.integers(0, 20, n)
        write_cifar_binary(folder / name, images, fine, coarse=coarse)
        splits[name] = images, fine
    data = vision.read_cifar100(tmp_path)
    assert data.num_classes == 100
    assert_pair(data.train, *splits["train.bin"])
    assert_pair(data.test, *splits["test.bin"])
    with open(folder / "test.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar100(tmp_path)
    one_line_error(excinfo, folder / "test.bin", "3074", "cifar-100-binary.tar.gz")


def test_cifar_missing_folder_names_both_versions(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(
        excinfo, "cifar-10-batches-bin", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html"
    )


# ------------------------------------------------------------------------------------------ CIFAR python


def python2_pickle(batch_label: bytes, data: np.ndarray, labels: list[int], label_key: bytes) -> bytes:
    """What Python 2's ``cPickle.dump(batch, f, 2)`` writes, as in the official files: str (bytes) strings and
    numpy.core names, opcode by opcode."""
    n = len(data)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R("  # _reconstruct(...)
        b"K\x01M" + struct.pack("<H", n) + b"M\x00\x0c\x86"  # version 1, shape (n, 3072)
        b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (
        b"\x80\x02}(U\x0bbatch_labelU"
        + bytes([len(batch_label)])
        + batch_label
        + b"U"
        + bytes([len(label_key)])
        + label_key
        + label_list
        + b"U\x04data"
        + array
        + b"u."
    )


def test_python2_pickle_writer_is_a_valid_pickle():
    data = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
    loaded = pickle.loads(python2_pickle(b"b", data, [3, 4], b"labels"), encoding="bytes")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"labels"] == [3, 4]


@pytest.mark.parametrize("style", ["python2", "protocol2", "default", "protocol5", "str_keys"])
def test_cifar10_python_round_trip(tmp_path, style):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = int(RNG.integers(1, 4))
        data, labels = RNG.integers(0, 256, (n, 3072), dtype=np.uint8), RNG.integers(0, 10, n).tolist()
        expected.append((data.reshape(n, 3, 32, 32), labels))
        if style == "python2":
            (folder / name).write_bytes(python2_pickle(b"training batch", data, labels, b"labels"))
            continue
        batch = {
            b"batch_label": b"training batch",
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if style == "str_keys":
            batch = {k.decode(): v for k, v in batch.items()}
        protocol = {"protocol2": 2, "protocol5": 5}.get(style, pickle.DEFAULT_PROTOCOL)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    data = vision.read_cifar10(tmp_path)
    assert_pair(data.train, np.concatenate([e[0] for e in expected[:5]]), [v for e in expected[:5] for v in e[1]])
    assert_pair(data.test, *expected[5])


def test_cifar100_python_fine_labels_and_binary_preferred(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for name, n in (("train", 3), ("test", 2)):
        pixels, fine = RNG.integers(0, 256, (n, 3072), dtype=np.uint8), RNG.integers(0, 100, n).tolist()
        (folder / name).write_bytes(python2_pickle(b"x", pixels, fine, b"fine_labels"))
        data[name] = pixels.reshape(n, 3, 32, 32), fine
    read_back = vision.read_cifar100(tmp_path)
    assert_pair(read_back.train, *data["train"])
    assert_pair(read_back.test, *data["test"])

    binary = tmp_path / "cifar-100-binary"
    binary.mkdir()
    for name in ("train.bin", "test.bin"):
        write_cifar_binary(binary / name, np.zeros((1, 3, 32, 32), np.uint8), np.array([42]), coarse=np.array([1]))
    assert read("cifar100", tmp_path).train[1].tolist() == [42]


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsEval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "nested"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    evil = {
        "os.system": RunsCommand(f"echo pwned > {marker}"),
        "builtins.eval": CallsEval(f"open({str(marker)!r}, 'w')"),
        "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [RunsCommand(f"touch {marker}")]},
    }[payload]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(evil, f, protocol=2 if payload == "os.system" else pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    refused = "builtins.eval" if payload == "builtins.eval" else f"{os.system.__module__}.system"
    one_line_error(excinfo, folder / "data_batch_1", f"refusing to unpickle {refused}", "cifar-10-python.tar.gz")
    assert not marker.exists()


def test_pickle_of_other_data_or_codec_abuse_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # _codecs.encode is allowed for latin-1 only (what protocol 2 uses for bytes), not for other codecs
    abuse = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    (folder / "data_batch_1").write_bytes(abuse)
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, folder / "data_batch_1", "unreadable pickle")
    with open(folder / "data_batch_1", "wb") as f:  # object arrays are not plain data
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": np.array([0], dtype=object)}, f)
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, folder / "data_batch_1")
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, f)
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, folder / "data_batch_1", "float32")
    (folder / "data_batch_1").write_bytes(b"\x80\x02}(U\x04data")  # truncated
    with pytest.raises(ValueError) as excinfo:
        vision.read_cifar10(tmp_path)
    one_line_error(excinfo, folder / "data_batch_1", "unreadable pickle")


# ------------------------------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("in_subfolder", [False, True])
def test_svhn_mat_round_trip(tmp_path, compressed, in_subfolder):
    scipy_io = pytest.importorskip("scipy.io")
    folder = tmp_path / "svhn" if in_subfolder else tmp_path
    folder.mkdir(exist_ok=True)
    expected = {}
    for split, n in (("train", 5), ("test", 3)):
        images = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        digits = np.array([0, 1, 9, 0, 5][:n])
        labels = np.where(digits == 0, 10, digits).astype(np.float64 if split == "train" else np.uint8)
        mat = {
            "X": images.transpose(2, 3, 1, 0),
            "y": labels.reshape(n, 1),  # X(row, col, channel, n)
            "note": "cropped digits",
            "cell": np.array([1, "a"], dtype=object),
            "W": np.eye(2),
        }
        scipy_io.savemat(folder / f"{split}_32x32.mat", mat, do_compression=compressed)
        expected[split] = images, digits
    data = read("svhn", tmp_path)
    assert data.num_classes == 10 and data.name == "svhn"
    assert_pair(data.train, *expected["train"])
    assert_pair(data.test, *expected["test"])


def test_svhn_bad_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    with pytest.raises(ValueError) as excinfo:
        vision.read_svhn(tmp_path)
    one_line_error(
        excinfo, tmp_path / "svhn" / "train_32x32.mat", "no such file", "http://ufldl.stanford.edu/housenumbers/"
    )

    path = tmp_path / "train_32x32.mat"
    scipy_io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((4, 1))})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as excinfo:
        vision.read_svhn(tmp_path)
    one_line_error(excinfo, path, "truncated")

    scipy_io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((4, 1))}, do_compression=True)
    raw = bytearray(path.read_bytes())
    raw[-20:] = bytes(20)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as excinfo:
        vision.read_svhn(tmp_path)
    one_line_error(excinfo, path, "compressed")

    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan 1 2024 HDF5 schema 1.00 .".ljust(116)
    path.write_bytes(header + bytes(12) + bytes(384) + b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError) as excinfo:
        vision.read_svhn(tmp_path)
    one_line_error(excinfo, path, "v7.3", "HDF5")

    scipy_io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.full((4, 1), 11.0)})
    with pytest.raises(ValueError) as excinfo:
        vision.read_svhn(tmp_path)
    one_line_error(excinfo, path, "labels 1..10")


# ------------------------------------------------------------------------------------------------ GTSRB


def write_ppm(path, image, comment=False):
    """``image`` uint8 (H, W, 3) as a binary PPM."""
    height, width = image.shape[:2]
    header = b"P6\n" + (b"# written by the test\n" if comment else b"") + f"{width} {height}\n255\n".encode()
    path.write_bytes(header + image.tobytes())


def write_gtsrb_csv(path, rows):
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    lines += [";".join(str(v) for v in row) for row in rows]
    path.write_text("\r\n".join(lines) + "\r\n")


def make_gtsrb(root, test_csv_in_images=False):
    """Three classes, images of different sizes; returns {split: [(image (H, W, 3), roi, label)]}."""
    written = {"train": [], "test": []}
    train = root / "GTSRB" / "Final_Training" / "Images"
    for label, sizes in ((0, [(30, 31), (45, 40)]), (2, [(29, 29)]), (13, [(60, 52), (30, 31)])):
        folder = train / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i, (h, w) in enumerate(sizes):
            image = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"00000_{i:05d}.ppm"
            write_ppm(folder / name, image, comment=i == 0)
            roi = (5, 6, w - 6, h - 5)
            rows.append((name, w, h, *roi, label))
            written["train"].append((image, roi, label))
        write_gtsrb_csv(folder / f"GT-{label:05d}.csv", rows)
    test = root / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = []
    for i, ((h, w), label) in enumerate(zip([(33, 35), (100, 90), (32, 32)], [13, 0, 42])):
        image = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        write_ppm(test / f"{i:05d}.ppm", image)
        roi = (5, 5, w - 7, h - 6)
        rows.append((f"{i:05d}.ppm", w, h, *roi, label))
        written["test"].append((image, roi, label))
    write_gtsrb_csv((test if test_csv_in_images else root / "GTSRB") / "GT-final_test.csv", rows)
    write_gtsrb_csv(test / "GT-final_test.test.csv", [r[:-1] for r in rows])  # the unlabelled official one
    return written


def reference_resize(image, roi=None):
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    if roi is not None:
        x1, y1, x2, y2 = roi
        chw = chw[:, y1 : y2 + 1, x1 : x2 + 1]
    out = F.interpolate(chw[None], size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("crop_roi", [False, True])
@pytest.mark.parametrize("test_csv_in_images", [False, True])
def test_gtsrb_round_trip(tmp_path, crop_roi, test_csv_in_images):
    written = make_gtsrb(tmp_path, test_csv_in_images)
    data = read("gtsrb", tmp_path, crop_roi=crop_roi)
    assert data.num_classes == 43 and data.name == "gtsrb"
    for pair, rows in ((data.train, written["train"]), (data.test, written["test"])):
        x, y = pair
        assert x.shape == (len(rows), 3, 32, 32) and x.dtype == torch.uint8
        assert y.tolist() == [label for _, _, label in rows]
        for got, (image, roi, _) in zip(x, rows):
            assert torch.equal(got, reference_resize(image, roi if crop_roi else None))


def test_gtsrb_missing_or_bad_files(tmp_path):
    make_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "00000_00000.ppm").unlink()
    with pytest.raises(ValueError) as excinfo:
        vision.read_gtsrb(tmp_path)
    one_line_error(
        excinfo,
        tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "00000_00000.ppm",
        "no such file",
        "PPM",
        "GTSRB_Final_Training_Images.zip",
    )
    write_ppm(
        tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "00000_00000.ppm", np.zeros((29, 28, 3), np.uint8)
    )
    with pytest.raises(ValueError) as excinfo:
        vision.read_gtsrb(tmp_path)
    one_line_error(excinfo, "00000_00000.ppm", "28×29")
    path = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "00000_00000.ppm"
    path.write_bytes(b"P6\n29 29\n255\n" + bytes(100))
    with pytest.raises(ValueError) as excinfo:
        vision.read_gtsrb(tmp_path)
    one_line_error(excinfo, path, "100 pixel bytes")
    write_ppm(path, np.zeros((29, 29, 3), np.uint8))
    (tmp_path / "GTSRB" / "GT-final_test.csv").unlink()
    with pytest.raises(ValueError) as excinfo:
        vision.read_gtsrb(tmp_path)
    one_line_error(excinfo, "GT-final_test.csv", "GTSRB_Final_Test_GT.zip", "no ClassId")


# ---------------------------------------------------------------------------------------- Tiny-ImageNet


def smooth_image(seed):
    """A smooth 64×64 RGB image, which JPEG at quality 100 keeps within a few levels."""
    rows, cols = np.mgrid[0:64, 0:64]
    base = np.array([40, 90, 150]) + 20 * seed
    return np.clip(base[None, None] + rows[..., None] + cols[..., None] // 2, 0, 255).astype(np.uint8)


def test_tinyimagenet_round_trip(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03000000", "n01000000", "n02000000"]  # sorted order: n01 -> 0, n02 -> 1, n03 -> 2
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train = []
    for k, wnid in enumerate(sorted(wnids)):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            image = smooth_image(k + i)
            mode = "L" if (k, i) == (1, 1) else "RGB"  # some official images are grayscale
            Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(
                folder / f"{wnid}_{i}.JPEG", quality=100, subsampling=0
            )
            train.append((np.repeat(image[..., :1], 3, 2) if mode == "L" else image, k))
    val, lines = [], []
    for i, wnid in enumerate(["n02000000", "n03000000", "n01000000"]):
        image = smooth_image(i + 2)
        Image.fromarray(image).save(base / "val" / "images" / f"val_{i}.JPEG", quality=100, subsampling=0)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        val.append((image, sorted(wnids).index(wnid)))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    data = read("tinyimagenet", tmp_path)
    assert data.num_classes == 3 and data.name == "tinyimagenet"
    for (x, y), rows in ((data.train, train), (data.test, val)):
        assert x.shape == (len(rows), 3, 64, 64) and x.dtype == torch.uint8
        assert y.tolist() == [label for _, label in rows]
        expected = torch.from_numpy(np.stack([image for image, _ in rows])).permute(0, 3, 1, 2)
        assert (x.int() - expected.int()).abs().max() <= 4

    (base / "val" / "images" / "val_1.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError) as excinfo:
        vision.read_tinyimagenet(tmp_path)
    one_line_error(excinfo, base / "val" / "images" / "val_1.JPEG", "JPEG", "tiny-imagenet-200.zip")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError) as excinfo:
        vision.read_tinyimagenet(tmp_path)
    one_line_error(excinfo, "val_annotations.txt", "n09999999")


# ----------------------------------------------------------------------------------------------- lookup


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("ADVREG_DATA", raising=False)
    with pytest.raises(ValueError) as excinfo:
        data_root(None)
    one_line_error(excinfo, "--data-dir", "ADVREG_DATA")
    with pytest.raises(ValueError) as excinfo:
        read("cifar10")
    one_line_error(excinfo, "ADVREG_DATA")
    monkeypatch.setenv("ADVREG_DATA", str(tmp_path))
    assert data_root(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert data_root(str(other)) == other
    with pytest.raises(ValueError) as excinfo:
        data_root(str(tmp_path / "missing"))
    one_line_error(excinfo, tmp_path / "missing", "not a directory")


def test_unknown_name_lists_the_readers(tmp_path):
    assert set(READERS) == {"cifar10", "cifar100", "svhn", "gtsrb", "tinyimagenet"}
    with pytest.raises(ValueError) as excinfo:
        read("nope", tmp_path)
    one_line_error(excinfo, "'nope'", *READERS)
