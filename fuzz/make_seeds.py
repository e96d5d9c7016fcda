"""Writes the crafted seed corpus of the fuzz targets into fuzz/corpus/<target>/.

Files named seed-* are valid inputs; hostile-* are the attacks of issue 8 (truncated and corrupt
images, decompression bombs, safetensors with absurd header lengths or offsets, hostile names,
non-finite or absurd coefficients, ...). The corpus tests in atlas-core and atlas-clip replay
every file and check that each hostile seed is refused with a message naming the problem.

Needs numpy and Pillow. Run from the repository root: python fuzz/make_seeds.py
"""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent / "corpus"

# The manifest of fuzz/src/core_harness.rs: name -> shape.
MANIFEST = {"emb": [4, 3], "q": [2, 3], "k": [2, 3], "v": [2, 3], "bias": [5], "proj": [2, 2]}


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# ---------------------------------------------------------------- images


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w, h, mode="RGB"):
    rng = np.random.default_rng(w * 1000 + h)
    arr = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    return Image.fromarray(arr, "RGBA").convert(mode)


def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(w, h, bit_depth=8, color=2, rows=None):
    """A PNG whose IHDR says w x h; its IDAT holds `rows` (default: one small row of zeros)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    raw = rows if rows is not None else b"\x00" * 16
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(w, h):
    """A real 16 x 16 baseline JPEG whose frame header (SOF0) is patched to say w x h."""
    data = bytearray(encode(gradient(16, 16, "L"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def webp_lossless_claiming(w, h):
    """A real 16 x 16 lossless WebP whose VP8L header is patched to say w x h (<= 16384)."""
    data = bytearray(encode(gradient(16, 16), "WEBP", lossless=True))
    vp8l = data.index(b"VP8L") + 8
    assert data[vp8l] == 0x2F
    bits = struct.unpack("<I", data[vp8l + 1 : vp8l + 5])[0]
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
    data[vp8l + 1 : vp8l + 5] = struct.pack("<I", bits)
    return bytes(data)


def images():
    t = "image_preprocess"
    png = encode(gradient(40, 30), "PNG")
    jpg = encode(gradient(40, 30), "JPEG", quality=90)
    webp = encode(gradient(24, 18), "WEBP", quality=80)
    write(t, "seed-rgb-40x30.png", png)
    write(t, "seed-rgba-17x23.png", encode(gradient(17, 23, "RGBA"), "PNG"))
    write(t, "seed-gray-16x16.png", encode(gradient(16, 16, "L"), "PNG"))
    write(t, "seed-palette-12x12.png", encode(gradient(12, 12).convert("P"), "PNG"))
    arr16 = (np.arange(9 * 7, dtype=np.uint16).reshape(7, 9) * 1000).astype(np.uint16)
    write(t, "seed-gray16-9x7.png", encode(Image.fromarray(arr16), "PNG"))
    write(t, "seed-interlaced-30x20.png", interlaced_png(30, 20))
    write(t, "seed-1x1.png", encode(gradient(1, 1), "PNG"))
    write(t, "seed-1x300.png", encode(gradient(1, 300), "PNG"))
    write(t, "seed-rgb-40x30.jpg", jpg)
    write(t, "seed-progressive-33x21.jpg", encode(gradient(33, 21), "JPEG", progressive=True))
    write(t, "seed-gray-20x20.jpg", encode(gradient(20, 20, "L"), "JPEG"))
    write(t, "seed-1x1.jpg", encode(gradient(1, 1), "JPEG"))
    write(t, "seed-rgb-24x18.webp", webp)
    write(t, "seed-rgba-15x15-lossless.webp", encode(gradient(15, 15, "RGBA"), "WEBP", lossless=True))
    write(t, "seed-1x1.webp", encode(gradient(1, 1), "WEBP", lossless=True))

    write(t, "hostile-empty", b"")
    write(t, "hostile-not-an-image", b"this is plain text, not an image\n" * 4)
    write(t, "hostile-gif", encode(gradient(8, 8).convert("P"), "GIF"))
    write(t, "hostile-truncated-png", png[: len(png) // 2])
    write(t, "hostile-truncated-jpeg", jpg[: len(jpg) // 2])
    write(t, "hostile-truncated-webp", webp[: len(webp) // 2])
    write(t, "hostile-png-signature-only", png[:8])
    write(t, "hostile-jpeg-soi-only", b"\xff\xd8\xff")
    write(t, "hostile-corrupt-png-crc", flip(png, png.index(b"IDAT") + 6, 32))
    # Corrupt entropy-coded data is not detectable in general: it decodes to other pixels.
    write(t, "seed-corrupt-jpeg-scan-decodes", flip(jpg, len(jpg) // 2, 64))
    dht = jpg.index(b"\xff\xc4")
    write(t, "hostile-corrupt-jpeg-huffman-table", flip(jpg, dht + 4, 20))
    write(t, "hostile-corrupt-webp", flip(webp, 30, 40))
    write(t, "hostile-png-50000x50000", png_claiming(50000, 50000))
    write(t, "hostile-png-zero-width", png_claiming(0, 10))
    write(t, "hostile-jpeg-65535x65535", jpeg_claiming(65535, 65535))
    write(t, "hostile-jpeg-zero-height", jpeg_claiming(16, 0))
    write(t, "hostile-webp-16000x16000", webp_lossless_claiming(16000, 16000))
    # image-webp 0.2.4 reads a VP8L side of 16384 as 0 ((1 + bits) & 0x3FFF).
    write(t, "hostile-webp-16384-reads-as-zero", webp_lossless_claiming(16384, 16384))
    # A real decompression bomb: 6000 x 6000 (36 M pixels, over the 32 Mi default), 1 bit
    # a pixel, zlib-compressed to a few KB.
    row = b"\x00" + b"\x00" * (6000 // 8)
    write(t, "hostile-png-bomb-6000x6000", png_claiming(6000, 6000, 1, 0, row * 6000))
    # A RIFF size of 4 GiB is ignored: the decoder follows the chunk sizes, no allocation follows.
    riff = bytearray(webp)
    riff[4:8] = struct.pack("<I", 0xFFFFFFFF)
    write(t, "seed-webp-riff-size-4g-decodes", bytes(riff))
    write(t, "hostile-truncated-progressive-jpeg", encode(gradient(33, 21), "JPEG", progressive=True)[:-300])


def interlaced_png(w, h):
    """An Adam7-interlaced RGB PNG (Pillow cannot write one)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    raw = b""
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    for x0, y0, dx, dy in passes:
        sub = pixels[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        for line in sub:
            raw += b"\x00" + line.tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def flip(data, start, n):
    out = bytearray(data)
    for i in range(start, min(start + n, len(out))):
        out[i] ^= 0x5A
    return bytes(out)


# ---------------------------------------------------------------- safetensors

DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def safetensors(tensors, metadata=None, header_extra=None):
    """tensors: list of (name, dtype, shape, array or raw bytes). Offsets are laid end to end."""
    header, blobs, offset = {}, [], 0
    for name, dtype, shape, data in tensors:
        raw = data if isinstance(data, bytes) else np.asarray(data, DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_extra:
        header.update(header_extra)
    return with_header(json.dumps(header).encode(), b"".join(blobs))


def with_header(header, data):
    pad = (8 - len(header) % 8) % 8
    header += b" " * pad
    return struct.pack("<Q", len(header)) + header + data


def values(shape, seed, dtype="F32"):
    n = int(np.prod(shape))
    return np.sin(np.arange(n) * 0.37 + seed).astype(DTYPES[dtype]).reshape(shape)


def full(dtype="F32", skip=(), replace=None, extra=(), metadata=None):
    replace = replace or {}
    out = []
    for i, (name, shape) in enumerate(MANIFEST.items()):
        if name in skip:
            continue
        out.append(replace.get(name, (name, dtype, shape, values(shape, i, dtype))))
    return safetensors(out + list(extra), metadata)


def task_vectors():
    t = "task_vector"
    meta = {"name": "seed", "base_model": "tiny", "source": "make_seeds.py"}
    write(t, "seed-full-f32", full("F32", metadata=meta))
    write(t, "seed-no-proj-f16", full("F16", skip=("proj",)))
    write(t, "seed-f64-with-int-buffer", full("F64", extra=[("position_ids", "I64", [1, 3], [[0, 1, 2]])]))

    write(t, "hostile-empty", b"")
    write(t, "hostile-too-short", b"\x10\x00\x00")
    write(t, "hostile-no-tensors", safetensors([], {"name": "empty"}))
    write(t, "hostile-header-len-2pow63", struct.pack("<Q", 1 << 63) + b'{"emb":{}}')
    write(t, "hostile-header-len-u64-max", struct.pack("<Q", (1 << 64) - 1) + b"{}")
    write(t, "hostile-header-len-past-end", struct.pack("<Q", 1000) + b'{"__metadata__":{}}')
    write(t, "hostile-header-not-utf8", with_header(b'{"\xff\xfe":1}', b""))
    write(t, "hostile-header-not-json", with_header(b"{not json at all", b""))
    write(t, "hostile-header-array", with_header(b"[1, 2, 3]", b""))
    write(t, "hostile-header-deep-nesting", with_header(b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}", b""))
    good = full("F32")
    hdr_len = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + hdr_len])
    data = good[8 + hdr_len :]

    def variant(name, edit, data=data):
        h = json.loads(json.dumps(header))
        edit(h)
        write(t, name, with_header(json.dumps(h).encode(), data))

    variant("hostile-offsets-overlap", lambda h: h["k"].update(data_offsets=[h["q"]["data_offsets"][0], h["q"]["data_offsets"][0] + 24]))
    variant("hostile-offsets-gap", lambda h: h["bias"].update(data_offsets=[h["bias"]["data_offsets"][0] + 4, h["bias"]["data_offsets"][1] + 4]))
    variant("hostile-offsets-out-of-range", lambda h: h["emb"].update(data_offsets=[10**12, 10**12 + 48]))
    variant("hostile-offsets-past-u64", lambda h: h["emb"].update(data_offsets=[0, 2**70]))
    variant("hostile-offsets-reversed", lambda h: h["emb"].update(data_offsets=[48, 0]))
    variant("hostile-offsets-size-mismatch", lambda h: h["emb"].update(data_offsets=[0, 40]))
    variant("hostile-trailing-bytes", lambda h: None, data + b"\x00" * 16)
    variant("hostile-unknown-dtype", lambda h: h["emb"].update(dtype="F128"))
    variant("hostile-shape-overflow", lambda h: h["emb"].update(shape=[2**40, 2**40, 2**40]))
    variant("hostile-wrong-shape", lambda h: h["emb"].update(shape=[3, 4]))
    variant("hostile-wrong-dtype", lambda h: h["emb"].update(dtype="I32"))
    variant("hostile-meta-not-strings", lambda h: h.update(__metadata__={"name": 5}))
    variant("hostile-meta-name-dotdot", lambda h: h.update(__metadata__={"name": "../../etc/passwd"}))
    variant("hostile-meta-name-nul", lambda h: h.update(__metadata__={"name": "evil\u0000.safetensors"}))
    variant("hostile-meta-name-long-unicode", lambda h: h.update(__metadata__={"name": "\u00e9\U0001F600" * 3000}))
    variant("hostile-name-dotdot", lambda h: h.update({"../../etc/passwd": h.pop("emb")}))
    variant("hostile-name-nul", lambda h: h.update({"emb\u0000/x": h.pop("emb")}))
    variant("hostile-name-long-unicode", lambda h: h.update({"\u0416\U0001F4A5" * 3000: h.pop("emb")}))
    variant("hostile-name-empty", lambda h: h.update({"": h.pop("emb")}))
    write(t, "hostile-duplicate-tensor", duplicate_key(good))
    write(t, "hostile-nan-value", full(replace={"bias": ("bias", "F32", [5], [0, 1, float("nan"), 3, 4])}))
    write(t, "hostile-inf-value", full(replace={"bias": ("bias", "F32", [5], [0, 1, 2, float("-inf"), 4])}))
    write(t, "hostile-f16-overflow", full(replace={"bias": ("bias", "F32", [5], [0, 1, 2, 3, 1e10])}))
    write(t, "hostile-f64-overflow", full("F64", replace={"emb": ("emb", "F64", [4, 3], np.full((4, 3), 1e300))}))
    write(t, "hostile-missing-tensor", full(skip=("bias",)))
    write(t, "hostile-extra-float-tensor", full(extra=[("extra", "F32", [2], [1.0, 2.0])]))


def duplicate_key(good):
    """The same file with an `emb` entry (F16 [4, 6], as many bytes) written before the real one:
    JSON parsers disagree on which of repeated keys wins."""
    n = struct.unpack("<Q", good[:8])[0]
    text = good[8 : 8 + n].decode().rstrip()
    h = json.loads(text)
    first = dict(h["emb"], dtype="F16", shape=[4, 6])
    text = text[:1] + f'"emb": {json.dumps(first)}, ' + text[1:]
    return with_header(text.encode(), good[8 + n :])


# ---------------------------------------------------------------- coefficients


def coefficient_seeds():
    t = "coefficients"

    def req(tvs, layout, vals):
        return json.dumps({"task_vectors": tvs, "layout": layout, "values": vals})

    iso = {"kind": "isotropic"}
    pb = {"kind": "per_block"}
    write(t, "seed-isotropic", req(["a", "b"], iso, [0.5, -1.0]))
    write(t, "seed-per-block", req(["c"], pb, [0.1, 0.2, -0.3, 0.0]))
    write(t, "seed-per-part-k2", req(["a", "b"], {"kind": "per_part", "k": 2, "seed": 7}, [0.25] * 16))
    write(t, "seed-largest-magnitude", req(["a", "b", "c"], iso, [1e6, -1e6, 1e6]))
    write(t, "seed-stored", json.dumps({"layout": pb, "n_tv": 1, "n_blocks": 4, "values": [0.5, 0, -1, 2]}))

    write(t, "hostile-empty", "")
    write(t, "hostile-not-json", "coefficients: 0.5, 0.5")
    write(t, "hostile-nan-token", '{"task_vectors":["a"],"layout":{"kind":"isotropic"},"values":[NaN]}')
    write(t, "hostile-nan-string", req(["a"], iso, ["NaN"]))
    write(t, "hostile-infinity", '{"task_vectors":["a"],"layout":{"kind":"isotropic"},"values":[Infinity]}')
    write(t, "hostile-1e308", req(["a", "b"], iso, [0.5, 1e308]))
    write(t, "hostile-minus-1e308-per-block", req(["b"], pb, [0.0, 0.0, -1e308, 0.0]))
    write(t, "hostile-1e309", '{"task_vectors":["a"],"layout":{"kind":"isotropic"},"values":[1e309]}')
    write(t, "hostile-just-over-max", req(["a"], iso, [1000000.5]))
    write(t, "hostile-k0", req(["a"], {"kind": "per_part", "k": 0, "seed": 0}, []))
    write(t, "hostile-k1e9", req(["a"], {"kind": "per_part", "k": 10**9, "seed": 0}, [0.0]))
    write(t, "hostile-k-negative", '{"task_vectors":["a"],"layout":{"kind":"per_part","k":-1,"seed":0},"values":[]}')
    write(t, "hostile-k-1e30", '{"task_vectors":["a"],"layout":{"kind":"per_part","k":1e30,"seed":0},"values":[]}')
    write(t, "hostile-wrong-count", req(["a", "b"], pb, [0.5] * 7))
    write(t, "hostile-unknown-tv", req(["a", "nope"], iso, [0.5, 0.5]))
    write(t, "hostile-duplicate-tv", req(["a", "a"], iso, [0.5, 0.5]))
    write(t, "hostile-no-tvs", req([], iso, []))
    write(t, "hostile-tv-name-nul", req(["a\u0000b"], iso, [0.5]))
    write(t, "hostile-tv-name-long-unicode", req(["\u00e9\U0001F600" * 3000], iso, [0.5]))
    write(t, "hostile-unknown-layout", req(["a"], {"kind": "per_galaxy"}, [0.5]))
    write(t, "hostile-wrong-types", '{"task_vectors":"a","layout":"isotropic","values":{"a":1}}')
    write(t, "hostile-deep-nesting", '{"extra":' + "[" * 5000 + "]" * 5000 + "}")
    write(t, "hostile-stored-k1e9", json.dumps({"layout": {"kind": "per_part", "k": 10**9, "seed": 0}, "n_tv": 1, "n_blocks": 1, "values": []}))
    write(t, "hostile-stored-huge-shape", json.dumps({"layout": pb, "n_tv": 2**62, "n_blocks": 2**62, "values": [1.0]}))
    # Found reviewing the harness: few values, a huge grid that expanded() would allocate.
    write(t, "hostile-stored-isotropic-2pow40-blocks", json.dumps({"layout": iso, "n_tv": 1, "n_blocks": 2**40, "values": [0.5]}))
    write(t, "hostile-stored-1e308", json.dumps({"layout": iso, "n_tv": 1, "n_blocks": 4, "values": [1e308]}))


if __name__ == "__main__":
    images()
    task_vectors()
    coefficient_seeds()
    for d in sorted(ROOT.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")
