//! The world's images: 32x32 RGB scenes composed of attributes, and captions describing some of
//! them.
//!
//! A scene is either a few identical shapes (one colour, one shape, 1–4 of them, each in its
//! own quadrant) or one handwritten UCI digit drawn in a colour, always on a grey background
//! with a texture. With one shape its quadrant is its position. Every attribute is a small
//! class index into the name tables below.

use crate::digits::{Digit, NAMES as DIGIT_NAMES};
use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::Rng;

/// Side of every image.
pub const SIZE: u32 = 32;

pub const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
const RGB: [[u8; 3]; 6] = [
    [215, 40, 40],
    [40, 170, 60],
    [45, 80, 225],
    [225, 205, 40],
    [145, 55, 195],
    [240, 135, 25],
];
pub const SHAPES: [&str; 5] = ["circle", "square", "triangle", "cross", "diamond"];
const SHAPE_PLURALS: [&str; 5] = ["circles", "squares", "triangles", "crosses", "diamonds"];
pub const TEXTURES: [&str; 5] = [
    "plain",
    "horizontally striped",
    "vertically striped",
    "checkered",
    "dotted",
];
pub const COUNTS: [&str; 4] = ["one", "two", "three", "four"];
pub const POSITIONS: [&str; 4] = ["top left", "top right", "bottom left", "bottom right"];

/// The attributes a caption can mention and a task can ask about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attr {
    /// 0 for shapes, 1 for a digit.
    Kind,
    Colour,
    Shape,
    Texture,
    Count,
    Position,
    Digit,
}

pub const N_ATTRS: usize = 7;

/// One value per [`Attr`] (indexed by `attr as usize`); None where it does not apply (or, for
/// a caption, is not mentioned).
pub type Attrs = [Option<u8>; N_ATTRS];

#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// `quadrants` holds distinct quadrant indices (see [`POSITIONS`]), one per shape.
    Shapes { shape: u8, quadrants: Vec<u8> },
    /// `index` into the digits list.
    Digit { index: usize, label: u8 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub colour: u8,
    pub texture: u8,
    pub object: Object,
}

impl Scene {
    pub fn attrs(&self) -> Attrs {
        let mut a: Attrs = [None; N_ATTRS];
        a[Attr::Colour as usize] = Some(self.colour);
        a[Attr::Texture as usize] = Some(self.texture);
        match &self.object {
            Object::Shapes { shape, quadrants } => {
                a[Attr::Kind as usize] = Some(0);
                a[Attr::Shape as usize] = Some(*shape);
                a[Attr::Count as usize] = Some(quadrants.len() as u8 - 1);
                if let [q] = quadrants[..] {
                    a[Attr::Position as usize] = Some(q);
                }
            }
            Object::Digit { label, .. } => {
                a[Attr::Kind as usize] = Some(1);
                a[Attr::Digit as usize] = Some(*label);
            }
        }
        a
    }
}

/// A random shapes scene; `fixed` pins some attributes (Colour, Shape, Texture, Count as
/// count − 1, Position, which implies one shape).
pub fn sample_shapes(rng: &mut impl Rng, fixed: &[(Attr, u8)]) -> Scene {
    let pinned = |a: Attr| fixed.iter().find(|(k, _)| *k == a).map(|&(_, v)| v);
    let colour = pinned(Attr::Colour).unwrap_or_else(|| rng.gen_range(0..COLOURS.len() as u8));
    let texture = pinned(Attr::Texture).unwrap_or_else(|| rng.gen_range(0..TEXTURES.len() as u8));
    let shape = pinned(Attr::Shape).unwrap_or_else(|| rng.gen_range(0..SHAPES.len() as u8));
    let quadrants = match pinned(Attr::Position) {
        Some(q) => vec![q],
        None => {
            let n = pinned(Attr::Count).unwrap_or_else(|| rng.gen_range(0..4)) as usize + 1;
            let mut all = vec![0u8, 1, 2, 3];
            for i in 0..n {
                all.swap(i, rng.gen_range(i..4));
            }
            all.truncate(n);
            all
        }
    };
    Scene {
        colour,
        texture,
        object: Object::Shapes { shape, quadrants },
    }
}

