//! The `fedpriv` root package holds what spans the whole workspace: end-to-end tests
//! (`tests/`), benchmarks (`benches/`) and the demo federation (`examples/hospitals.rs`).
//! The product itself lives in the `common`, `coordinator` and `client` crates.

pub mod demo;
pub mod trial;
