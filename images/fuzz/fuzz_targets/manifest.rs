//! Feeds arbitrary bytes to everything that parses what a registry sends: manifests and
//! indexes (under each content type), image configs, `WWW-Authenticate` challenges, token
//! answers, and references. Errors are fine; panics are not, and what parses must be usable.

#![no_main]

use hearth_images::{
    manifest::{self, Compression, Parsed},
    registry::auth,
};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: &[&str] = &[
    "",
    "application/json",
    manifest::OCI_MANIFEST,
    manifest::OCI_INDEX,
    manifest::DOCKER_MANIFEST,
    manifest::DOCKER_MANIFEST_LIST,
];

fuzz_target!(|data: &[u8]| {
    let ct = CONTENT_TYPES[data.first().copied().unwrap_or(0) as usize % CONTENT_TYPES.len()];
    match manifest::parse_manifest(ct, data) {
        Ok(Parsed::Manifest(m)) => {
            assert_eq!(m.schema_version, 2);
            for l in &m.layers {
                assert!(l.size >= 0);
                Compression::from_media_type(&l.media_type).expect("checked by the parser");
            }
        }
        Ok(Parsed::Index(i)) => {
            if let Ok(d) = i.amd64() {
                assert!(d.size >= 0);
            }
        }
        Err(_) => {}
    }
    if let Ok(c) = manifest::parse_config(data) {
        assert!(
            c.exposed_ports
                .iter()
                .all(|p| p.port.to_string().len() <= 5)
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = auth::parse_challenge(s);
        if let Ok(r) = s.parse::<hearth_images::Reference>() {
            // A parsed reference prints to something that parses to the same reference.
            let again: hearth_images::Reference = r.to_string().parse().expect("round trip");
            assert_eq!(again, r);
        }
    }
    let _ = auth::parse_token(data);
});
