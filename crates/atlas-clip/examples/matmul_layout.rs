//! Why inference keeps linear weights transposed: times x·Wᵀ on ViT-B/32's matmul shapes (50
//! tokens = batch 1, 400 = batch 8) with Wᵀ as a transposed view of W (what learning uses) and
//! as a contiguous copy (what inference towers hold), in GFLOP/s.
//!
//! `CANDLE_NUM_THREADS=2 RAYON_NUM_THREADS=2 cargo run --release -p atlas-clip --example matmul_layout`

use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    for m in [50usize, 400] {
        for (k, n) in [(768usize, 3072usize), (3072, 768), (768, 2304)] {
            let x = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
            let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
            let wt = w.t().unwrap().contiguous().unwrap();
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                let t = Instant::now();
                for _ in 0..20 {
                    f();
                }
                t.elapsed().as_secs_f64() / 20.0 * 1e3
            };
            let a = time(&|| x.matmul(&w.t().unwrap()).unwrap());
            let b = time(&|| x.matmul(&wt).unwrap());
            let gf = 2.0 * (m * k * n) as f64 / 1e9;
            println!("m {m} k {k} n {n}: w.t() {a:.2} ms ({:.1} GF/s)  wt contiguous {b:.2} ms ({:.1} GF/s)", gf / a * 1e3, gf / b * 1e3);
        }
    }
}
