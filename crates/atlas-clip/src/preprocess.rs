//! OpenAI CLIP image preprocessing, matching Hugging Face's `CLIPImageProcessor` with the PIL
//! backend (`CLIPImageProcessorPil` in transformers >= 5) value for value:
//!
//! 1. decode JPEG / PNG / WebP; images with alpha are composited over white, as HF's
//!    `convert_to_rgb` does (PIL `alpha_composite`), everything else goes to 8-bit RGB;
//! 2. resize so the shorter side is `size`, longer side `int(size * long / short)`, with PIL's
//!    bicubic `Image.resize` reproduced bit for bit (see [`resize_bicubic`]);
//! 3. centre crop `crop` x `crop` (zero padding if the image is smaller, like HF);
//! 4. scale by 1/255 and normalise with `mean` / `std`; output CHW `f32`.
//!
//! EXIF orientation is ignored, as in HF when it is handed a PIL image. 16-bit inputs are
//! reduced to 8 bits by the `image` crate and are not covered by the parity tests.

use std::io::Cursor;
use std::ops::Range;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};

use crate::{ClipError, Result};

/// OpenAI CLIP normalisation constants (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` in
/// transformers). Written as f64 narrowed to f32, which is how numpy gets its float32 copies.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [
    0.48145466_f64 as f32,
    0.4578275_f64 as f32,
    0.40821073_f64 as f32,
];
pub const OPENAI_CLIP_STD: [f32; 3] = [
    0.26862954_f64 as f32,
    0.26130258_f64 as f32,
    0.27577711_f64 as f32,
];

/// Default largest image (width x height) decoded, against decompression bombs: 32 Mi pixels
/// (8192 x 4096, above most camera photos) decode to at most ~256 MiB (RGBA, 16 bits).
pub const DEFAULT_MAX_PIXELS: u64 = 32 * 1024 * 1024;

/// CLIP preprocessing settings. `Default` is OpenAI's 224 / 224 with the OpenAI mean and std.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Target length of the shorter side after resizing.
    pub size: usize,
    /// Side of the square centre crop.
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Largest image (width x height) [`Preprocess::from_bytes`] decodes; larger ones are
    /// refused from their header, before any pixel is decoded.
    pub max_pixels: u64,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self::from_config(224)
    }
}

impl Preprocess {
    /// Settings for a vision tower with input resolution `image_size` (resize and crop to it).
    pub fn from_config(image_size: usize) -> Self {
        Self {
            size: image_size,
            crop: image_size,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Size `(width, height)` the image is resized to before cropping, computed like HF's
    /// `get_resize_output_image_size(default_to_square=False)`.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (short, long) = (width.min(height) as u64, width.max(height) as u64);
        if short == 0 {
            return (0, 0);
        }
        let size = self.size as u64;
        // Python: int(size * long / short), a float division truncated.
        let new_long = (size.saturating_mul(long) as f64 / short as f64) as u64;
        let (size, new_long) = (clamp_u32(size), clamp_u32(new_long));
        if width <= height {
            (size, new_long)
        } else {
            (new_long, size)
        }
    }

    /// The size an image is kept at for learning ([`Preprocess::kept`]) from its size: the
    /// shorter side at most `size`, the longer side at most [`MAX_KEPT_ASPECT`] times that.
    pub fn kept_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = long_side_cropped(width, height);
        if w.min(h) as usize <= self.size {
            return (w, h);
        }
        self.resized_size(w, h)
    }

    /// The image as learning keeps it: resized as [`Preprocess::pixels`] would before its
    /// centre crop, so that `pixels(&kept(img)) == pixels(&img)`, and so that memory per image
    /// is bounded (at most `3 · size · 4·size` bytes) whatever the upload's size. An image
    /// longer than [`MAX_KEPT_ASPECT`] : 1 first loses the ends of its long side.
    pub fn kept(&self, img: RgbImage) -> RgbImage {
        let (w, h) = long_side_cropped(img.width(), img.height());
        let img = if (w, h) == img.dimensions() {
            img
        } else {
            let (x, y) = ((img.width() - w) / 2, (img.height() - h) / 2);
            image::imageops::crop_imm(&img, x, y, w, h).to_image()
        };
        if w.min(h) as usize <= self.size {
            return img;
        }
        let (out_w, out_h) = self.resized_size(w, h);
        resize_bicubic(&img, out_w, out_h)
    }

