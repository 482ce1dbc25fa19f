//! The instance model: ids, specs (validated and filled with the node's defaults), states and
//! the small helpers around the generated `hearth.v1` types.

use std::net::IpAddr;

use crate::config::InstanceDefaults;
pub use hearth_proto::v1 as pb;

/// Longest instance id (a DNS label, so `<id>.<domain>` routes work).
pub const MAX_ID_LEN: usize = 63;

/// Why a request is invalid. The message names the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

fn invalid(msg: impl Into<String>) -> InvalidRequest {
    InvalidRequest(msg.into())
}

/// Checks an instance id: 1-63 of `a-z 0-9 -`, starting and ending with a letter or digit.
pub fn validate_id(id: &str) -> Result<(), InvalidRequest> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "Invalid instance id {id:?}: use 1-{MAX_ID_LEN} of a-z, 0-9 and -, starting and ending with a letter or digit"
        )))
    }
}

/// Parses `a.b.c.d/n` or `x::/n`.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn check_port(field: &str, port: u32) -> Result<(), InvalidRequest> {
    if port == 0 || port > 65535 {
        return Err(invalid(format!(
            "{field} {port} is not a TCP port (1-65535)"
        )));
    }
    Ok(())
}

fn check_millis(field: &str, v: Option<i64>) -> Result<(), InvalidRequest> {
    match v {
        Some(ms) if ms < 0 => Err(invalid(format!(
            "{field} is negative ({ms} ms): give 0 or more"
        ))),
        _ => Ok(()),
    }
}

/// Fills an instance type's defaults and checks its bounds; `field` names it in errors.
pub fn normalize_type(
    it: Option<pb::InstanceType>,
    defaults: &InstanceDefaults,
    field: &str,
) -> Result<pb::InstanceType, InvalidRequest> {
    let mut it = it.unwrap_or_default();
    if it.vcpus == 0 {
        it.vcpus = defaults.vcpus;
    }
    if it.memory_mib == 0 {
        it.memory_mib = defaults.memory_mib;
    }
    if it.disk_mib == 0 {
        it.disk_mib = defaults.disk_mib;
    }
    if it.vcpus > 256 {
        return Err(invalid(format!("{field}.vcpus {} is above 256", it.vcpus)));
    }
    if it.memory_mib < 16 {
        return Err(invalid(format!(
            "{field}.memory_mib {} is below the minimum of 16",
            it.memory_mib
        )));
    }
    Ok(it)
}

/// Validates a spec and fills every defaulted field, so two specs that mean the same compare
/// equal (which makes `CreateInstance` idempotent).
pub fn normalize_spec(
    mut spec: pb::InstanceSpec,
    defaults: &InstanceDefaults,
) -> Result<pb::InstanceSpec, InvalidRequest> {
    if spec.image.trim().is_empty() {
        return Err(invalid("spec.image is empty: name an image reference"));
    }
    spec.image
        .parse::<hearth_images::reference::Reference>()
        .map_err(|e| {
            invalid(format!(
                "spec.image {:?} is not an image reference: {e}",
                spec.image
            ))
        })?;
    let it = spec.instance_type.take();
    spec.instance_type = Some(normalize_type(it, defaults, "spec.instance_type")?);
    for k in spec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(invalid(format!(
                "spec.env key {k:?} is invalid: non-empty, without = or NUL"
            )));
        }
    }
    for v in spec.env.values() {
        if v.contains('\0') {
            return Err(invalid("spec.env values must not contain NUL"));
        }
    }
    for k in spec.labels.keys() {
        if k.is_empty() {
            return Err(invalid("spec.labels has an empty key"));
        }
    }
    if spec.default_port != 0 {
        check_port("spec.default_port", spec.default_port)?;
    }
    for &p in &spec.required_ports {
        check_port("spec.required_ports entry", p)?;
    }
    check_millis("spec.sleep_after_millis", spec.sleep_after_millis)?;
    check_millis("spec.stop_grace_millis", spec.stop_grace_millis)?;
    spec.sleep_after_millis
        .get_or_insert(defaults.sleep_after.as_millis() as i64);
    spec.stop_grace_millis
        .get_or_insert(defaults.stop_grace.as_millis() as i64);
    if !(0..=64).contains(&spec.stop_signal) {
        return Err(invalid(format!(
            "spec.stop_signal {} is not a signal number (1-64)",
            spec.stop_signal
        )));
    }
    if pb::ActivityExpiry::try_from(spec.activity_expiry).is_err() {
        return Err(invalid(format!(
            "spec.activity_expiry {} is not a known value",
            spec.activity_expiry
        )));
    }
    if spec.activity_expiry == pb::ActivityExpiry::Unspecified as i32 {
        spec.activity_expiry = pb::ActivityExpiry::Stop as i32;
    }
    let egress = spec.egress.get_or_insert_with(Default::default);
    for c in egress.allow_cidrs.iter().chain(&egress.deny_cidrs) {
        if parse_cidr(c).is_none() {
            return Err(invalid(format!(
                "spec.egress CIDR {c:?} is invalid: use ADDRESS/PREFIX"
            )));
        }
    }
    for cmd in [&spec.entrypoint, &spec.cmd].into_iter().flatten() {
        if cmd.args.iter().any(|a| a.contains('\0')) {
            return Err(invalid(
                "spec.entrypoint/cmd arguments must not contain NUL",
            ));
        }
    }
    Ok(spec)
}

