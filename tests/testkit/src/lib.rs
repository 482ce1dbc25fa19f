//! Shared support for Hearth's tests.
//!
//! # Layout
//!
//! - [`skip`]: when a test may skip (no root, no KVM) and how it says so; with
//!   `HEARTH_NO_SKIP=1` (set by `cargo xtask test` on machines that have root and KVM) a skip is
//!   a failure, so nothing is silently left out.
//! - [`artifacts`]: builds and locates what tests run but cargo does not build for them: the
//!   static musl `hearth-init`, the `no_std` test guests, host binaries of other packages.
//! - [`registry`]: a real `docker-registry` on 127.0.0.1 (anonymous, basic auth, token auth,
//!   HTTPS), stopped on drop.
//! - [`oci`]: test images (busybox, busybox httpd, custom layers) built as OCI layouts and
//!   pushed with skopeo.
//! - [`pki`]: test CAs and certificates made with openssl.
//! - [`rootfs`]: busybox root filesystems (a directory tree, an erofs or ext4 image of it).
//! - [`netns`]: network namespaces, veth pairs and background processes, removed on drop; raw
//!   packet sockets.

#![deny(missing_docs)]

pub mod artifacts;
pub mod netns;
pub mod oci;
pub mod pki;
pub mod registry;
pub mod rootfs;
pub mod skip;
