//! Building test images as OCI layouts (layers as tar + gzip/zstd/none, config, manifest,
//! optionally a multi-platform index) and pushing them to a [`Registry`].
//!
//! [`busybox_image`] and [`httpd_image`] are ready-made images from Debian's busybox-static;
//! [`Layer`] builds arbitrary layers, including whiteouts and deliberately malicious entries
//! (traversal, device nodes) for negative tests.

use std::{fs, io::Write as _, path::Path};

use sha2::{Digest as _, Sha256};

use crate::registry::Registry;

/// Where Debian's busybox-static installs the static busybox.
pub const BUSYBOX: &str = "/bin/busybox";
/// The port [`httpd_image`] serves on.
pub const HTTPD_PORT: u16 = 8080;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A layer tarball under construction.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
    compression: Compression,
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    /// An empty gzip layer.
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            compression: Compression::Gzip,
        }
    }

    /// Sets the compression of the blob.
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    fn append(&mut self, mut h: tar::Header, path: &str, data: &[u8]) {
        self.builder
            .append_data(&mut h, path, data)
            .unwrap_or_else(|e| panic!("cannot add {path} to a test layer: {e}"));
    }

    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.append(header(tar::EntryType::Directory, mode, 0), path, &[][..]);
        self
    }

    /// A regular file.
    pub fn file(mut self, path: &str, mode: u32, content: &[u8]) -> Self {
        self.append(
            header(tar::EntryType::Regular, mode, content.len() as u64),
            path,
            content,
        );
        self
    }

    /// A regular file with an owner.
    pub fn file_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, content: &[u8]) -> Self {
        let mut h = header(tar::EntryType::Regular, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.append(h, path, content);
        self
    }

    /// A regular file with extended attributes (PAX `SCHILY.xattr.<name>` records).
    pub fn file_with_xattrs(
        mut self,
        path: &str,
        mode: u32,
        content: &[u8],
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        let pax: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.builder
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
            .expect("append pax header");
        self.file(path, mode, content)
    }

    /// A symlink.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut h, path, target)
            .unwrap_or_else(|e| panic!("cannot add symlink {path}: {e}"));
        self
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        self.builder
            .append_link(&mut h, path, target)
            .unwrap_or_else(|e| panic!("cannot add hard link {path}: {e}"));
        self
    }

    /// A whiteout: deletes `path` of lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, b"")
    }

    /// An opaque marker: `dir` hides everything lower layers put in it.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// An entry with a raw name (no checks: for traversal tests) and type.
    pub fn raw(mut self, name: &[u8], kind: tar::EntryType, link: &[u8], content: &[u8]) -> Self {
        let mut h = header(kind, 0o644, content.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).expect("device major");
            h.set_device_minor(3).expect("device minor");
        }
        h.set_cksum();
        self.builder.append(&h, content).expect("append raw entry");
        self
    }

    /// The uncompressed tar.
    pub fn tar(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }

    /// (uncompressed tar, blob, media type).
    fn finish(self) -> (Vec<u8>, Vec<u8>, &'static str) {
        let compression = self.compression;
        let tar = self.tar();
        match compression {
            Compression::None => (tar.clone(), tar, "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).expect("gzip");
                (
                    tar,
                    e.finish().expect("gzip"),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => {
                let z = zstd::encode_all(tar.as_slice(), 3).expect("zstd");
                (tar, z, "application/vnd.oci.image.layer.v1.tar+zstd")
            }
        }
    }
}

/// An image under construction: layers plus runtime config.
pub struct Image {
    layers: Vec<Layer>,
    config: serde_json::Value,
    architecture: String,
}

/// Blobs and manifest of a built image.
struct Built {
    manifest: Vec<u8>,
    blobs: Vec<Vec<u8>>,
}

impl Default for Image {
    fn default() -> Self {
        Self::new()
    }
}

impl Image {
    /// An empty linux/amd64 image.
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            config: serde_json::json!({}),
            architecture: "amd64".into(),
        }
    }

    /// Adds a layer on top.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Sets the runtime config (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`, `User`,
    /// `ExposedPorts`, … as in the OCI image config's `config` object).
    pub fn config(mut self, config: serde_json::Value) -> Self {
        self.config = config;
        self
    }

    /// Sets the architecture (default `amd64`).
    pub fn architecture(mut self, arch: &str) -> Self {
        self.architecture = arch.into();
        self
    }

    fn build(self) -> Built {
        let mut blobs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_descs = Vec::new();
        for layer in self.layers {
            let (tar, blob, media_type) = layer.finish();
            diff_ids.push(sha256(&tar));
            layer_descs.push(serde_json::json!({
                "mediaType": media_type, "digest": sha256(&blob), "size": blob.len(),
            }));
            blobs.push(blob);
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": self.architecture,
            "os": "linux",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("serialize config");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(&config), "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .expect("serialize manifest");
        blobs.push(config);
        Built { manifest, blobs }
    }

    /// Writes the image as an OCI layout in `dir`, tagged `tag`; returns the manifest digest.
    pub fn write_layout(self, dir: &Path, tag: &str) -> String {
        let built = self.build();
        let digest = sha256(&built.manifest);
        let entry = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": built.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        });
        write_layout(dir, built.blobs.into_iter().chain([built.manifest]), entry);
        digest
    }

    /// Builds the image in a temp layout and pushes it as `<registry>/<repository>:<tag>`;
    /// returns that reference.
    pub fn push(self, registry: &Registry, repository: &str, tag: &str) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        self.write_layout(dir.path(), "t");
        registry.push_layout(dir.path(), "t", repository, tag)
    }
}

