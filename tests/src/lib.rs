//! Hearth's end-to-end tests live in `tests/tests/`; this library is empty on purpose so that
//! the package has a target besides its tests.
//!
//! # Layout
//!
//! - `tests/artifacts.rs`: every kind of artefact builds (static init, test guests).

#![deny(missing_docs)]
