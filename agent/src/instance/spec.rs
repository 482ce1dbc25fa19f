//! Builds the spec hearth-init gets from the instance spec and the image config.

use std::collections::BTreeMap;

use hearth_proto::init;

use crate::{images::ResolvedImage, model::pb};

/// Metrics interval asked of hearth-init.
pub const METRICS_INTERVAL_MS: u32 = 1000;

/// The init spec for one boot.
pub fn init_spec(
    id: &str,
    spec: &pb::InstanceSpec,
    image: &ResolvedImage,
    root: init::RootFs,
    network: Option<init::Network>,
) -> init::InstanceSpec {
    // Like container engines: overriding the entrypoint drops the image's CMD too.
    let (entrypoint, cmd) = match (&spec.entrypoint, &spec.cmd) {
        (Some(e), Some(c)) => (e.args.clone(), c.args.clone()),
        (Some(e), None) => (e.args.clone(), Vec::new()),
        (None, Some(c)) => (image.config.entrypoint.clone(), c.args.clone()),
        (None, None) => (image.config.entrypoint.clone(), image.config.cmd.clone()),
    };
    // Image env first, then the instance's (sorted, so the spec is deterministic).
    let mut env = image.config.env.clone();
    let overrides: BTreeMap<_, _> = spec.env.iter().collect();
    for (k, v) in overrides {
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    env.push(format!("HEARTH_INSTANCE_ID={id}"));
    let it = spec.instance_type.unwrap_or_default();
    init::InstanceSpec {
        instance_id: id.to_owned(),
        entrypoint,
        cmd,
        env,
        working_dir: image.config.working_dir.clone(),
        user: image.config.user.clone(),
        hostname: id.to_owned(),
        network,
        mounts: Vec::new(),
        rlimits: Vec::new(),
        root: Some(root),
        readiness: Some(init::Readiness {
            ports: spec.required_ports.clone(),
            timeout_millis: 0,
        }),
        metrics_interval_millis: METRICS_INTERVAL_MS,
        memory_limit_bytes: it.memory_mib << 20,
        stop_signal: spec.stop_signal,
        default_grace_millis: spec.stop_grace_millis.unwrap_or(0).max(0) as u64,
    }
}

/// The HTTP port of an instance: the spec's, else the first the image exposes, else `fallback`.
pub fn http_port(spec: &pb::InstanceSpec, image: Option<&ResolvedImage>, fallback: u32) -> u32 {
    if spec.default_port != 0 {
        return spec.default_port;
    }
    image
        .and_then(|i| i.config.exposed_ports.first().copied())
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ImageConfig;

    fn image() -> ResolvedImage {
        ResolvedImage {
            reference: "r".into(),
            digest: "sha256:x".into(),
            rootfs: "/img".into(),
            fstype: "erofs".into(),
            size_bytes: 1,
            config: ImageConfig {
                entrypoint: vec!["/bin/httpd".into()],
                cmd: vec!["-f".into()],
                env: vec!["PATH=/bin".into(), "A=1".into()],
                working_dir: "/www".into(),
                user: "1000".into(),
                exposed_ports: vec![80],
            },
        }
    }

    #[test]
    fn overrides_follow_container_semantics() {
        let root = init::RootFs::default();
        let mut spec = pb::InstanceSpec::default();
        spec.env.insert("A".into(), "2".into());
        let s = init_spec("a", &spec, &image(), root.clone(), None);
        assert_eq!(s.entrypoint, ["/bin/httpd"]);
        assert_eq!(s.cmd, ["-f"]);
        assert_eq!(s.env, ["PATH=/bin", "A=2", "HEARTH_INSTANCE_ID=a"]);
        spec.entrypoint = Some(pb::Command {
            args: vec!["/bin/sh".into()],
        });
        let s = init_spec("a", &spec, &image(), root.clone(), None);
        assert_eq!(
            (s.entrypoint.as_slice(), s.cmd.len()),
            (&["/bin/sh".to_owned()][..], 0)
        );
        spec.entrypoint = None;
        spec.cmd = Some(pb::Command {
            args: vec!["-v".into()],
        });
        let s = init_spec("a", &spec, &image(), root, None);
        assert_eq!(
            (s.entrypoint[0].as_str(), s.cmd[0].as_str()),
            ("/bin/httpd", "-v")
        );
        assert_eq!(http_port(&spec, Some(&image()), 8080), 80);
        assert_eq!(http_port(&spec, None, 8080), 8080);
    }
}
