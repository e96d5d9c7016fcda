//! Heat maps of Λ (task vectors × blocks, grouped by layer), as SVG or PNG with the same
//! picture: a title, the task vectors naming the rows, the layers marked under the blocks, and
//! a colour bar of the diverging scale (blue below zero, red above, white at zero); and their
//! handlers. The PNG's text is drawn with embedded-graphics' built-in bitmap fonts, so no
//! system font is needed (containers have none).

use super::error::{ApiError, ApiResult};
use super::{compositions, AppState};
use atlas_core::{Coefficients, Layout};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use embedded_graphics::mono_font::iso_8859_7::{FONT_5X8, FONT_6X10};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle};
use embedded_graphics::text::{Alignment, Baseline, Text, TextStyleBuilder};

pub struct Heatmap {
    rows: Vec<String>,
    /// Per row, one value per block (per-part values averaged).
    values: Vec<Vec<f64>>,
    /// (label, first block, end block) of consecutive blocks in one layer.
    groups: Vec<(String, usize, usize)>,
    max_abs: f64,
}

const CELL_W: usize = 4;
const CELL_H: usize = 18;
/// Room for the row labels, left of the cells.
const LEFT: usize = 160;
/// Room for the title, above the cells.
const TOP: usize = 30;
const BAR_W: usize = 200;
const BAR_H: usize = 10;
/// Row labels longer than this are cut (the PNG font is 6 pixels wide).
const LABEL_CHARS: usize = 24;
const GRID: [u8; 3] = [0x88, 0x88, 0x88];

/// Where things go, in pixels (the SVG's user units are pixels too), for both renderings.
struct Frame {
    width: usize,
    height: usize,
    /// The bottom of the cells.
    base: usize,
    /// The top of the colour bar.
    bar_y: usize,
}

impl Heatmap {
    pub fn new(
        rows: Vec<String>,
        blocks: Vec<String>,
        layout: Layout,
        values: &[f64],
    ) -> Result<Heatmap, atlas_core::CoreError> {
        let c = Coefficients::new(layout, rows.len(), blocks.len(), values.to_vec())?;
        let values: Vec<Vec<f64>> = (0..rows.len())
            .map(|i| {
                (0..blocks.len())
                    .map(|b| {
                        let v = c.block(i, b);
                        v.iter().sum::<f64>() / v.len() as f64
                    })
                    .collect()
            })
            .collect();
        let max_abs = values.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        Ok(Heatmap {
            rows,
            values,
            groups: groups(&blocks),
            max_abs,
        })
    }

    fn n_blocks(&self) -> usize {
        self.values.first().map_or(0, Vec::len)
    }

    fn title(&self) -> String {
        format!(
            "Λ per block (max |λ| = {:.4}; blue < 0 < red)",
            self.max_abs
        )
    }

    /// The colour bar's tick labels: (text, x, anchor) at -max, 0 and +max.
    fn ticks(&self) -> [(String, usize, Alignment); 3] {
        [
            (format!("{:.3}", -self.max_abs), LEFT, Alignment::Left),
            ("0".into(), LEFT + BAR_W / 2, Alignment::Center),
            (
                format!("{:.3}", self.max_abs),
                LEFT + BAR_W,
                Alignment::Right,
            ),
        ]
    }

    fn frame(&self) -> Frame {
        let base = TOP + self.rows.len() * CELL_H;
        let bar_y = base + 26;
        let width = (LEFT + self.n_blocks() * CELL_W + 20)
            .max(LEFT + BAR_W + 40)
            .max(16 + 6 * self.title().chars().count());
        Frame {
            width,
            height: bar_y + BAR_H + 22,
            base,
            bar_y,
        }
    }