/// A random digit scene showing `digits[index]`; `colour` / `texture` are random when None.
pub fn sample_digit(
    rng: &mut impl Rng,
    digits: &[Digit],
    index: usize,
    colour: Option<u8>,
    texture: Option<u8>,
) -> Scene {
    Scene {
        colour: colour.unwrap_or_else(|| rng.gen_range(0..COLOURS.len() as u8)),
        texture: texture.unwrap_or_else(|| rng.gen_range(0..TEXTURES.len() as u8)),
        object: Object::Digit {
            index,
            label: digits[index].label,
        },
    }
}

/// Draws a scene. Sizes, jitter, tones and noise come from `rng`.
pub fn render(scene: &Scene, digits: &[Digit], rng: &mut impl Rng) -> RgbImage {
    let mut img = background(scene.texture, rng);
    let colour = jitter_colour(RGB[scene.colour as usize % RGB.len()], rng);
    match &scene.object {
        Object::Shapes { shape, quadrants } => {
            let (lo, hi) = if quadrants.len() == 1 {
                (10.0, 14.0)
            } else {
                (8.0, 12.0)
            };
            for &q in quadrants {
                let s = rng.gen_range(lo..hi);
                let slack = (16.0 - s) / 2.0;
                let cx = (q % 2) as f32 * 16.0 + 8.0 + rng.gen_range(-slack..=slack);
                let cy = (q / 2) as f32 * 16.0 + 8.0 + rng.gen_range(-slack..=slack);
                draw_shape(&mut img, *shape, cx, cy, s / 2.0, colour);
            }
        }
        Object::Digit { index, .. } => {
            if let Some(d) = digits.get(*index) {
                draw_digit(&mut img, d, colour, rng);
            }
        }
    }
    add_noise(&mut img, rng);
    img
}

fn jitter_colour(c: [u8; 3], rng: &mut impl Rng) -> [u8; 3] {
    c.map(|v| (v as i32 + rng.gen_range(-20..=20)).clamp(0, 255) as u8)
}

/// Grey two-tone texture with random tone, contrast, period and phase.
fn background(texture: u8, rng: &mut impl Rng) -> RgbImage {
    let g = rng.gen_range(60..=190i32);
    let d = rng.gen_range(60..=90i32);
    let g2 = if g > 125 { g - d } else { g + d };
    let tint: [i32; 3] = [
        rng.gen_range(-6..=6),
        rng.gen_range(-6..=6),
        rng.gen_range(-6..=6),
    ];
    let tone = |v: i32| tint.map(|t| (v + t).clamp(0, 255) as u8);
    let (base, alt) = (tone(g), tone(g2));
    let period = rng.gen_range(4..=6u32);
    let (px, py) = (rng.gen_range(0..period), rng.gen_range(0..period));
    let cell = rng.gen_range(3..=4u32);
    let mut raw = Vec::with_capacity((SIZE * SIZE * 3) as usize);
    for y in 0..SIZE {
        for x in 0..SIZE {
            let (xp, yp) = (x + px, y + py);
            let on = match texture {
                1 => yp % period < period / 2,
                2 => xp % period < period / 2,
                3 => (xp / cell + yp / cell) % 2 == 1,
                4 => xp % period < 2 && yp % period < 2,
                _ => false,
            };
            raw.extend_from_slice(if on { &alt } else { &base });
        }
    }
    RgbImage::from_raw(SIZE, SIZE, raw).expect("SIZE x SIZE x 3 bytes")
}

