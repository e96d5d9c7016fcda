//! The fallback of bf16 on the CPU: with the bf16 kernels turned off (as on a CPU that has
//! neither AMX nor AVX512-BF16), a bf16 backbone runs the f32 path and gives exactly the f32
//! backbone's embeddings. Its own test binary: the switch is read once per process.

mod common;

use atlas_clip::model::bf16_gemm;
use candle_core::DType;
use common::*;

#[test]
fn with_the_kernels_off_bf16_on_the_cpu_is_the_f32_path() {
    std::env::set_var("ATLAS_CPU_BF16", "off");
    assert_eq!(bf16_gemm::chosen(), None);
    let r = Reference::load();
    let (bb32, bb16) = (backbone(DType::F32), backbone(DType::BF16));
    assert_eq!(bb16.dtype(), DType::BF16);
    let pixels = r.t("pixel_values");
    let a = bb32.base_vision().unwrap().forward(&pixels).unwrap();
    let b = bb16.base_vision().unwrap().forward(&pixels).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let ta = bb32.text().unwrap().forward(&r.ids()).unwrap();
    let tb = bb16.text().unwrap().forward(&r.ids()).unwrap();
    assert_eq!(max_abs_diff(&ta, &tb), 0.0);
}