    /// Preprocessed pixels of a decoded image: CHW `f32`, length `3 * crop * crop`.
    pub fn pixels(&self, img: &RgbImage) -> Vec<f32> {
        let at_crop = (img.width() as usize, img.height() as usize) == (self.crop, self.crop);
        if at_crop && self.size == self.crop {
            // Resizing is then the identity (and the exact resampler is slow in debug builds).
            return self.normalise(img);
        }
        let (out_w, out_h) = self.resized_size(img.width(), img.height());
        let (x_start, x_range) = crop_window(out_w as usize, self.crop);
        let (y_start, y_range) = crop_window(out_h as usize, self.crop);
        // Only the part of the resized image that survives the crop is computed: every output
        // pixel of PIL's resampler depends on its own taps only, so the values are identical.
        let window = if x_range.is_empty() || y_range.is_empty() {
            RgbImage::new(0, 0)
        } else {
            let xs = Taps::new(img.width() as usize, out_w as usize, x_range.clone());
            let ys = Taps::new(img.height() as usize, out_h as usize, y_range.clone());
            resample(img, &xs, &ys)
        };
        let lut = self.normalise_table();
        let crop = self.crop;
        let mut out = vec![0f32; 3 * crop * crop];
        for cy in 0..crop {
            let wy = window_index(y_start, cy, &y_range);
            for cx in 0..crop {
                let wx = window_index(x_start, cx, &x_range);
                let rgb = match (wx, wy) {
                    (Some(x), Some(y)) => window.get_pixel(x as u32, y as u32).0,
                    _ => [0, 0, 0], // HF pads with zeros before rescaling
                };
                for c in 0..3 {
                    out[(c * crop + cy) * crop + cx] = lut[c][rgb[c] as usize];
                }
            }
        }
        out
    }

    /// Decode (at most `max_pixels`) and preprocess encoded image bytes.
    pub fn from_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        Ok(self.pixels(&decode_limited(bytes, self.max_pixels)?))
    }

    /// Stack preprocessed images into a `[B, 3, crop, crop]` f32 tensor.
    pub fn batch(&self, images: &[Vec<f32>], device: &Device) -> Result<Tensor> {
        let per_image = 3 * self.crop * self.crop;
        let mut data = Vec::with_capacity(images.len() * per_image);
        for (i, img) in images.iter().enumerate() {
            if img.len() != per_image {
                return Err(ClipError::Image(format!(
                    "batch: image {i} has {} values, expected 3 x {} x {} = {per_image}",
                    img.len(),
                    self.crop,
                    self.crop
                )));
            }
            data.extend_from_slice(img);
        }
        Ok(Tensor::from_vec(
            data,
            (images.len(), 3, self.crop, self.crop),
            device,
        )?)
    }

    /// CHW pixels of an image already at its final size: each 8-bit level scaled to [0, 1] and
    /// normalised with HF's arithmetic (the same values as [`Preprocess::pixels`]).
    pub fn normalise(&self, img: &RgbImage) -> Vec<f32> {
        let lut = self.normalise_table();
        let n = (img.width() * img.height()) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, rgb) in img.as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * n + i] = lut[c][rgb[c] as usize];
            }
        }
        out
    }

    /// For each channel, the normalised value of every 8-bit level. Mirrors HF's arithmetic:
    /// `float32(uint8 * (1/255 as float64))`, then `(x - mean) / std` in float32.
    fn normalise_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, row) in lut.iter_mut().enumerate() {
            for (v, slot) in row.iter_mut().enumerate() {
                let scaled = (v as f64 * (1.0 / 255.0)) as f32;
                *slot = (scaled - self.mean[c]) / self.std[c];
            }
        }
        lut
    }
}

