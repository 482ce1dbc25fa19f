//! hearthctl's library half: connecting to the agent and rendering answers for people (tables,
//! one line per event) or scripts (`--json`). The binary (`src/bin/hearthctl.rs`) parses the
//! command line and calls these.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::model::{self, pb};

/// The generated client.
pub type Client = pb::agent_client::AgentClient<Channel>;

/// Connects to the agent's Unix socket.
pub async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let path: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://hearth-agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

/// A Unix-nanosecond time as RFC 3339 (UTC, seconds), or "-" for 0.
pub fn time(nanos: i64) -> String {
    if nanos <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A millisecond duration for people.
pub fn duration_ms(ms: i64) -> String {
    if ms <= 0 {
        return "0s".into();
    }
    humantime::format_duration(std::time::Duration::from_millis(ms as u64)).to_string()
}

/// Pads rows into aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(&c);
            if i + 1 < n {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|s| s.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

fn state(i: &pb::Instance) -> String {
    let s = pb::InstanceState::try_from(i.state).unwrap_or_default();
    let mut name = model::state_name(s).to_owned();
    if let Some(e) = &i.exit
        && matches!(s, pb::InstanceState::Stopped | pb::InstanceState::Failed)
    {
        let r = pb::StopReason::try_from(e.reason).unwrap_or_default();
        name.push_str(&format!(" ({}, {})", e.exit_code, model::reason_name(r)));
    }
    name
}

/// The `ls` table.
pub fn instances_table(list: &[pb::Instance]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let spec = i.spec.clone().unwrap_or_default();
            let it = spec.instance_type.unwrap_or_default();
            vec![
                i.id.clone(),
                state(i),
                spec.image,
                format!("{}cpu/{}MiB", it.vcpus, it.memory_mib),
                i.boots.to_string(),
                time(i.created_at_unix_nanos),
            ]
        })
        .collect();
    table(&["ID", "STATE", "IMAGE", "TYPE", "BOOTS", "CREATED"], &rows)
}

/// The `get` view.
pub fn instance_detail(i: &pb::Instance) -> String {
    let spec = i.spec.clone().unwrap_or_default();
    let it = spec.instance_type.unwrap_or_default();
    let mut rows = vec![
        ("id", i.id.clone()),
        ("state", state(i)),
        ("image", format!("{} ({})", spec.image, i.image_digest)),
        ("runtime", i.runtime.clone()),
        (
            "type",
            format!(
                "{} vCPU, {} MiB memory, {} MiB disk",
                it.vcpus, it.memory_mib, it.disk_mib
            ),
        ),
        ("boots", i.boots.to_string()),
        ("created", time(i.created_at_unix_nanos)),
        ("started", time(i.started_at_unix_nanos)),
        (
            "sleep after",
            duration_ms(spec.sleep_after_millis.unwrap_or(0)),
        ),
        (
            "stop grace",
            duration_ms(spec.stop_grace_millis.unwrap_or(0)),
        ),
    ];
    if !i.address.is_empty() {
        rows.push(("address", i.address.clone()));
    }
    if i.activity_deadline_unix_nanos != 0 {
        rows.push(("sleeps at", time(i.activity_deadline_unix_nanos)));
    }
    if i.stop_deadline_unix_nanos != 0 {
        rows.push(("grace ends", time(i.stop_deadline_unix_nanos)));
    }
    if let Some(e) = &i.error {
        let k = pb::ErrorKind::try_from(e.kind).unwrap_or_default();
        rows.push((
            "error",
            format!("{}: {}", model::error_kind_name(k), e.message),
        ));
    }
    for (k, v) in &spec.labels {
        rows.push(("label", format!("{k}={v}")));
    }
    rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect()
}

