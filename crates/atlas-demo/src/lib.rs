//! atlas-demo: a small world in which everything is real (see the crate description).