/// Whether the offset (dx, dy) from the centre lies in a shape of half-size r.
fn inside(shape: u8, dx: f32, dy: f32, r: f32) -> bool {
    let (ax, ay) = (dx.abs(), dy.abs());
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => ax <= 0.85 * r && ay <= 0.85 * r,
        // Upward triangle: the half-width grows from 0 at the top to r at the bottom.
        2 => dy >= -r && dy <= r && ax <= (dy + r) / 2.0,
        3 => (ax <= r / 3.0 && ay <= r) || (ay <= r / 3.0 && ax <= r),
        _ => ax + ay <= r,
    }
}

fn draw_shape(img: &mut RgbImage, shape: u8, cx: f32, cy: f32, r: f32, c: [u8; 3]) {
    let span = |c: f32| {
        let lo = (c - r - 1.0).floor().max(0.0) as u32;
        let hi = ((c + r + 1.0).ceil() as u32).min(SIZE);
        lo..hi
    };
    for y in span(cy) {
        for x in span(cx) {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            if inside(shape, dx, dy, r) {
                img.put_pixel(x, y, Rgb(c));
            }
        }
    }
}

/// Side of a drawn digit: the 8x8 original upscaled 2x, so it covers exactly 2x2 patches of 8.
const DIGIT_SIZE: u32 = 16;

/// The digit, bilinearly upscaled to 16 px at one of 9 places on the 8-px grid (unaligned
/// digits of random size are more than a tiny ViT learns in minutes), blended in `c`.
fn draw_digit(img: &mut RgbImage, d: &Digit, c: [u8; 3], rng: &mut impl Rng) {
    let size = DIGIT_SIZE;
    let (ox, oy) = (rng.gen_range(0..3u32) * 8, rng.gen_range(0..3u32) * 8);
    let scale = 8.0 / size as f32;
    for y in 0..size {
        for x in 0..size {
            let a = bilinear(
                &d.pixels,
                (x as f32 + 0.5) * scale - 0.5,
                (y as f32 + 0.5) * scale - 0.5,
            );
            // Values ≥ 12/16 are solid ink.
            let a = (a / 12.0).clamp(0.0, 1.0);
            let p = img.get_pixel_mut(ox + x, oy + y);
            for (v, &ink) in p.0.iter_mut().zip(&c) {
                *v = (*v as f32 * (1.0 - a) + ink as f32 * a).round() as u8;
            }
        }
    }
}

