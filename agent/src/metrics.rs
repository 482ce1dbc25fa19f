//! The Prometheus text endpoint (`GET /metrics`): node gauges and per-instance metrics from
//! hearth-init, the eBPF counters and the runtime — the same numbers `GetMetrics` returns.

use std::{fmt::Write as _, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{daemon::Node, model};

/// A per-instance series: name, type, help, and how to read it.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&model::pb::InstanceMetrics) -> f64,
);

/// Escapes a Prometheus label value.
pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the node's metrics in the Prometheus text format.
pub fn render(node: &Node) -> String {
    let mut out = String::new();
    let mut by_state = std::collections::BTreeMap::<&str, u64>::new();
    for e in node.mgr.entries() {
        *by_state.entry(model::state_name(e.state())).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP hearth_instances Instances on the node by state."
    );
    let _ = writeln!(out, "# TYPE hearth_instances gauge");
    for (s, n) in &by_state {
        let _ = writeln!(out, "hearth_instances{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP hearth_events_total Events recorded (the newest seq)."
    );
    let _ = writeln!(out, "# TYPE hearth_events_total counter");
    let _ = writeln!(
        out,
        "hearth_events_total {}",
        node.mgr.events.last_seq().unwrap_or(0)
    );
    let metrics = node.all_metrics();
    let series: [Series; 15] = [
        (
            "hearth_instance_cpu_usage_seconds_total",
            "counter",
            "CPU time used by the workload.",
            |m| m.cpu_usage_micros as f64 / 1e6,
        ),
        (
            "hearth_instance_memory_used_bytes",
            "gauge",
            "Memory used inside the instance.",
            |m| m.memory_used_bytes as f64,
        ),
        (
            "hearth_instance_memory_limit_bytes",
            "gauge",
            "The instance's memory limit.",
            |m| m.memory_limit_bytes as f64,
        ),
        (
            "hearth_instance_oom_kills_total",
            "counter",
            "OOM kills inside the instance.",
            |m| m.oom_kills as f64,
        ),
        (
            "hearth_instance_rootfs_used_bytes",
            "gauge",
            "Bytes used on the writable layer.",
            |m| m.rootfs_used_bytes as f64,
        ),
        (
            "hearth_instance_processes",
            "gauge",
            "Processes in the instance.",
            |m| m.process_count as f64,
        ),
        (
            "hearth_instance_net_rx_bytes_total",
            "counter",
            "Bytes received by the instance.",
            |m| m.net_rx_bytes as f64,
        ),
        (
            "hearth_instance_net_tx_bytes_total",
            "counter",
            "Bytes sent by the instance.",
            |m| m.net_tx_bytes as f64,
        ),
        (
            "hearth_instance_ebpf_packets_dropped_total",
            "counter",
            "Packets the eBPF policy dropped.",
            |m| m.ebpf_packets_dropped as f64,
        ),
        (
            "hearth_instance_runtime_rss_bytes",
            "gauge",
            "Memory of the VMM process, or charged to the sandbox cgroup.",
            |m| m.runtime_rss_bytes as f64,
        ),
        (
            "hearth_instance_log_bytes",
            "gauge",
            "Bytes of log files kept.",
            |m| m.log_bytes as f64,
        ),
        (
            "hearth_instance_logs_dropped_total",
            "counter",
            "Log records hearth-init had to drop.",
            |m| m.logs_dropped as f64,
        ),
        (
            "hearth_instance_vmm_boot_time_seconds",
            "gauge",
            "From hearth-vmm's start to the guest's boot-timer write.",
            |m| m.vmm_boot_time_us as f64 / 1e6,
        ),
        (
            "hearth_instance_vmm_vcpu_exits_total",
            "counter",
            "vCPU exits of the instance's VMM.",
            |m| m.vmm_vcpu_exits as f64,
        ),
        (
            "hearth_instance_ingress_requests_total",
            "counter",
            "Requests the ingress proxied to the instance.",
            |m| m.ingress_requests as f64,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for m in &metrics {
            let _ = writeln!(out, "{name}{{instance=\"{}\"}} {}", label(&m.id), get(m));
        }
    }
    node.pool.render_prometheus(&mut out);
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, node: Arc<Node>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let node = node.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let node = node.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render(&node))))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