/// Longest ratio of long to short side that [`Preprocess::kept`] keeps.
pub const MAX_KEPT_ASPECT: u32 = 4;

/// (width, height) with the long side cut to at most [`MAX_KEPT_ASPECT`] times the short one.
fn long_side_cropped(width: u32, height: u32) -> (u32, u32) {
    let cap = |long: u32, short: u32| long.min(short.saturating_mul(MAX_KEPT_ASPECT));
    (cap(width, height), cap(height, width))
}

fn clamp_u32(v: u64) -> u32 {
    v.min(u32::MAX as u64) as u32
}

/// HF `center_crop` along one axis: the crop starts at `floor((size - crop) / 2)` (negative
/// when padding). Returns that start and the part of `0..size` the crop covers.
fn crop_window(size: usize, crop: usize) -> (i64, Range<usize>) {
    let start = (size as i64 - crop as i64).div_euclid(2);
    let lo = start.clamp(0, size as i64) as usize;
    let hi = (start + crop as i64).clamp(lo as i64, size as i64) as usize;
    (start, lo..hi)
}

/// Index into the computed window for crop position `c`, or `None` for padding.
fn window_index(start: i64, c: usize, range: &Range<usize>) -> Option<usize> {
    let pos = start + c as i64;
    (pos >= range.start as i64 && pos < range.end as i64).then(|| pos as usize - range.start)
}

/// Decode JPEG, PNG or WebP bytes into 8-bit RGB the way HF's `convert_to_rgb` does
/// (alpha composited over white). Refuses images over [`DEFAULT_MAX_PIXELS`].
pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
    decode_limited(bytes, DEFAULT_MAX_PIXELS)
}

/// Checks encoded image bytes from their header alone, before any pixel is decoded (a small
/// file may claim a huge image): a JPEG, PNG or WebP image, not cut short (JPEG), of 1 to
/// `max_pixels` pixels. Returns its width and height.
pub fn check_header(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32)> {
    if bytes.is_empty() {
        return Err(ClipError::Image(
            "image is empty (an empty byte slice)".into(),
        ));
    }
    let reader = reader(bytes)?;
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_end(bytes)?;
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| decode_error(bytes, e))?;
    if w == 0 || h == 0 {
        return Err(ClipError::Image(format!(
            "image is {w}x{h} pixels, it has none"
        )));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(ClipError::Image(format!(
            "image is {w}x{h} pixels, more than the {max_pixels} allowed"
        )));
    }
    Ok((w, h))
}

/// A reader over `bytes` whose format is known.
fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ClipError::Image(format!("cannot read image bytes: {e}")))?;
    if reader.format().is_none() {
        return Err(ClipError::Image(format!(
            "unrecognised image format: not a JPEG, PNG or WebP image ({} bytes)",
            bytes.len()
        )));
    }
    Ok(reader)
}

/// [`decode`] refusing images of more than `max_pixels` (width x height). The header is checked
/// first ([`check_header`]), and the decoder's own allocations are capped to what such an
/// image needs, so a small file claiming a huge image costs nothing.
pub fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    check_header(bytes, max_pixels)?;
    let mut reader = reader(bytes)?;
    reader.limits(limits(max_pixels));
    let decoder = reader.into_decoder().map_err(|e| decode_error(bytes, e))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(bytes, e))?;
    Ok(to_rgb(img))
}

