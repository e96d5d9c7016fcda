//! Parity of `atlas_clip::preprocess` with Hugging Face's CLIPImageProcessor (PIL backend).
//! Fixtures come from tests/fixtures/make_preprocess_reference.py.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use atlas_clip::preprocess::{
    decode, decode_limited, resize_bicubic, Preprocess, DEFAULT_MAX_PIXELS,
};
use atlas_clip::ClipError;
use candle_core::Device;
use image::RgbImage;
use safetensors::{Dtype, SafeTensors};

/// PIL (libjpeg-turbo) and the `image` crate decode JPEG slightly differently (up to 3
/// levels on the fixture, 0.044 after normalisation), so the end-to-end JPEG check allows
/// about 4 levels (one 8-bit level is ~0.015 after normalisation).
const JPEG_TOLERANCE: f32 = 0.07;
const EXACT_TOLERANCE: f32 = 1e-5;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/preprocess")
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

enum Array {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

struct Entry {
    shape: Vec<usize>,
    data: Array,
}

fn reference() -> HashMap<String, Entry> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&read_fixture("reference.safetensors.gz")[..])
        .read_to_end(&mut raw)
        .unwrap();
    let st = SafeTensors::deserialize(&raw).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = match view.dtype() {
                Dtype::F32 => Array::F32(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                Dtype::U8 => Array::U8(view.data().to_vec()),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (
                name,
                Entry {
                    shape: view.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

fn f32s(entry: &Entry) -> &[f32] {
    match &entry.data {
        Array::F32(v) => v,
        Array::U8(_) => panic!("expected f32"),
    }
}

fn rgb(entry: &Entry) -> RgbImage {
    let (h, w) = (entry.shape[0] as u32, entry.shape[1] as u32);
    match &entry.data {
        Array::U8(v) => RgbImage::from_raw(w, h, v.clone()).unwrap(),
        Array::F32(_) => panic!("expected u8"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every `pixels/<file>/<size>` entry: (file, size, expected values).
fn pixel_cases(reference: &HashMap<String, Entry>) -> Vec<(String, usize, &[f32])> {
    let mut cases: Vec<_> = reference
        .iter()
        .filter_map(|(key, entry)| {
            let rest = key.strip_prefix("pixels/")?;
            let (file, size) = rest.rsplit_once('/')?;
            Some((file.to_string(), size.parse().unwrap(), f32s(entry)))
        })
        .collect();
    cases.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert!(
        cases.len() >= 10,
        "fixture has only {} pixel cases",
        cases.len()
    );
    cases
}

#[test]
fn lossless_formats_match_hf_end_to_end() {
    let reference = reference();
    for (file, size, want) in pixel_cases(&reference) {
        if file.ends_with(".jpg") {
            continue;
        }
        let got = Preprocess::from_config(size)
            .from_bytes(&read_fixture(&file))
            .unwrap();
        let diff = max_abs_diff(&got, want);
        eprintln!("{file} @ {size}: max abs diff {diff:e}");
        assert!(
            diff <= EXACT_TOLERANCE,
            "{file} @ {size}: max abs diff {diff}"
        );
    }
}

#[test]
fn jpeg_matches_hf_on_pil_decoded_pixels() {
    let reference = reference();
    let decoded = rgb(&reference["decoded/photo_41x64.jpg"]);
    let want = f32s(&reference["pixels/photo_41x64.jpg/32"]);
    let got = Preprocess::from_config(32).pixels(&decoded);
    let diff = max_abs_diff(&got, want);
    eprintln!("photo_41x64.jpg (PIL-decoded) @ 32: max abs diff {diff:e}");
    assert!(diff <= EXACT_TOLERANCE, "max abs diff {diff}");
}

#[test]
fn jpeg_matches_hf_end_to_end_within_tolerance() {
    let reference = reference();
    let want = f32s(&reference["pixels/photo_41x64.jpg/32"]);
    let got = Preprocess::from_config(32)
        .from_bytes(&read_fixture("photo_41x64.jpg"))
        .unwrap();
    let diff = max_abs_diff(&got, want);
    eprintln!("photo_41x64.jpg end to end @ 32: max abs diff {diff:e}");
    assert!(diff <= JPEG_TOLERANCE, "max abs diff {diff}");
}

#[test]
fn decode_matches_pil_for_lossless_formats() {
    let reference = reference();
    let mut checked = 0;
    for (key, entry) in &reference {
        let Some(file) = key.strip_prefix("decoded/") else {
            continue;
        };
        let got = decode(&read_fixture(file)).unwrap();
        let want = rgb(entry);
        assert_eq!(got.dimensions(), want.dimensions(), "{file}");
        if file.ends_with(".jpg") {
            let worst = got
                .as_raw()
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            eprintln!("{file}: worst decode difference vs PIL {worst:?} levels");
        } else {
            assert!(got == want, "{file}: decoded pixels differ from PIL");
        }
        checked += 1;
    }
    assert!(checked >= 7);
}

#[test]
fn resize_bicubic_matches_pil() {
    let reference = reference();
    let mut checked = 0;
    for (key, entry) in &reference {
        let Some(rest) = key.strip_prefix("resize/") else {
            continue;
        };
        let (file, dims) = rest.rsplit_once('/').unwrap();
        let (w, h) = dims.split_once('x').unwrap();
        let src = decode(&read_fixture(file)).unwrap();
        let got = resize_bicubic(&src, w.parse().unwrap(), h.parse().unwrap());
        assert!(got == rgb(entry), "{key}: differs from PIL");
        checked += 1;
    }
    assert!(checked >= 7);
}

#[test]
fn shapes() {
    let p = Preprocess::from_config(32);
    let a = p.from_bytes(&read_fixture("large_300x200.png")).unwrap();
    let b = p.from_bytes(&read_fixture("tiny_20x30.png")).unwrap();
    assert_eq!(a.len(), 3 * 32 * 32);
    let batch = p.batch(&[a, b], &Device::Cpu).unwrap();
    assert_eq!(batch.dims(), &[2, 3, 32, 32]);
    assert_eq!(batch.dtype(), candle_core::DType::F32);
    assert_eq!(
        Preprocess::default().pixels(&RgbImage::new(5, 9)).len(),
        3 * 224 * 224
    );
}

#[test]
fn batch_rejects_wrong_length() {
    let err = Preprocess::from_config(32)
        .batch(&[vec![0.0; 10]], &Device::Cpu)
        .unwrap_err();
    assert!(
        matches!(&err, ClipError::Image(m) if m.contains("image 0")),
        "{err}"
    );
}

#[test]
fn one_pixel_image_works() {
    let img = RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]));
    let out = Preprocess::default().pixels(&img);
    assert_eq!(out.len(), 3 * 224 * 224);
    assert!(out.iter().all(|v| v.is_finite()));
    // A flat image stays flat through the resize.
    assert!(out[..224 * 224].iter().all(|&v| v == out[0]));
}

#[test]
fn degenerate_images_do_not_panic() {
    let p = Preprocess::from_config(16);
    assert_eq!(p.pixels(&RgbImage::new(0, 0)).len(), 3 * 16 * 16);
    assert_eq!(p.pixels(&RgbImage::new(3000, 1)).len(), 3 * 16 * 16);
    assert_eq!(
        resize_bicubic(&RgbImage::new(0, 4), 3, 3).dimensions(),
        (3, 3)
    );
    assert_eq!(
        resize_bicubic(&RgbImage::new(4, 4), 0, 3).dimensions(),
        (0, 3)
    );
}

fn image_error(bytes: &[u8]) -> String {
    match decode(bytes) {
        Err(ClipError::Image(message)) => message,
        other => panic!("expected ClipError::Image, got {other:?}"),
    }
}

#[test]
fn bad_bytes_give_image_errors() {
    assert!(image_error(&[]).contains("empty"));
    assert!(image_error(b"definitely not an image").contains("unrecognised image format"));
    let png = read_fixture("gradient_50x37.png");
    assert!(image_error(&png[..png.len() / 2]).contains("cannot decode"));
    let p = Preprocess::default();
    assert!(matches!(
        p.from_bytes(b"\x89PNG\r\n\x1a\n"),
        Err(ClipError::Image(_))
    ));
}

/// A PNG whose header claims 9000 x 9000 pixels, with no real pixel data.
fn huge_png_header() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&9000u32.to_be_bytes());
    ihdr.extend_from_slice(&9000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[]);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn decompression_bombs_are_refused() {
    let message = image_error(&huge_png_header());
    assert!(message.contains("9000x9000"), "{message}");
}

fn encoded(img: &RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[test]
fn the_pixel_cap_is_a_setting() {
    let png = |w, h| encoded(&RgbImage::new(w, h), image::ImageFormat::Png);
    let capped = Preprocess {
        max_pixels: 64 * 64,
        ..Preprocess::from_config(16)
    };
    assert!(capped.from_bytes(&png(64, 64)).is_ok());
    let e = capped.from_bytes(&png(65, 64)).unwrap_err().to_string();
    assert!(e.contains("65x64") && e.contains("4096 allowed"), "{e}");
    assert!(decode_limited(&png(65, 64), 64 * 64).is_err());
    assert!(Preprocess::from_config(16).from_bytes(&png(65, 64)).is_ok());
    assert_eq!(Preprocess::default().max_pixels, DEFAULT_MAX_PIXELS);
}

#[test]
fn truncated_jpeg_is_refused() {
    let jpg = read_fixture("photo_41x64.jpg");
    assert!(decode(&jpg).is_ok());
    // The decoder alone would fill the missing rows with grey and succeed.
    for cut in [jpg.len() - 2, jpg.len() * 3 / 4, jpg.len() / 2] {
        let message = image_error(&jpg[..cut]);
        assert!(message.contains("truncated"), "cut at {cut}: {message}");
    }
    // Data after the end-of-image marker (camera trailers) is not truncation.
    let mut trailer = jpg.clone();
    trailer.extend_from_slice(b"trailer bytes");
    assert!(decode(&trailer).is_ok());
}

#[test]
fn images_without_pixels_are_refused() {
    // A lossless WebP whose header says 16384 x 16384: image-webp 0.2.4 reads that side as 0,
    // which would otherwise decode to an empty image and classify as all padding.
    let mut webp = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(&[7; 16 * 16 * 3], 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    assert!(decode(&webp).is_ok());
    let at = webp.windows(4).position(|w| w == b"VP8L").unwrap() + 9;
    let bits = u32::from_le_bytes(webp[at..at + 4].try_into().unwrap());
    let patched = (bits & !((1 << 28) - 1)) | 16383 | (16383 << 14);
    webp[at..at + 4].copy_from_slice(&patched.to_le_bytes());
    let message = image_error(&webp);
    assert!(message.contains("0x0 pixels"), "{message}");
}