    pub fn svg(&self) -> String {
        let f = self.frame();
        let (width, height) = (f.width, f.height);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"{width}\" height=\"{height}\" fill=\"#fff\"/>\n<text id=\"title\" x=\"8\" y=\"16\">{}</text>\n",
            escape(&self.title())
        );
        for (i, (name, row)) in self.rows.iter().zip(&self.values).enumerate() {
            let y = TOP + i * CELL_H;
            s += &format!(
                "<text class=\"row\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}<title>{}</title></text>\n",
                LEFT - 6,
                y + CELL_H - 5,
                escape(&short(name)),
                escape(name)
            );
            for (b, v) in row.iter().enumerate() {
                s += &format!(
                    "<rect x=\"{}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"{}\"><title>{} block {b}: {v}</title></rect>\n",
                    LEFT + b * CELL_W,
                    hex(self.colour(*v)),
                    escape(name)
                );
            }
        }
        for (label, start, end) in &self.groups {
            let x = LEFT + start * CELL_W;
            s += &format!(
                "<line x1=\"{x}\" y1=\"{TOP}\" x2=\"{x}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"0.5\"/>\n<text class=\"layer\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text>\n",
                f.base + 4,
                hex(GRID),
                x + (end - start) * CELL_W / 2,
                f.base + 16,
                escape(label)
            );
        }
        // The colour bar: the scale from -max (blue) through 0 (white) to +max (red).
        s += &format!(
            "<g id=\"colour-bar\">\n<linearGradient id=\"scale\"><stop offset=\"0\" stop-color=\"{}\"/><stop offset=\"0.5\" stop-color=\"#ffffff\"/><stop offset=\"1\" stop-color=\"{}\"/></linearGradient>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">λ</text>\n<rect x=\"{LEFT}\" y=\"{}\" width=\"{BAR_W}\" height=\"{BAR_H}\" fill=\"url(#scale)\" stroke=\"{}\" stroke-width=\"0.5\"/>\n",
            hex(shade(-1.0)),
            hex(shade(1.0)),
            LEFT - 6,
            f.bar_y + BAR_H - 1,
            f.bar_y,
            hex(GRID),
        );
        for (text, x, align) in self.ticks() {
            let anchor = match align {
                Alignment::Left => "start",
                Alignment::Center => "middle",
                Alignment::Right => "end",
            };
            s += &format!(
                "<text class=\"tick\" x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\" font-size=\"9\">{text}</text>\n",
                f.bar_y + BAR_H + 12
            );
        }
        s + "</g>\n</svg>\n"
    }

    /// The SVG's picture as pixels, its text in bitmap fonts.
    pub fn png(&self) -> Result<Vec<u8>, image::ImageError> {
        let f = self.frame();
        let mut c = Canvas(image::RgbImage::from_pixel(
            f.width as u32,
            f.height as u32,
            image::Rgb([255, 255, 255]),
        ));
        c.text(&self.title(), 8, 16, &FONT_6X10, Alignment::Left);
        for (i, (name, row)) in self.rows.iter().zip(&self.values).enumerate() {
            let y = TOP + i * CELL_H;
            c.text(
                &short(name),
                LEFT - 6,
                y + CELL_H - 5,
                &FONT_6X10,
                Alignment::Right,
            );
            for (b, v) in row.iter().enumerate() {
                c.fill(LEFT + b * CELL_W, y, CELL_W, CELL_H, self.colour(*v));
            }
        }
        for (label, start, end) in &self.groups {
            let x = LEFT + start * CELL_W;
            c.line((x, TOP), (x, f.base + 4), GRID);
            let middle = x + (end - start) * CELL_W / 2;
            c.text(label, middle, f.base + 16, &FONT_5X8, Alignment::Center);
        }
        c.text(
            "λ",
            LEFT - 6,
            f.bar_y + BAR_H - 1,
            &FONT_6X10,
            Alignment::Right,
        );
        for dx in 0..BAR_W {
            let t = 2.0 * dx as f64 / (BAR_W - 1) as f64 - 1.0;
            c.fill(LEFT + dx, f.bar_y, 1, BAR_H, shade(t));
        }
        let (x0, x1, y0, y1) = (LEFT, LEFT + BAR_W, f.bar_y, f.bar_y + BAR_H);
        c.line((x0, y0), (x1, y0), GRID);
        c.line((x0, y1), (x1, y1), GRID);
        c.line((x0, y0), (x0, y1), GRID);
        c.line((x1, y0), (x1, y1), GRID);
        for (text, x, align) in self.ticks() {
            c.text(&text, x, f.bar_y + BAR_H + 12, &FONT_5X8, align);
        }
        let mut out = std::io::Cursor::new(Vec::new());
        c.0.write_to(&mut out, image::ImageFormat::Png)?;
        Ok(out.into_inner())
    }

    fn colour(&self, v: f64) -> [u8; 3] {
        let t = if self.max_abs > 0.0 {
            (v / self.max_abs).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        shade(t)
    }
}

/// The diverging scale at `t` in [-1, 1]: blue, white at 0, red.
fn shade(t: f64) -> [u8; 3] {
    let fade = |x: f64| (255.0 * (1.0 - x.abs())).round() as u8;
    if t >= 0.0 {
        [255, fade(t), fade(t)]
    } else {
        [fade(t), fade(t), 255]
    }
}