fn write_layout(dir: &Path, blobs: impl IntoIterator<Item = Vec<u8>>, entry: serde_json::Value) {
    let blob_dir = dir.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).expect("create layout");
    for blob in blobs {
        let d = sha256(&blob);
        fs::write(blob_dir.join(&d["sha256:".len()..]), blob).expect("write blob");
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap())
        .expect("write index.json");
}

/// Writes a multi-platform image (an OCI image index over `images`, one per architecture) as
/// an OCI layout tagged `tag`; returns the index digest and the manifest digest per image.
pub fn write_index_layout(dir: &Path, tag: &str, images: Vec<Image>) -> (String, Vec<String>) {
    let mut blobs = Vec::new();
    let mut entries = Vec::new();
    let mut digests = Vec::new();
    for image in images {
        let arch = image.architecture.clone();
        let built = image.build();
        let digest = sha256(&built.manifest);
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": built.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        digests.push(digest);
        blobs.extend(built.blobs);
        blobs.push(built.manifest);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .expect("serialize index");
    let index_digest = sha256(&index);
    let entry = serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    });
    blobs.push(index);
    write_layout(dir, blobs, entry);
    (index_digest, digests)
}

/// The busybox applets linked in [`busybox_layer`].
pub const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "httpd", "sleep", "wget", "env", "id",
];

/// A base layer: static busybox at `/bin/busybox` with applet symlinks, `/etc/passwd`,
/// `/etc/group`, `/tmp` (1777) and `/root`.
pub fn busybox_layer() -> Layer {
    let busybox = fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("cannot read {BUSYBOX} (apt-get install busybox-static): {e}"));
    let mut l = Layer::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .dir("tmp", 0o1777)
        .dir("root", 0o700)
}

/// A busybox image whose default command is `sh`.
pub fn busybox_image() -> Image {
    Image::new()
        .layer(busybox_layer())
        .config(serde_json::json!({
            "Cmd": ["/bin/sh"],
            "Env": ["PATH=/bin"],
        }))
}

/// The page [`httpd_image`] serves at `/`.
pub const HTTPD_INDEX: &[u8] = b"hello from hearth\n";

/// A small HTTP server image: busybox httpd serving `/www` on port [`HTTPD_PORT`]
/// (two layers: busybox, then the site).
pub fn httpd_image() -> Image {
    Image::new()
        .layer(busybox_layer())
        .layer(
            Layer::new()
                .dir("www", 0o755)
                .file("www/index.html", 0o644, HTTPD_INDEX),
        )
        .config(serde_json::json!({
            "Entrypoint": ["/bin/httpd"],
            "Cmd": ["-f", "-v", "-p", HTTPD_PORT.to_string(), "-h", "/www"],
            "Env": ["PATH=/bin"],
            "WorkingDir": "/www",
            "ExposedPorts": {format!("{HTTPD_PORT}/tcp"): {}},
            "StopSignal": "SIGTERM",
        }))
}