/// One event as a line.
pub fn event_line(e: &pb::Event) -> String {
    use pb::event::Kind;
    let detail = match &e.kind {
        Some(Kind::Created(c)) => format!("image {}", c.image_digest),
        Some(Kind::Starting(s)) => format!("boot {}", s.boot),
        Some(Kind::Started(s)) => format!(
            "pid {} ({}, spawned {} ms after start)",
            s.pid,
            if s.warm { "warm" } else { "cold" },
            s.spawned_micros / 1000
        ),
        Some(Kind::Ready(r)) => format!("{} ms after start", r.start_to_ready_micros / 1000),
        Some(Kind::ActivityExpired(a)) => {
            if a.will_stop {
                "stopping".into()
            } else {
                "notify only".into()
            }
        }
        Some(Kind::Stopping(s)) => {
            let cause = match pb::StopCause::try_from(s.cause).unwrap_or_default() {
                pb::StopCause::Request => "request",
                pb::StopCause::ActivityExpired => "activity expired",
                pb::StopCause::Shutdown => "agent shutdown",
                pb::StopCause::Unspecified => "unknown",
            };
            format!(
                "signal {}, grace {} ({cause})",
                s.signal,
                duration_ms(s.grace_millis as i64)
            )
        }
        Some(Kind::Stopped(s)) => {
            let x = s.exit.unwrap_or_default();
            let r = pb::StopReason::try_from(x.reason).unwrap_or_default();
            let mut d = format!("exit_code={} reason={}", x.exit_code, model::reason_name(r));
            if x.killed_after_grace {
                d.push_str(" killed_after_grace");
            }
            d
        }
        Some(Kind::Error(er)) => {
            let x = er.error.clone().unwrap_or_default();
            let k = pb::ErrorKind::try_from(x.kind).unwrap_or_default();
            format!("{}: {}", model::error_kind_name(k), x.message)
        }
        Some(Kind::Destroyed(_)) | None => String::new(),
    };
    format!(
        "{:>6}  {}  {:<20} {:<16} {}",
        e.seq,
        time(e.at_unix_nanos),
        e.instance_id,
        model::event_name(e),
        detail
    )
    .trim_end()
    .to_owned()
}

/// The `images ls` table.
pub fn images_table(list: &[pb::ImageInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.reference.clone(),
                i.digest.chars().take(19).collect(),
                format!("{:.1} MiB", i.size_bytes as f64 / (1 << 20) as f64),
                i.in_use.to_string(),
                if i.pinned { "yes" } else { "no" }.into(),
                time(i.last_used_unix_nanos),
            ]
        })
        .collect();
    table(
        &[
            "REFERENCE",
            "DIGEST",
            "SIZE",
            "IN USE",
            "PINNED",
            "LAST USED",
        ],
        &rows,
    )
}

/// The `pool ls` table.
pub fn pools_table(r: &pb::ListWarmPoolsResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .pools
        .iter()
        .map(|p| {
            let it = p.instance_type.unwrap_or_default();
            vec![
                p.image.clone(),
                format!("{}/{}M/{}M", it.vcpus, it.memory_mib, it.disk_mib),
                p.target.to_string(),
                p.ready.to_string(),
                p.booting.to_string(),
                p.hits.to_string(),
                p.misses.to_string(),
                p.source.clone(),
                p.last_error.lines().next().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "IMAGE",
            "TYPE (CPU/MEM/DISK)",
            "TARGET",
            "READY",
            "BOOTING",
            "HITS",
            "MISSES",
            "SOURCE",
            "LAST ERROR",
        ],
        &rows,
    );
    out.push_str(&format!(
        "memory: {} MiB of {} MiB held by members\n",
        r.memory_used_mib, r.memory_budget_mib
    ));
    out
}

/// The `node` view.
pub fn node_detail(n: &pb::Node) -> String {
    let cap = n.capacity.unwrap_or_default();
    let alloc = n.allocated.unwrap_or_default();
    let virt = if n.hardware_virtualization {
        "yes".to_owned()
    } else {
        format!("no ({})", n.virtualization_note)
    };
    let pools: Vec<String> = n
        .warm_pool
        .iter()
        .map(|p| format!("{} {}/{} ready", p.image, p.ready, p.target))
        .collect();
    let pools = if pools.is_empty() {
        "none".to_owned()
    } else {
        pools.join(", ")
    };
    format!(
        "name         {}\nversion      {}\nruntime      {}\nhardware virtualization  {}\ncapacity     {} vCPU, {} MiB memory, {} MiB disk\nallocated    {} vCPU, {} MiB memory, {} MiB disk\ninstances    {} ({} running)\nwarm pools   {}\nlast event   {}\nstarted      {}\n",
        n.name,
        n.agent_version,
        n.runtime,
        virt,
        cap.vcpus,
        cap.memory_mib,
        cap.disk_mib,
        alloc.vcpus,
        alloc.memory_mib,
        alloc.disk_mib,
        n.instances,
        n.instances_running,
        pools,
        n.last_event_seq,
        time(n.started_at_unix_nanos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn stopped_event_line_shows_code_and_reason() {
        let e = pb::Event {
            seq: 7,
            instance_id: "web".into(),
            at_unix_nanos: 1,
            kind: Some(pb::event::Kind::Stopped(pb::event::Stopped {
                exit: Some(pb::ExitStatus {
                    exit_code: 137,
                    reason: pb::StopReason::Oom as i32,
                    ..Default::default()
                }),
            })),
        };
        let l = event_line(&e);
        assert!(l.contains("stopped"), "{l}");
        assert!(l.contains("exit_code=137 reason=oom"), "{l}");
    }
}