fn bilinear(px: &[u8; 64], x: f32, y: f32) -> f32 {
    let at = |i: i32, j: i32| px[(j.clamp(0, 7) * 8 + i.clamp(0, 7)) as usize] as f32;
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (i, j) = (x0 as i32, y0 as i32);
    let top = at(i, j) * (1.0 - fx) + at(i + 1, j) * fx;
    let bottom = at(i, j + 1) * (1.0 - fx) + at(i + 1, j + 1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Uniform noise in −6..=6 per channel, from a xorshift seeded by `rng` (a call into `rng`
/// per value is slow in debug builds, where tests run).
fn add_noise(img: &mut RgbImage, rng: &mut impl Rng) {
    let mut state: u64 = rng.gen::<u64>() | 1;
    for v in img.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = ((state >> 32) % 13) as i32 - 6;
        *v = (*v as i32 + n).clamp(0, 255) as u8;
    }
}

/// How often a caption mentions each attribute (probabilities in [0, 1]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mention {
    pub colour: f64,
    pub shape: f64,
    pub texture: f64,
    pub count: f64,
    pub position: f64,
    pub digit: f64,
    /// At most this many attributes per caption (a random subset of those drawn); 0 for no
    /// limit.
    pub max: usize,
    /// Factor on the mention rate of the upper half of every attribute's classes: rare words,
    /// as in the long tail of a web corpus, which zero-shot heads then know less well; 1 for
    /// none.
    #[serde(default = "no_rare")]
    pub rare: f64,
}

fn no_rare() -> f64 {
    1.0
}

impl Mention {
    /// The probability of mentioning attribute `a` whose value is `class`.
    fn rate(&self, a: Attr, p: f64, class: u8) -> f64 {
        let rare = class as usize >= class_count(a).div_ceil(2);
        let p = if rare { p * self.rare } else { p };
        p.clamp(0.0, 1.0)
    }
}

/// Number of values attribute `a` takes.
pub fn class_count(a: Attr) -> usize {
    match a {
        Attr::Kind => 2,
        Attr::Colour => COLOURS.len(),
        Attr::Shape => SHAPES.len(),
        Attr::Texture => TEXTURES.len(),
        Attr::Count => COUNTS.len(),
        Attr::Position => POSITIONS.len(),
        Attr::Digit => 10,
    }
}

/// Caption templates whose phrase brings its own article or count ("a red circle", "two
/// squares").
pub const OPEN_TEMPLATES: [&str; 7] = [
    "a photo of {}.",
    "an image of {}.",
    "a picture of {}.",
    "{}.",
    "a photo showing {}.",
    "a drawing of {}.",
    "there is {}.",
];

/// Templates that bring the article: OpenAI's generic ImageNet prompts (atlas-clip's
/// `default_templates`) and the plain "a photo of a {}.", so heads built from them in other
/// tools (the `finetune` command) use words the model has seen.
pub const BARE_TEMPLATES: [&str; 9] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

/// A caption of `scene` and the attributes it states (with Kind always stated: shape captions
/// say "object", "shape" or the shape, digit captions "digit" or "number").
pub fn caption(scene: &Scene, m: &Mention, rng: &mut impl Rng) -> (String, Attrs) {
    let attrs = scene.attrs();
    let mut said: Attrs = [None; N_ATTRS];
    said[Attr::Kind as usize] = attrs[Attr::Kind as usize];
    let options: &[(Attr, f64)] = match scene.object {
        Object::Shapes { .. } => &[
            (Attr::Colour, m.colour),
            (Attr::Shape, m.shape),
            (Attr::Texture, m.texture),
            (Attr::Count, m.count),
            (Attr::Position, m.position),
        ],
        Object::Digit { .. } => &[
            (Attr::Colour, m.colour),
            (Attr::Texture, m.texture),
            (Attr::Digit, m.digit),
        ],
    };
    let mut drawn: Vec<Attr> = options
        .iter()
        .filter(|&&(a, p)| attrs[a as usize].is_some_and(|v| rng.gen_bool(m.rate(a, p, v))))
        .map(|&(a, _)| a)
        .collect();
    if m.max > 0 && drawn.len() > m.max {
        drawn.shuffle(rng);
        drawn.truncate(m.max);
    }
    for a in drawn {
        said[a as usize] = attrs[a as usize];
    }
    // Say at least one thing beyond the kind, never a word whose rate is 0 (rare words would
    // otherwise be named in every caption that drew nothing).
    if said.iter().skip(1).all(Option::is_none) {
        let avail: Vec<Attr> = options
            .iter()
            .filter(|&&(a, p)| attrs[a as usize].is_some_and(|v| m.rate(a, p, v) > 0.0))
            .map(|&(a, _)| a)
            .collect();
        if !avail.is_empty() {
            let a = avail[rng.gen_range(0..avail.len())];
            said[a as usize] = attrs[a as usize];
        }
    }
    (sentence(&said, rng), said)
}

/// Words for the stated attributes, put in a random template.
fn sentence(said: &Attrs, rng: &mut impl Rng) -> String {
    let get = |a: Attr| said[a as usize].map(usize::from);
    let counted = get(Attr::Count).is_some();
    let mut noun = match get(Attr::Kind) {
        Some(1) => digit_noun(get(Attr::Digit), rng),
        _ => shape_noun(get(Attr::Shape), get(Attr::Count), rng),
    };
    if let Some(c) = get(Attr::Colour) {
        noun = format!("{} {noun}", COLOURS[c]);
    }
    let mut tail = String::new();
    if let Some(t) = get(Attr::Texture) {
        tail += &format!(" on a {} background", TEXTURES[t]);
    }
    if let Some(p) = get(Attr::Position) {
        tail += &format!(" in the {}", POSITIONS[p]);
    }
    if !counted && rng.gen_bool(0.3) {
        let t = BARE_TEMPLATES[rng.gen_range(0..BARE_TEMPLATES.len())];
        return t.replace("{}", &format!("{noun}{tail}"));
    }
    let head = match get(Attr::Count) {
        Some(n) => COUNTS[n].to_string(),
        None if get(Attr::Kind) == Some(1) && rng.gen_bool(0.5) => "the".into(),
        None => article(&noun).into(),
    };
    let t = OPEN_TEMPLATES[rng.gen_range(0..OPEN_TEMPLATES.len())];
    t.replace("{}", &format!("{head} {noun}{tail}"))
}

fn shape_noun(shape: Option<usize>, count: Option<usize>, rng: &mut impl Rng) -> String {
    let plural = count.is_some_and(|n| n > 0);
    match (shape, plural) {
        (Some(s), false) => SHAPES[s].into(),
        (Some(s), true) => SHAPE_PLURALS[s].into(),
        (None, p) => {
            let w = if rng.gen_bool(0.5) { "object" } else { "shape" };
            if p {
                format!("{w}s")
            } else {
                w.into()
            }
        }
    }
}

fn digit_noun(digit: Option<usize>, rng: &mut impl Rng) -> String {
    let w = if rng.gen_bool(0.5) { "digit" } else { "number" };
    match digit {
        Some(d) => format!("{w} {}", DIGIT_NAMES[d]),
        None => w.into(),
    }
}

fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// Whether a caption stating `said` is true of an image with `attrs`.
pub fn matches(said: &Attrs, attrs: &Attrs) -> bool {
    said.iter().zip(attrs).all(|(s, a)| s.is_none() || s == a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn captions_are_true_of_their_scene() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = Mention {
            colour: 0.5,
            shape: 0.5,
            texture: 0.5,
            count: 0.5,
            position: 0.5,
            digit: 0.5,
            max: 0,
            rare: 0.5,
        };
        for _ in 0..200 {
            let s = sample_shapes(&mut rng, &[]);
            let (text, said) = caption(&s, &m, &mut rng);
            assert!(matches(&said, &s.attrs()), "{text}");
            assert!(said.iter().skip(1).any(Option::is_some), "{text}");
        }
        let s = sample_shapes(&mut rng, &[(Attr::Position, 2)]);
        assert_eq!(s.attrs()[Attr::Position as usize], Some(2));
        assert_eq!(s.attrs()[Attr::Count as usize], Some(0));
    }

    #[test]
    fn rare_words_follow_their_factor() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut m = Mention {
            colour: 0.3,
            shape: 0.7,
            texture: 0.5,
            count: 0.2,
            position: 0.9,
            digit: 0.9,
            max: 0,
            rare: 0.0,
        };
        // Share of scenes whose texture is rare and said, over 2000 captions.
        let mut rare_said = |m: &Mention| {
            let n = (0..2000)
                .filter(|_| {
                    let s = sample_shapes(&mut rng, &[]);
                    let (_, said) = caption(&s, m, &mut rng);
                    said[Attr::Texture as usize].is_some_and(|t| t >= 3)
                })
                .count();
            n as f64 / 2000.0
        };
        assert_eq!(rare_said(&m), 0.0);
        m.rare = 1.0;
        // 2 of 5 textures, said half the time: about 0.2.
        let share = rare_said(&m);
        assert!((0.15..0.25).contains(&share), "{share}");
    }

    #[test]
    fn shapes_sit_in_their_quadrant() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let s = Scene {
            colour: 0,
            texture: 0,
            object: Object::Shapes {
                shape: 1,
                quadrants: vec![3],
            },
        };
        let img = render(&s, &[], &mut rng);
        let red = |x, y| {
            let p: &Rgb<u8> = img.get_pixel(x, y);
            p.0[0] > 150 && p.0[1] < 100
        };
        assert!(red(24, 24));
        assert!(!red(8, 8) && !red(24, 8) && !red(8, 24));
    }
}
