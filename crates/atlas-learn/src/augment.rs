//! Views of an image for a step: the plain evaluation view (OpenAI preprocessing), the training
//! views of labelled images (RandomResizedCrop, scale 0.5–1 as in the paper, bicubic; with or
//! without a horizontal flip), and UFM's weak and strong views. Every random choice comes from
//! (seed, epoch, item), so a run is reproducible whatever the thread schedule, and a resumed run
//! sees the same views.

use atlas_clip::preprocess::{resize_bicubic, Preprocess};
use image::{imageops, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Resize the shorter side, centre crop (evaluation).
    Plain,
    /// RandomResizedCrop(scale 0.5–1, ratio 3/4–4/3) + horizontal flip: the paper's few-shot
    /// view. A flip changes the label of digits, text and left/right positions.
    Train,
    /// RandomResizedCrop(scale 0.5–1, ratio 3/4–4/3), no flip. A crop may still cut out what
    /// the label counts or moves what it locates (counts, positions).
    Crop,
    /// UFM weak view: a mild crop (scale 0.8–1). No flip: UFM learns agreement between views,
    /// and a flipped digit or text is another class (the reference code flips).
    Weak,
    /// UFM strong view: Crop plus colour jitter (brightness, contrast, saturation ±40%) and
    /// grey-scale with probability 0.2.
    Strong,
}

/// The RNG for one image of one epoch.
pub fn rng_for(seed: u64, epoch: usize, item: usize) -> ChaCha8Rng {
    let key = atlas_core::parts::splitmix64(
        seed ^ atlas_core::parts::splitmix64((epoch as u64) << 32 | item as u64),
    );
    ChaCha8Rng::seed_from_u64(key)
}

/// CHW pixels of `img` under `view`.
pub fn pixels(pre: &Preprocess, img: &RgbImage, view: View, rng: &mut ChaCha8Rng) -> Vec<f32> {
    match view {
        View::Plain => pre.pixels(img),
        View::Train => crop_flip(pre, img, (0.5, 1.0), true, rng),
        View::Crop => crop_flip(pre, img, (0.5, 1.0), false, rng),
        View::Weak => crop_flip(pre, img, (0.8, 1.0), false, rng),
        View::Strong => {
            let mut out = crop_flip_image(pre, img, (0.5, 1.0), false, rng);
            jitter(&mut out, rng);
            pre.normalise(&out)
        }
    }
}

fn crop_flip(
    pre: &Preprocess,
    img: &RgbImage,
    scale: (f64, f64),
    flip: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    pre.normalise(&crop_flip_image(pre, img, scale, flip, rng))
}

fn crop_flip_image(
    pre: &Preprocess,
    img: &RgbImage,
    scale: (f64, f64),
    flip: bool,
    rng: &mut ChaCha8Rng,
) -> RgbImage {
    let (x, y, w, h) = random_resized_crop_box(img.width(), img.height(), scale, rng);
    let crop = imageops::crop_imm(img, x, y, w, h).to_image();
    let mut out = resize_bicubic(&crop, pre.crop as u32, pre.crop as u32);
    if flip && rng.gen_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut out);
    }
    out
}

/// torchvision's RandomResizedCrop box: ten tries at a random area fraction and log-uniform
/// aspect ratio in 3/4–4/3, then a centre crop clamped to that ratio range.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale.0..=scale.1);
        let ratio = rng.gen_range(lo..=hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            return (
                rng.gen_range(0..=width - w),
                rng.gen_range(0..=height - h),
                w,
                h,
            );
        }
    }
    let ratio = width as f64 / height as f64;
    let (w, h) = if ratio < 3.0 / 4.0 {
        (width, ((width as f64) / (3.0 / 4.0)).round() as u32)
    } else if ratio > 4.0 / 3.0 {
        (((height as f64) * (4.0 / 3.0)).round() as u32, height)
    } else {
        (width, height)
    };
    (
        (width - w.min(width)) / 2,
        (height - h.min(height)) / 2,
        w.min(width),
        h.min(height),
    )
}

fn jitter(img: &mut RgbImage, rng: &mut ChaCha8Rng) {
    let b = rng.gen_range(0.6..=1.4f32);
    let c = rng.gen_range(0.6..=1.4f32);
    let s = rng.gen_range(0.6..=1.4f32);
    let grey = rng.gen_bool(0.2);
    let mean =
        img.pixels().map(|p| luma(p.0)).sum::<f32>() / (img.width() * img.height()).max(1) as f32;
    for p in img.pixels_mut() {
        let mut v = p.0.map(|x| x as f32 * b);
        let l = luma(v.map(|x| x.clamp(0.0, 255.0) as u8));
        v = v.map(|x| l + (x - l) * s);
        v = v.map(|x| mean * b + (x - mean * b) * c);
        if grey {
            let g = luma(v.map(|x| x.clamp(0.0, 255.0) as u8));
            v = [g; 3];
        }
        p.0 = v.map(|x| x.round().clamp(0.0, 255.0) as u8);
    }
}

fn luma(p: [u8; 3]) -> f32 {
    0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_deterministic_and_sized() {
        let pre = Preprocess {
            size: 16,
            crop: 16,
            ..Preprocess::default()
        };
        let img = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        });
        for view in [
            View::Plain,
            View::Train,
            View::Crop,
            View::Weak,
            View::Strong,
        ] {
            let a = pixels(&pre, &img, view, &mut rng_for(1, 2, 3));
            let b = pixels(&pre, &img, view, &mut rng_for(1, 2, 3));
            assert_eq!(a.len(), 3 * 16 * 16);
            assert_eq!(a, b, "{view:?}");
        }
        let a = pixels(&pre, &img, View::Train, &mut rng_for(1, 2, 3));
        let c = pixels(&pre, &img, View::Train, &mut rng_for(1, 3, 3));
        assert_ne!(a, c);
    }

    #[test]
    fn crop_boxes_respect_scale_and_bounds() {
        let mut rng = rng_for(0, 0, 0);
        for _ in 0..200 {
            let (x, y, w, h) = random_resized_crop_box(64, 48, (0.5, 1.0), &mut rng);
            assert!(x + w <= 64 && y + h <= 48);
            let frac = (w * h) as f64 / (64.0 * 48.0);
            assert!((0.4..=1.0).contains(&frac), "{frac}");
        }
    }
}
