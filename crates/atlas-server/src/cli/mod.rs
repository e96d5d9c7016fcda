//! The subcommands other than `bench`, one file each: `serve` (the HTTP server in
//! `crate::server`), `learn`, `finetune`, `task-vector`, `merge` and `demo`.

pub mod demo;
pub mod finetune;
pub mod learn;
pub mod merge;
pub mod model;
pub mod progress;
pub mod serve;
pub mod task_vector;