/// Checks a stop request's signal and grace.
pub fn validate_stop(signal: i32, grace_millis: Option<i64>) -> Result<(), InvalidRequest> {
    if !(0..=64).contains(&signal) {
        return Err(invalid(format!(
            "signal {signal} is not a signal number (1-64)"
        )));
    }
    check_millis("grace_millis", grace_millis)
}

/// States in which the instance's runtime exists (a process to supervise).
pub fn is_active(state: pb::InstanceState) -> bool {
    matches!(
        state,
        pb::InstanceState::Starting
            | pb::InstanceState::Running
            | pb::InstanceState::Healthy
            | pb::InstanceState::Stopping
    )
}

/// The lower-case name of a state, for tables and logs.
pub fn state_name(state: pb::InstanceState) -> &'static str {
    match state {
        pb::InstanceState::Unspecified => "unknown",
        pb::InstanceState::Creating => "creating",
        pb::InstanceState::Created => "created",
        pb::InstanceState::Starting => "starting",
        pb::InstanceState::Running => "running",
        pb::InstanceState::Healthy => "healthy",
        pb::InstanceState::Stopping => "stopping",
        pb::InstanceState::Stopped => "stopped",
        pb::InstanceState::Failed => "failed",
    }
}

/// The lower-case name of a stop reason.
pub fn reason_name(reason: pb::StopReason) -> &'static str {
    match reason {
        pb::StopReason::Unspecified => "unknown",
        pb::StopReason::Exit => "exit",
        pb::StopReason::Signal => "signal",
        pb::StopReason::Oom => "oom",
        pb::StopReason::RuntimeError => "runtime_error",
        pb::StopReason::InitError => "init_error",
        pb::StopReason::Destroyed => "destroyed",
    }
}

/// The lower-case name of an error kind.
pub fn error_kind_name(kind: pb::ErrorKind) -> &'static str {
    match kind {
        pb::ErrorKind::Unspecified => "unknown",
        pb::ErrorKind::Image => "image",
        pb::ErrorKind::Runtime => "runtime",
        pb::ErrorKind::InitUnreachable => "init_unreachable",
        pb::ErrorKind::Protocol => "protocol",
        pb::ErrorKind::BadSpec => "bad_spec",
        pb::ErrorKind::UnknownUser => "unknown_user",
        pb::ErrorKind::Rootfs => "rootfs",
        pb::ErrorKind::Network => "network",
        pb::ErrorKind::Spawn => "spawn",
        pb::ErrorKind::ReadinessTimeout => "readiness_timeout",
        pb::ErrorKind::Internal => "internal",
        pb::ErrorKind::Lost => "lost",
    }
}

