//! Palisade's fuzz targets live in `tests/targets.rs` (see `fuzz/README.md`).