/// A row label that fits left of the cells.
fn short(name: &str) -> String {
    if name.chars().count() <= LABEL_CHARS {
        name.to_string()
    } else {
        let kept: String = name.chars().take(LABEL_CHARS - 2).collect();
        format!("{kept}..")
    }
}

fn hex([r, g, b]: [u8; 3]) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// An RGB image as an embedded-graphics target (pixels outside it are dropped).
struct Canvas(image::RgbImage);

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Rgb888>>,
    {
        let (w, h) = self.0.dimensions();
        for Pixel(p, c) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(p.x), u32::try_from(p.y)) {
                if x < w && y < h {
                    self.0.put_pixel(x, y, image::Rgb([c.r(), c.g(), c.b()]));
                }
            }
        }
        Ok(())
    }
}

impl Canvas {
    /// Text in black with its baseline at `y`; characters the font lacks show as `?`.
    fn text(&mut self, text: &str, x: usize, y: usize, font: &MonoFont, align: Alignment) {
        let style = TextStyleBuilder::new()
            .alignment(align)
            .baseline(Baseline::Alphabetic)
            .build();
        let at = Point::new(x as i32, y as i32);
        let ink = MonoTextStyle::new(font, Rgb888::BLACK);
        let _ = Text::with_text_style(text, at, ink, style).draw(self);
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, [r, g, b]: [u8; 3]) {
        for py in y..y + h {
            for px in x..x + w {
                if (px as u32) < self.0.width() && (py as u32) < self.0.height() {
                    self.0
                        .put_pixel(px as u32, py as u32, image::Rgb([r, g, b]));
                }
            }
        }
    }

    fn line(&mut self, (x0, y0): (usize, usize), (x1, y1): (usize, usize), [r, g, b]: [u8; 3]) {
        let at = |x: usize, y: usize| Point::new(x as i32, y as i32);
        let style = PrimitiveStyle::with_stroke(Rgb888::new(r, g, b), 1);
        let _ = Line::new(at(x0, y0), at(x1, y1))
            .into_styled(style)
            .draw(self);
    }
}

/// Consecutive blocks by layer: "L3" for names with `layers.3.`, else the name's first part.
fn groups(blocks: &[String]) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    for (b, name) in blocks.iter().enumerate() {
        let label = layer_label(name);
        match out.last_mut() {
            Some(g) if g.0 == label => g.2 = b + 1,
            _ => out.push((label, b, b + 1)),
        }
    }
    out
}