/// A one-word name of an event's kind.
pub fn event_name(event: &pb::Event) -> &'static str {
    use pb::event::Kind;
    match &event.kind {
        None => "unknown",
        Some(Kind::Created(_)) => "created",
        Some(Kind::Starting(_)) => "starting",
        Some(Kind::Started(_)) => "started",
        Some(Kind::Ready(_)) => "ready",
        Some(Kind::ActivityExpired(_)) => "activity_expired",
        Some(Kind::Stopping(_)) => "stopping",
        Some(Kind::Stopped(_)) => "stopped",
        Some(Kind::Error(_)) => "error",
        Some(Kind::Destroyed(_)) => "destroyed",
    }
}

/// Maps hearth-init's error kind to the API's.
pub fn error_kind_from_init(kind: hearth_proto::init::InitErrorKind) -> pb::ErrorKind {
    use hearth_proto::init::InitErrorKind as K;
    match kind {
        K::BadSpec => pb::ErrorKind::BadSpec,
        K::UnknownUser => pb::ErrorKind::UnknownUser,
        K::Rootfs => pb::ErrorKind::Rootfs,
        K::Network => pb::ErrorKind::Network,
        K::Spawn => pb::ErrorKind::Spawn,
        K::ReadinessTimeout => pb::ErrorKind::ReadinessTimeout,
        K::Protocol => pb::ErrorKind::Protocol,
        K::Internal | K::Unspecified => pb::ErrorKind::Internal,
    }
}

/// Maps hearth-init's exit reason to the API's stop reason.
pub fn stop_reason_from_init(reason: hearth_proto::init::ExitReason) -> pb::StopReason {
    use hearth_proto::init::ExitReason as R;
    match reason {
        R::Exit => pb::StopReason::Exit,
        R::Signal => pb::StopReason::Signal,
        R::Oom => pb::StopReason::Oom,
        R::InitError => pb::StopReason::InitError,
        R::Unspecified => pb::StopReason::RuntimeError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn spec() -> pb::InstanceSpec {
        pb::InstanceSpec {
            image: "127.0.0.1:5000/hearth/httpd:v1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64), "a/b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn normalization_fills_defaults_and_is_idempotent() {
        let d = Config::default().defaults;
        let n = normalize_spec(spec(), &d).unwrap();
        assert_eq!(n.sleep_after_millis, Some(600_000));
        assert_eq!(n.stop_grace_millis, Some(900_000));
        assert_eq!(n.instance_type.as_ref().unwrap().memory_mib, 256);
        assert_eq!(n.activity_expiry, pb::ActivityExpiry::Stop as i32);
        assert_eq!(normalize_spec(n.clone(), &d).unwrap(), n);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let d = Config::default().defaults;
        let cases: Vec<(pb::InstanceSpec, &str)> = vec![
            (pb::InstanceSpec::default(), "spec.image"),
            (
                pb::InstanceSpec {
                    image: "UPPER/x".into(),
                    ..spec()
                },
                "spec.image",
            ),
            (
                pb::InstanceSpec {
                    stop_grace_millis: Some(-1),
                    ..spec()
                },
                "stop_grace_millis is negative",
            ),
            (
                pb::InstanceSpec {
                    default_port: 70000,
                    ..spec()
                },
                "default_port",
            ),
            (
                pb::InstanceSpec {
                    egress: Some(pb::EgressPolicy {
                        deny_cidrs: vec!["10.0.0.0/33".into()],
                        ..Default::default()
                    }),
                    ..spec()
                },
                "CIDR",
            ),
        ];
        for (s, want) in cases {
            let err = normalize_spec(s, &d).unwrap_err();
            assert!(err.0.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn stop_requests() {
        validate_stop(0, None).unwrap();
        validate_stop(15, Some(0)).unwrap();
        assert!(validate_stop(15, Some(-5)).is_err());
        assert!(validate_stop(99, None).is_err());
    }
}
