//! The fuzz targets' bodies, as plain functions: the stable `cargo test` corpus replays in
//! atlas-core and atlas-clip include these same files, so CI runs exactly what was fuzzed.

pub mod clip_harness;
pub mod core_harness;