fn layer_label(name: &str) -> String {
    if let Some(rest) = name.split("layers.").nth(1) {
        let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !n.is_empty() {
            return format!("L{n}");
        }
    }
    if name.contains("embed") || name.contains("pre_layrnorm") {
        "emb".into()
    } else {
        "out".into()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A composition's Λ as a heat map (409 while it has no coefficients).
fn of_composition(s: &AppState, id: &str) -> ApiResult<Heatmap> {
    let model = s.ready()?;
    let c = compositions::find(s, id)?;
    let values = c.coefficients.ok_or_else(|| {
        ApiError::conflict(format!(
            "composition {id} has no coefficients yet (it is {})",
            c.status.as_str()
        ))
    })?;
    let blocks: Vec<String> = model
        .backbone
        .manifest()
        .blocks()
        .iter()
        .map(|b| b.name.clone())
        .collect();
    Heatmap::new(c.task_vectors, blocks, c.layout, &values).map_err(ApiError::internal)
}

/// GET /compositions/{id}/coefficients.svg
pub async fn svg(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let svg = of_composition(&s, &id)?.svg();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

/// GET /compositions/{id}/coefficients.png
pub async fn png(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let png = of_composition(&s, &id)?.png().map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks() -> Vec<String> {
        [
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.mlp.fc2.weight",
            "vision_model.encoder.layers.1.mlp.fc1.weight",
            "visual_projection.weight",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn groups_follow_layers_and_colours_follow_sign() {
        let h = Heatmap::new(
            vec!["a<b".into(), "c".into()],
            blocks(),
            Layout::PerBlock,
            &[0.5, -1.0, 0.0, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0],
        )
        .unwrap();
        let labels: Vec<_> = h.groups.iter().map(|g| (g.0.as_str(), g.1, g.2)).collect();
        assert_eq!(
            labels,
            [("emb", 0, 1), ("L0", 1, 3), ("L1", 3, 4), ("out", 4, 5)]
        );
        assert_eq!(h.colour(1.0), [255, 0, 0]);
        assert_eq!(h.colour(-1.0), [0, 0, 255]);
        assert_eq!(h.colour(0.0), [255, 255, 255]);
        let svg = h.svg();
        assert!(svg.contains("a&lt;b"));
        assert_eq!(
            svg.matches("<rect x=").count(),
            10 + 1,
            "cells and the colour bar"
        );
    }

    /// Dark pixels (text, lines) in a rectangle of the image.
    fn ink(img: &image::RgbImage, x: usize, y: usize, w: usize, h: usize) -> usize {
        let mut n = 0;
        for py in y..y + h {
            for px in x..x + w {
                let [r, g, b] = img.get_pixel(px as u32, py as u32).0;
                n += usize::from(r < 100 && g < 100 && b < 100);
            }
        }
        n
    }

    /// The PNG was 288×108 bare pixels: it must carry the SVG's title, row names, layer
    /// labels and a colour bar, at the SVG's size. A row with an empty name is the control:
    /// its label region stays blank, so the ink found elsewhere is the labels'.
    #[test]
    fn the_png_has_the_svgs_labels_title_and_colour_bar() {
        let h = Heatmap::new(
            vec![
                "MNIST".into(),
                String::new(),
                "a-rather-long-task-vector-name".into(),
            ],
            blocks(),
            Layout::PerBlock,
            &[
                0.5, -1.0, 0.0, 1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5,
            ],
        )
        .unwrap();
        let svg = h.svg();
        let f = h.frame();
        assert!(svg.contains(&format!("width=\"{}\" height=\"{}\"", f.width, f.height)));
        let png = image::load_from_memory(&h.png().unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(
            (png.width() as usize, png.height() as usize),
            (f.width, f.height)
        );
        // The title, above the cells.
        assert!(ink(&png, 0, 0, f.width, TOP - 4) > 100);
        // Row names left of their rows; the empty one leaves its row blank.
        let row = |i: usize| ink(&png, 0, TOP + i * CELL_H, LEFT - 2, CELL_H);
        assert!(row(0) > 20 && row(2) > 20, "{} {}", row(0), row(2));
        assert_eq!(row(1), 0);
        // Layer labels under the cells; the colour bar's ticks under it.
        assert!(ink(&png, LEFT, f.base + 6, 5 * CELL_W + 10, 12) > 10);
        assert!(ink(&png, LEFT, f.bar_y + BAR_H + 2, BAR_W + 1, 12) > 20);
        // The bar runs from blue through white to red.
        let y = (f.bar_y + BAR_H / 2) as u32;
        assert_eq!(
            png.get_pixel(LEFT as u32 + 1, y).0,
            shade(-1.0 + 2.0 / 199.0)
        );
        assert_eq!(
            png.get_pixel((LEFT + BAR_W - 2) as u32, y).0,
            shade(1.0 - 2.0 / 199.0)
        );
        let mid = png.get_pixel((LEFT + BAR_W / 2) as u32, y).0;
        assert!(mid.iter().all(|&c| c > 250), "{mid:?}");
        // A cell: block 1 of row 0 is -1, full blue.
        let cell = png
            .get_pixel((LEFT + CELL_W + 1) as u32, (TOP + 5) as u32)
            .0;
        assert_eq!(cell, [0, 0, 255]);
        // The SVG has the same parts: title, row names (long ones cut, whole in a tooltip),
        // layer labels and the colour bar with its ticks.
        assert!(svg.contains("<text id=\"title\""));
        assert!(svg.contains(">MNIST<title>MNIST</title>"));
        assert!(
            svg.contains(">a-rather-long-task-vec..<title>a-rather-long-task-vector-name</title>")
        );
        for layer in ["emb", "L0", "L1", "out"] {
            assert!(svg.contains(&format!(">{layer}</text>")), "{layer}");
        }
        let bar = &svg[svg.find("<g id=\"colour-bar\">").expect("a colour bar")..];
        assert!(bar.contains("fill=\"url(#scale)\""));
        for tick in ["-1.000", ">0<", "1.000"] {
            assert!(bar.contains(tick), "{tick}");
        }
    }

    #[test]
    fn per_part_values_average_per_block() {
        let values: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let h = Heatmap::new(
            vec!["a".into()],
            blocks(),
            Layout::PerPart { k: 2, seed: 0 },
            &values,
        )
        .unwrap();
        assert_eq!(h.values[0], vec![0.5, 2.5, 4.5, 6.5, 8.5]);
        assert!(Heatmap::new(vec!["a".into()], blocks(), Layout::PerBlock, &[1.0]).is_err());
    }
}
