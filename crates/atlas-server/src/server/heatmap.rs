//! Heat maps of Λ (task vectors × blocks, grouped by layer), as SVG with labels or as a plain
//! PNG: a diverging scale, blue below zero, red above, white at zero; and their handlers.

use super::error::{ApiError, ApiResult};
use super::{compositions, AppState};
use atlas_core::{Coefficients, Layout};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

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
const LEFT: usize = 160;
const TOP: usize = 30;

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

    pub fn svg(&self) -> String {
        let width = LEFT + self.n_blocks() * CELL_W + 20;
        let height = TOP + self.rows.len() * CELL_H + 60;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"{LEFT}\" y=\"16\">Λ per block (max |λ| = {:.4}; blue &lt; 0 &lt; red)</text>\n",
            self.max_abs
        );
        for (i, (name, row)) in self.rows.iter().zip(&self.values).enumerate() {
            let y = TOP + i * CELL_H;
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                LEFT - 6,
                y + CELL_H - 5,
                escape(name)
            );
            for (b, v) in row.iter().enumerate() {
                let [r, g, bl] = self.colour(*v);
                s += &format!(
                    "<rect x=\"{}\" y=\"{y}\" width=\"{CELL_W}\" height=\"{CELL_H}\" fill=\"#{r:02x}{g:02x}{bl:02x}\"><title>{} block {b}: {v}</title></rect>\n",
                    LEFT + b * CELL_W,
                    escape(name)
                );
            }
        }
        let base = TOP + self.rows.len() * CELL_H;
        for (label, start, end) in &self.groups {
            let x = LEFT + start * CELL_W;
            s += &format!(
                "<line x1=\"{x}\" y1=\"{TOP}\" x2=\"{x}\" y2=\"{}\" stroke=\"#888\" stroke-width=\"0.5\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text>\n",
                base + 4,
                x + (end - start) * CELL_W / 2,
                base + 16,
                escape(label)
            );
        }
        s + "</svg>\n"
    }

    pub fn png(&self) -> Result<Vec<u8>, image::ImageError> {
        let (w, h) = (
            (self.n_blocks() * CELL_W).max(1) as u32,
            (self.rows.len() * CELL_H).max(1) as u32,
        );
        let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        for (i, row) in self.values.iter().enumerate() {
            for (b, v) in row.iter().enumerate() {
                let c = image::Rgb(self.colour(*v));
                for dy in 0..CELL_H {
                    for dx in 0..CELL_W {
                        img.put_pixel((b * CELL_W + dx) as u32, (i * CELL_H + dy) as u32, c);
                    }
                }
            }
        }
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)?;
        Ok(out.into_inner())
    }

    fn colour(&self, v: f64) -> [u8; 3] {
        let t = if self.max_abs > 0.0 {
            (v / self.max_abs).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        let fade = |x: f64| (255.0 * (1.0 - x.abs())).round() as u8;
        if t >= 0.0 {
            [255, fade(t), fade(t)]
        } else {
            [fade(t), fade(t), 255]
        }
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
        assert!(svg.contains("a&lt;b") && svg.matches("<rect").count() == 10);
        let png = image::load_from_memory(&h.png().unwrap()).unwrap();
        assert_eq!(
            (png.width(), png.height()),
            (5 * CELL_W as u32, 2 * CELL_H as u32)
        );
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