/// Refuses a JPEG cut short. The decoder fills a truncated scan with grey rather than
/// failing, so an upload cut in half would be classified as if it were whole. The last
/// start-of-scan marker must be followed by the end-of-image marker: inside scan data 0xFF is
/// always escaped, so both markers can only appear as real markers there.
fn check_jpeg_end(bytes: &[u8]) -> Result<()> {
    const SOS: [u8; 2] = [0xFF, 0xDA];
    const EOI: [u8; 2] = [0xFF, 0xD9];
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == SOS) else {
        return Ok(()); // no scan at all: the decoder reports what is missing
    };
    if bytes[last_scan..].windows(2).any(|w| w == EOI) {
        Ok(())
    } else {
        Err(ClipError::Image(format!(
            "JPEG data ({} bytes) ends before its end-of-image marker: the file is truncated",
            bytes.len()
        )))
    }
}

/// Decoder limits for images of at most `max_pixels`: no side longer than that, and
/// allocations within 8 bytes a pixel (RGBA at 16 bits) plus room for tables and rows.
fn limits(max_pixels: u64) -> Limits {
    let mut limits = Limits::default();
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

fn decode_error(bytes: &[u8], e: image::ImageError) -> ClipError {
    ClipError::Image(format!("cannot decode image ({} bytes): {e}", bytes.len()))
}

fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = src.0;
        dst.0 = [over_white(r, a), over_white(g, a), over_white(b, a)];
    }
    out
}

/// One channel of PIL's `ImagingAlphaComposite` with an opaque white destination
/// (integer arithmetic with 7 extra bits, as in Pillow's AlphaComposite.c).
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << BITS);
    ((((tmp >> 8) + tmp) >> 8) >> BITS) as u8
}

/// Resize with PIL's bicubic `Image.resize((w, h), BICUBIC)`, bit-exact: separable
/// convolution (a = -0.5, support widened by the downscale factor), 22-bit fixed-point
/// weights, horizontal pass first with a rounded and clipped 8-bit intermediate.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if width == 0 || height == 0 || img.width() == 0 || img.height() == 0 {
        return RgbImage::new(width, height);
    }
    let (w, h) = (width as usize, height as usize);
    let xs = Taps::new(img.width() as usize, w, 0..w);
    let ys = Taps::new(img.height() as usize, h, 0..h);
    resample(img, &xs, &ys)
}

/// Fixed-point precision of PIL's 8-bit resampler: 32 - 8 - 2 bits.
const PRECISION_BITS: u32 = 22;

/// Filter taps of one axis for a range of output positions, like PIL's `precompute_coeffs`
/// followed by `normalize_coeffs_8bpc`.
struct Taps {
    /// First input index used by each output position.
    starts: Vec<usize>,
    /// Number of input indices used by each output position.
    lens: Vec<usize>,
    /// `ksize` fixed-point weights per output position.
    weights: Vec<i32>,
    ksize: usize,
}

impl Taps {
    /// Taps for output positions `range` of a resize from `in_size` to `out_size` (> 0).
    fn new(in_size: usize, out_size: usize, range: Range<usize>) -> Self {
        // PIL computes the box width in float32 before widening to double.
        let scale = (in_size as f32) as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ss = 1.0 / filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let n = range.len();
        let mut taps = Taps {
            starts: Vec::with_capacity(n),
            lens: Vec::with_capacity(n),
            weights: vec![0; n * ksize],
            ksize,
        };
        let mut k = vec![0f64; ksize];
        for (i, xx) in range.enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; the clamps make that equal to PIL's bounds.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let len = (xmax - xmin).clamp(0, ksize as i64) as usize;
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(len) {
                let w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            let row = &mut taps.weights[i * ksize..i * ksize + len];
            for (dst, &w) in row.iter_mut().zip(&k) {
                let w = if ww != 0.0 { w / ww } else { w };
                *dst = to_fixed(w);
            }
            taps.starts.push(xmin as usize);
            taps.lens.push(len);
        }
        taps
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Input span and weights of output position `i`.
    fn get(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.ksize..i * self.ksize + self.lens[i]];
        (self.starts[i], w)
    }

    /// Smallest input range covering every tap.
    fn span(&self) -> Range<usize> {
        let lo = self.starts.iter().copied().min().unwrap_or(0);
        let hi = (0..self.len())
            .map(|i| self.starts[i] + self.lens[i])
            .max()
            .unwrap_or(lo);
        lo..hi.max(lo)
    }
}

