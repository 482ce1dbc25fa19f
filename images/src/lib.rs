//! hearth-images: gets OCI images onto the host and into a form an instance boots from.
//!
//! # Layout
//!
//! - [`reference`]: image references (`name:tag`, `name@sha256:…`).

#![deny(missing_docs)]

pub mod reference;
