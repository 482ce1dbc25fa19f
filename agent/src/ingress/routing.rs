//! Which instance a request is for: the `x-hearth-instance` header, else the `Host`
//! (`<id>.<domain>`, port ignored, case-insensitive domain).

/// The longest instance id the proxy looks up (a DNS name's limit).
pub const MAX_ID_LEN: usize = 253;

/// Why a request names no instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// Neither the header nor the host names an instance.
    #[error("The request names no instance: send Host: <id>.<domain> or an {header} header")]
    NoInstance {
        /// The header's name.
        header: String,
    },
    /// The named id is not one the proxy accepts.
    #[error("{0:?} is not a valid instance id")]
    InvalidId(String),
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The host part of a `Host` header or URI authority: port and trailing dot removed.
pub fn host_without_port(host: &str) -> &str {
    let host = host.trim();
    let host = if host.starts_with('[') {
        // An IPv6 literal never names an instance; return it whole without the port.
        host.split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1])
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h)
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// The instance id of a request, from the header value (wins when present and non-empty) or
/// the host (`Host` header or `:authority`) under `domain`.
pub fn instance_id<'a>(
    header_name: &str,
    header: Option<&'a str>,
    host: Option<&'a str>,
    domain: Option<&str>,
) -> Result<&'a str, RoutingError> {
    if let Some(id) = header.map(str::trim).filter(|h| !h.is_empty()) {
        return if valid_id(id) {
            Ok(id)
        } else {
            Err(RoutingError::InvalidId(truncate(id)))
        };
    }
    let no_instance = || RoutingError::NoInstance {
        header: header_name.to_owned(),
    };
    let (Some(host), Some(domain)) = (host, domain) else {
        return Err(no_instance());
    };
    let host = host_without_port(host);
    let domain = domain.trim_matches('.');
    let split = host.len().wrapping_sub(domain.len() + 1);
    if host.len() <= domain.len() + 1 || !host.is_char_boundary(split) {
        return Err(no_instance());
    }
    let (id, suffix) = host.split_at(split);
    if !suffix.starts_with('.') || !suffix[1..].eq_ignore_ascii_case(domain) {
        return Err(no_instance());
    }
    if valid_id(id) {
        Ok(id)
    } else {
        Err(RoutingError::InvalidId(truncate(id)))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: &str = "x-hearth-instance";

    fn id<'a>(header: Option<&'a str>, host: Option<&'a str>) -> Result<&'a str, RoutingError> {
        instance_id(H, header, host, Some("hearth.test"))
    }

    #[test]
    fn host_under_the_domain_names_the_instance() {
        assert_eq!(id(None, Some("web-1.hearth.test")), Ok("web-1"));
        assert_eq!(id(None, Some("web-1.Hearth.TEST:8080")), Ok("web-1"));
        assert_eq!(id(None, Some("web-1.hearth.test.")), Ok("web-1"));
        assert_eq!(id(None, Some("a.b.hearth.test")), Ok("a.b"));
    }

    #[test]
    fn the_header_wins_over_the_host() {
        assert_eq!(id(Some("other"), Some("web-1.hearth.test")), Ok("other"));
        assert_eq!(id(Some("  "), Some("web-1.hearth.test")), Ok("web-1"));
        assert_eq!(id(Some("x"), None), Ok("x"));
    }

    #[test]
    fn other_hosts_name_nothing() {
        for host in [
            "hearth.test",
            ".hearth.test",
            "web-1.hearth.testing",
            "web-1xhearth.test",
            "example.com",
            "[::1]:80",
            "127.0.0.1:8080",
        ] {
            assert!(
                matches!(id(None, Some(host)), Err(RoutingError::NoInstance { .. })),
                "{host}"
            );
        }
        assert!(matches!(
            instance_id(H, None, Some("web-1.hearth.test"), None),
            Err(RoutingError::NoInstance { .. })
        ));
    }

    #[test]
    fn strange_ids_are_refused() {
        assert!(matches!(
            id(Some("a/b"), None),
            Err(RoutingError::InvalidId(_))
        ));
        assert!(matches!(
            id(None, Some("a b.hearth.test")),
            Err(RoutingError::InvalidId(_))
        ));
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(matches!(
            id(Some(&long), None),
            Err(RoutingError::InvalidId(_))
        ));
    }

    proptest! {
        #[test]
        fn any_valid_id_round_trips_through_the_host(
            id_ in "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,40}",
            port in proptest::option::of(1u16..),
        ) {
            let host = match port {
                Some(p) => format!("{id_}.hearth.test:{p}"),
                None => format!("{id_}.hearth.test"),
            };
            prop_assert_eq!(id(None, Some(&host)), Ok(id_.as_str()));
        }

        #[test]
        fn arbitrary_hosts_never_panic(host in ".{0,80}", header in proptest::option::of(".{0,80}")) {
            let _ = id(header.as_deref(), Some(&host));
        }
    }
}