/// PIL's bicubic kernel with a = -0.5, support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's rounding of a normalised weight to fixed point (half away from zero, then truncate).
fn to_fixed(w: f64) -> i32 {
    let scaled = w * (1u32 << PRECISION_BITS) as f64;
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Round a fixed-point accumulator to 8 bits like PIL's `clip8`.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Two-pass resample: horizontal into an 8-bit buffer covering only the rows the vertical
/// taps read, then vertical. Output is `xs.len()` x `ys.len()`.
fn resample(img: &RgbImage, xs: &Taps, ys: &Taps) -> RgbImage {
    let (in_w, out_w, out_h) = (img.width() as usize, xs.len(), ys.len());
    let rows = ys.span();
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);

    let mut tmp = vec![0u8; rows.len() * out_w * 3];
    for (t, y) in rows.clone().enumerate() {
        let line = &src[y * in_w * 3..(y + 1) * in_w * 3];
        let out = &mut tmp[t * out_w * 3..(t + 1) * out_w * 3];
        for xx in 0..out_w {
            let (start, k) = xs.get(xx);
            let mut acc = [half; 3];
            for (j, &kj) in k.iter().enumerate() {
                let p = &line[(start + j) * 3..(start + j) * 3 + 3];
                for c in 0..3 {
                    acc[c] += p[c] as i64 * kj as i64;
                }
            }
            for c in 0..3 {
                out[xx * 3 + c] = clip8(acc[c]);
            }
        }
    }

    let row_len = out_w * 3;
    let mut dst = vec![0u8; out_h * row_len];
    let mut acc = vec![0i64; row_len];
    for yy in 0..out_h {
        let (start, k) = ys.get(yy);
        acc.fill(half);
        for (j, &kj) in k.iter().enumerate() {
            let r = start + j - rows.start;
            let line = &tmp[r * row_len..(r + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i64 * kj as i64;
            }
        }
        for (d, &a) in dst[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    // The buffer length is exactly out_w * out_h * 3, so this cannot fail.
    RgbImage::from_raw(out_w as u32, out_h as u32, dst).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_follows_hf() {
        let p = Preprocess::default();
        assert_eq!(p.resized_size(300, 200), (336, 224));
        assert_eq!(p.resized_size(200, 300), (224, 336));
        assert_eq!(p.resized_size(50, 37), (302, 224));
        assert_eq!(p.resized_size(1, 1), (224, 224));
    }

    #[test]
    fn crop_window_matches_hf_center_crop() {
        assert_eq!(crop_window(43, 32), (5, 5..37));
        assert_eq!(crop_window(32, 32), (0, 0..32));
        // Smaller than the crop: HF pads, ceil((32 - 29) / 2) = 2 zeros before.
        assert_eq!(crop_window(29, 32), (-2, 0..29));
    }

    #[test]
    fn kept_images_preprocess_like_the_originals_and_are_bounded() {
        let pre = Preprocess::from_config(8);
        let img = RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 11 % 256) as u8,
                ((x * y) % 256) as u8,
            ])
        });
        let kept = pre.kept(img.clone());
        assert_eq!(kept.dimensions(), pre.resized_size(37, 23));
        assert_eq!(kept.dimensions(), pre.kept_size(37, 23));
        assert_eq!(pre.pixels(&kept), pre.pixels(&img));
        // Small images stay as they are; very long ones lose the ends of their long side.
        let small = RgbImage::new(5, 6);
        assert_eq!(pre.kept(small.clone()), small);
        let long = pre.kept(RgbImage::new(400, 10));
        assert_eq!(long.dimensions(), (32, 8));
        assert_eq!(pre.kept_size(400, 10), (32, 8));
    }

    #[test]
    fn identity_resize_is_exact() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 9]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
    }

    #[test]
    fn over_white_endpoints() {
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(10, 0), 255);
    }
}
