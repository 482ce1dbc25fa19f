//! hearth-init: the PID 1 of every Hearth instance, in a microVM or in the sandbox runtime.
//!
//! # Layout
//!
//! - [`bootstrap`]: the `hearth.*` options init starts from (kernel command line, or argv in
//!   the sandbox).

#![deny(missing_docs)]

pub mod bootstrap;
