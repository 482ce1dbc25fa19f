//! `hearthctl`: the command line for people (tables) and scripts (`--json`) against one
//! hearth-agent.

use std::{
    collections::HashMap,
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt as _;
use hearth_agent::{
    ctl::{self, Client},
    model::pb,
};

/// Control a hearth-agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        env = "HEARTH_SOCKET",
        default_value = "/run/hearth/agent.sock"
    )]
    socket: PathBuf,
    /// Print JSON (one object per line for streams) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

/// An instance type; what is not given is the node's default.
#[derive(Args)]
struct TypeArgs {
    /// vCPUs (default: the node's).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory in MiB (default: the node's).
    #[arg(long)]
    memory: Option<u64>,
    /// Disk (writable layer) in MiB (default: the node's).
    #[arg(long)]
    disk: Option<u64>,
}

impl TypeArgs {
    fn to_pb(&self) -> pb::InstanceType {
        pb::InstanceType {
            vcpus: self.vcpus.unwrap_or(0),
            memory_mib: self.memory.unwrap_or(0),
            disk_mib: self.disk.unwrap_or(0),
        }
    }
}

#[derive(Args)]
struct SpecArgs {
    /// Instance id (a-z, 0-9, -).
    #[arg(long)]
    id: String,
    /// Image reference.
    image: String,
    /// HTTP port the ingress sends to.
    #[arg(long)]
    port: Option<u32>,
    /// Ports that must accept connections before the instance is ready.
    #[arg(long = "ready-port")]
    ready_ports: Vec<u32>,
    /// KEY=VALUE environment (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// KEY=VALUE label (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    #[command(flatten)]
    instance_type: TypeArgs,
    /// Inactivity before the instance sleeps ("10m", "0s" = never).
    #[arg(long)]
    sleep_after: Option<humantime::Duration>,
    /// Stop grace ("15m").
    #[arg(long)]
    grace: Option<humantime::Duration>,
    /// Only notify (activity_expired) instead of stopping when sleep_after runs out.
    #[arg(long)]
    notify_only: bool,
    /// Allow egress to the internet.
    #[arg(long)]
    internet: bool,
    /// Replace the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Command (replaces the image's CMD).
    #[arg(last = true)]
    cmd: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create and start an instance, and wait until it is ready.
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        /// Return once started, without waiting for ready.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for ready.
        #[arg(long, default_value = "120s")]
        timeout: humantime::Duration,
    },
    /// Create an instance (without starting it).
    Create {
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Start an instance.
    Start {
        /// Instance id.
        id: String,
    },
    /// Stop an instance (stop signal, then SIGKILL when the grace ends).
    Stop {
        /// Instance id.
        id: String,
        /// Signal number (default: the instance's, else SIGTERM).
        #[arg(long, default_value_t = 0)]
        signal: i32,
        /// Grace before SIGKILL (default: the instance's).
        #[arg(long)]
        grace: Option<humantime::Duration>,
        /// Wait until it has stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Kill and remove an instance.
    Destroy {
        /// Instance id.
        id: String,
    },
    /// List instances.
    Ls {
        /// Only instances with these KEY=VALUE labels.
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// Show one instance.
    Get {
        /// Instance id.
        id: String,
    },
    /// Show an instance's logs.
    Logs {
        /// Instance id.
        id: String,
        /// Follow new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N records.
        #[arg(long, default_value_t = 0)]
        tail: u32,
        /// Only records newer than this ("5m").
        #[arg(long)]
        since: Option<humantime::Duration>,
    },
    /// Show the node's events.
    Events {
        /// Follow new events.
        #[arg(short, long)]
        follow: bool,
        /// Start at this seq (default: the first kept).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only this instance's events.
        #[arg(long)]
        id: Option<String>,
    },
    /// Run a command in an instance.
    Exec {
        /// Instance id.
        id: String,
        /// Timeout.
        #[arg(long, default_value = "60s")]
        timeout: humantime::Duration,
        /// The command.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Count as activity (pushes sleep_after out).
    Renew {
        /// Instance id.
        id: String,
    },
    /// Metrics of one or every instance.
    Metrics {
        /// Instance id.
        id: Option<String>,
    },
    /// The image cache.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// Show the node.
    Node,
    /// Warm pools: instances booted ahead of demand.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Set how many members the pool of an image and instance type keeps ready (0 removes
    /// the pool).
    Set {
        /// Image reference.
        image: String,
        /// Members to keep ready.
        size: u32,
        #[command(flatten)]
        instance_type: TypeArgs,
    },
    /// List the pools.
    Ls,
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// Pull an image into the cache.
    Pull {
        /// Image reference.
        reference: String,
    },
    /// List cached images.
    Ls,
    /// Remove an image.
    Rm {
        /// Image reference.
        reference: String,
    },
}

fn kv(list: &[String], what: &str) -> anyhow::Result<HashMap<String, String>> {
    list.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("{what} {s:?} is not KEY=VALUE"))
        })
        .collect()
}

fn spec(a: &SpecArgs) -> anyhow::Result<pb::InstanceSpec> {
    Ok(pb::InstanceSpec {
        image: a.image.clone(),
        instance_type: Some(a.instance_type.to_pb()),
        env: kv(&a.env, "--env")?,
        labels: kv(&a.labels, "--label")?,
        entrypoint: a.entrypoint.as_ref().map(|e| pb::Command {
            args: vec![e.clone()],
        }),
        cmd: (!a.cmd.is_empty()).then(|| pb::Command {
            args: a.cmd.clone(),
        }),
        default_port: a.port.unwrap_or(0),
        required_ports: a.ready_ports.clone(),
        sleep_after_millis: a.sleep_after.map(|d| d.as_millis() as i64),
        stop_grace_millis: a.grace.map(|d| d.as_millis() as i64),
        egress: Some(pb::EgressPolicy {
            internet: a.internet,
            ..Default::default()
        }),
        activity_expiry: if a.notify_only {
            pb::ActivityExpiry::Notify
        } else {
            pb::ActivityExpiry::Stop
        } as i32,
        stop_signal: 0,
    })
}

/// JSON for one message (prost types have no serde: rendered by hand through Debug-free maps).
mod json {
    use hearth_agent::model::{self, pb};
    use serde_json::{Value, json};

    pub fn instance(i: &pb::Instance) -> Value {
        let spec = i.spec.clone().unwrap_or_default();
        let it = spec.instance_type.unwrap_or_default();
        let state = pb::InstanceState::try_from(i.state).unwrap_or_default();
        json!({
            "id": i.id,
            "state": model::state_name(state),
            "image": spec.image,
            "image_digest": i.image_digest,
            "runtime": i.runtime,
            "vcpus": it.vcpus,
            "memory_mib": it.memory_mib,
            "disk_mib": it.disk_mib,
            "boots": i.boots,
            "address": i.address,
            "created_at_unix_nanos": i.created_at_unix_nanos,
            "started_at_unix_nanos": i.started_at_unix_nanos,
            "activity_deadline_unix_nanos": i.activity_deadline_unix_nanos,
            "stop_deadline_unix_nanos": i.stop_deadline_unix_nanos,
            "sleep_after_millis": spec.sleep_after_millis,
            "stop_grace_millis": spec.stop_grace_millis,
            "labels": spec.labels,
            "exit": i.exit.as_ref().map(exit),
            "error": i.error.as_ref().map(error),
        })
    }

    pub fn exit(e: &pb::ExitStatus) -> Value {
        let r = pb::StopReason::try_from(e.reason).unwrap_or_default();
        json!({
            "exit_code": e.exit_code,
            "reason": model::reason_name(r),
            "signal": e.signal,
            "requested": e.requested,
            "killed_after_grace": e.killed_after_grace,
            "at_unix_nanos": e.at_unix_nanos,
        })
    }

    pub fn error(e: &pb::InstanceError) -> Value {
        let k = pb::ErrorKind::try_from(e.kind).unwrap_or_default();
        json!({"kind": model::error_kind_name(k), "message": e.message})
    }

    pub fn event(e: &pb::Event) -> Value {
        use pb::event::Kind;
        let mut v = json!({
            "seq": e.seq,
            "instance_id": e.instance_id,
            "at_unix_nanos": e.at_unix_nanos,
            "event": model::event_name(e),
        });
        let extra = match &e.kind {
            Some(Kind::Stopped(s)) => json!({"exit": s.exit.as_ref().map(exit)}),
            Some(Kind::Error(er)) => json!({"error": er.error.as_ref().map(error)}),
            Some(Kind::Started(s)) => json!({
                "pid": s.pid, "warm": s.warm, "runtime_micros": s.runtime_micros,
                "init_micros": s.init_micros, "spawned_micros": s.spawned_micros,
            }),
            Some(Kind::Starting(s)) => json!({"boot": s.boot}),
            Some(Kind::Ready(r)) => json!({"start_to_ready_micros": r.start_to_ready_micros}),
            Some(Kind::Stopping(s)) => json!({"signal": s.signal, "grace_millis": s.grace_millis}),
            Some(Kind::ActivityExpired(a)) => json!({"will_stop": a.will_stop}),
            Some(Kind::Created(c)) => json!({"image_digest": c.image_digest}),
            _ => json!({}),
        };
        if let (Some(o), Some(x)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        v
    }

    pub fn log(l: &pb::LogEntry) -> Value {
        let stream = match pb::LogStream::try_from(l.stream).unwrap_or_default() {
            pb::LogStream::Stdout => "stdout",
            pb::LogStream::Stderr => "stderr",
            pb::LogStream::System => "system",
            pb::LogStream::Unspecified => "unknown",
        };
        json!({
            "timestamp_unix_nanos": l.timestamp_unix_nanos,
            "stream": stream,
            "boot": l.boot,
            "data": String::from_utf8_lossy(&l.data),
        })
    }

    pub fn image(i: &pb::ImageInfo) -> Value {
        json!({
            "reference": i.reference, "digest": i.digest, "size_bytes": i.size_bytes,
            "last_used_unix_nanos": i.last_used_unix_nanos, "pinned": i.pinned, "in_use": i.in_use,
        })
    }

    pub fn metrics(m: &pb::InstanceMetrics) -> Value {
        json!({
            "id": m.id, "at_unix_nanos": m.at_unix_nanos, "cpu_usage_micros": m.cpu_usage_micros,
            "memory_used_bytes": m.memory_used_bytes, "memory_limit_bytes": m.memory_limit_bytes,
            "oom_kills": m.oom_kills, "rootfs_used_bytes": m.rootfs_used_bytes,
            "process_count": m.process_count, "net_rx_bytes": m.net_rx_bytes,
            "net_tx_bytes": m.net_tx_bytes, "ebpf_packets_allowed": m.ebpf_packets_allowed,
            "ebpf_packets_dropped": m.ebpf_packets_dropped, "runtime_rss_bytes": m.runtime_rss_bytes,
            "log_bytes": m.log_bytes, "logs_dropped": m.logs_dropped,
            "ingress_requests": m.ingress_requests, "warm_start": m.warm_start,
        })
    }

    pub fn pool(p: &pb::WarmPool) -> Value {
        let it = p.instance_type.unwrap_or_default();
        json!({
            "image": p.image, "image_digest": p.image_digest,
            "vcpus": it.vcpus, "memory_mib": it.memory_mib, "disk_mib": it.disk_mib,
            "target": p.target, "ready": p.ready, "booting": p.booting,
            "hits": p.hits, "misses": p.misses, "recycled": p.recycled, "failed": p.failed,
            "last_error": p.last_error, "source": p.source,
        })
    }

    pub fn node(n: &pb::Node) -> Value {
        let cap = n.capacity.unwrap_or_default();
        let alloc = n.allocated.unwrap_or_default();
        json!({
            "name": n.name, "agent_version": n.agent_version, "runtime": n.runtime,
            "hardware_virtualization": n.hardware_virtualization,
            "virtualization_note": n.virtualization_note,
            "capacity": {"vcpus": cap.vcpus, "memory_mib": cap.memory_mib, "disk_mib": cap.disk_mib},
            "allocated": {"vcpus": alloc.vcpus, "memory_mib": alloc.memory_mib, "disk_mib": alloc.disk_mib},
            "instances": n.instances, "instances_running": n.instances_running,
            "warm_pool": n.warm_pool.iter().map(|p| json!({
                "image": p.image, "target": p.target, "ready": p.ready, "booting": p.booting,
            })).collect::<Vec<_>>(),
            "last_event_seq": n.last_event_seq, "started_at_unix_nanos": n.started_at_unix_nanos,
        })
    }
}

fn print_instance(json: bool, i: &pb::Instance) {
    if json {
        println!("{}", json::instance(i));
    } else {
        print!("{}", ctl::instance_detail(i));
    }
}

async fn wait_ready(c: &mut Client, id: &str, timeout: Duration) -> anyhow::Result<pb::Instance> {
    let node = c.get_node(pb::GetNodeRequest {}).await?.into_inner();
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            from_seq: node.last_event_seq.max(1),
            instance_id: id.to_owned(),
        })
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let i = c
            .get_instance(pb::GetInstanceRequest { id: id.to_owned() })
            .await?
            .into_inner();
        match pb::InstanceState::try_from(i.state).unwrap_or_default() {
            pb::InstanceState::Healthy => return Ok(i),
            pb::InstanceState::Stopped | pb::InstanceState::Failed => {
                let why = i
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| "it stopped".into());
                bail!("Instance {id} did not become ready: {why}");
            }
            _ => {}
        }
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => bail!("Instance {id} was not ready within {timeout:?}"),
            Ok(None) => bail!("The agent closed the event stream"),
            Ok(Some(e)) => {
                e?;
            }
        }
    }
}

async fn pull(c: &mut Client, reference: &str, json: bool) -> anyhow::Result<()> {
    let mut s = c
        .prefetch_image(pb::PrefetchImageRequest {
            reference: reference.to_owned(),
        })
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let mut last_phase = String::new();
    while let Some(p) = s.next().await {
        let p = p?;
        if json {
            println!(
                "{}",
                serde_json::json!({"phase": p.phase, "done_bytes": p.done_bytes, "total_bytes": p.total_bytes, "done": p.done,
                    "image": p.image.as_ref().map(json::image)})
            );
            continue;
        }
        if let Some(b) = &bar {
            b.set_length(p.total_bytes);
            b.set_position(p.done_bytes);
            b.set_message(p.phase.clone());
        } else if p.phase != last_phase || p.done {
            eprintln!(
                "{}: {} ({} / {} bytes)",
                reference, p.phase, p.done_bytes, p.total_bytes
            );
        }
        last_phase = p.phase.clone();
        if p.done {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let img = p.image.unwrap_or_default();
            println!("pulled {} ({})", img.reference, img.digest);
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = ctl::connect(&cli.socket)
        .await
        .with_context(|| format!("Cannot connect to the agent at {}", cli.socket.display()))?;
    let json = cli.json;
    match cli.command {
        Cmd::Run {
            spec: a,
            no_wait,
            timeout,
        } => {
            let s = spec(&a)?;
            c.create_instance(pb::CreateInstanceRequest {
                id: a.id.clone(),
                spec: Some(s),
            })
            .await?;
            let mut i = c
                .start_instance(pb::StartInstanceRequest { id: a.id.clone() })
                .await?
                .into_inner();
            if !no_wait {
                i = wait_ready(&mut c, &a.id, timeout.into()).await?;
            }
            print_instance(json, &i);
        }
        Cmd::Create { spec: a } => {
            let i = c
                .create_instance(pb::CreateInstanceRequest {
                    id: a.id.clone(),
                    spec: Some(spec(&a)?),
                })
                .await?
                .into_inner();
            print_instance(json, &i);
        }
        Cmd::Start { id } => {
            let i = c
                .start_instance(pb::StartInstanceRequest { id })
                .await?
                .into_inner();
            print_instance(json, &i);
        }
        Cmd::Stop {
            id,
            signal,
            grace,
            wait,
        } => {
            let mut i = c
                .stop_instance(pb::StopInstanceRequest {
                    id: id.clone(),
                    signal,
                    grace_millis: grace.map(|g| g.as_millis() as i64),
                })
                .await?
                .into_inner();
            while wait
                && !matches!(
                    pb::InstanceState::try_from(i.state).unwrap_or_default(),
                    pb::InstanceState::Stopped
                        | pb::InstanceState::Failed
                        | pb::InstanceState::Created
                )
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                i = c
                    .get_instance(pb::GetInstanceRequest { id: id.clone() })
                    .await?
                    .into_inner();
            }
            print_instance(json, &i);
        }
        Cmd::Destroy { id } => {
            c.destroy_instance(pb::DestroyInstanceRequest { id: id.clone() })
                .await?;
            if json {
                println!("{}", serde_json::json!({"destroyed": id}));
            } else {
                println!("destroyed {id}");
            }
        }
        Cmd::Ls { labels } => {
            let list = c
                .list_instances(pb::ListInstancesRequest {
                    labels: kv(&labels, "--label")?,
                })
                .await?
                .into_inner()
                .instances;
            if json {
                let v: Vec<_> = list.iter().map(json::instance).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                print!("{}", ctl::instances_table(&list));
            }
        }
        Cmd::Get { id } => {
            let i = c
                .get_instance(pb::GetInstanceRequest { id })
                .await?
                .into_inner();
            print_instance(json, &i);
        }
        Cmd::Logs {
            id,
            follow,
            tail,
            since,
        } => {
            let since = since
                .map(|d| hearth_agent::clock::system_now() - hearth_agent::clock::nanos(d.into()))
                .unwrap_or(0);
            let mut s = c
                .stream_logs(pb::StreamLogsRequest {
                    id,
                    follow,
                    since_unix_nanos: since,
                    tail,
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(l) = s.next().await {
                let l = l?;
                if json {
                    writeln!(out, "{}", json::log(&l))?;
                } else {
                    out.write_all(&l.data)?;
                    if !l.partial {
                        out.write_all(b"\n")?;
                    }
                }
                out.flush()?;
            }
        }
        Cmd::Events { follow, from, id } => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest {
                    from_seq: from.max(1),
                    instance_id: id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            loop {
                let next = if follow {
                    s.next().await
                } else {
                    // Without -f: what is stored now, then stop once the stream goes quiet.
                    tokio::time::timeout(Duration::from_millis(300), s.next())
                        .await
                        .unwrap_or_default()
                };
                let Some(e) = next else { break };
                let e = e?;
                if json {
                    println!("{}", json::event(&e));
                } else {
                    println!("{}", ctl::event_line(&e));
                }
            }
        }
        Cmd::Exec { id, timeout, argv } => {
            let r = c
                .exec(pb::ExecRequest {
                    id,
                    argv,
                    timeout_millis: timeout.as_millis() as u64,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"exit_code": r.exit_code, "timed_out": r.timed_out,
                        "stdout": String::from_utf8_lossy(&r.stdout), "stderr": String::from_utf8_lossy(&r.stderr)})
                );
            } else {
                std::io::stdout().write_all(&r.stdout)?;
                std::io::stderr().write_all(&r.stderr)?;
                if r.timed_out {
                    bail!("The command timed out");
                }
                if r.exit_code != 0 {
                    std::process::exit(r.exit_code.clamp(1, 255));
                }
            }
        }
        Cmd::Renew { id } => {
            let i = c
                .renew_activity(pb::RenewActivityRequest { id })
                .await?
                .into_inner();
            print_instance(json, &i);
        }
        Cmd::Metrics { id } => {
            let m = c
                .get_metrics(pb::GetMetricsRequest {
                    id: id.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .instances;
            if json {
                let v: Vec<_> = m.iter().map(json::metrics).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let rows: Vec<Vec<String>> = m
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            format!("{:.2}s", m.cpu_usage_micros as f64 / 1e6),
                            format!("{:.1} MiB", m.memory_used_bytes as f64 / 1048576.0),
                            format!("{:.1} MiB", m.memory_limit_bytes as f64 / 1048576.0),
                            m.process_count.to_string(),
                            m.ingress_requests.to_string(),
                            m.log_bytes.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    ctl::table(
                        &[
                            "ID",
                            "CPU",
                            "MEMORY",
                            "LIMIT",
                            "PROCS",
                            "REQUESTS",
                            "LOG BYTES"
                        ],
                        &rows
                    )
                );
            }
        }
        Cmd::Images { cmd } => match cmd {
            ImagesCmd::Pull { reference } => pull(&mut c, &reference, json).await?,
            ImagesCmd::Ls => {
                let list = c
                    .list_images(pb::ListImagesRequest {})
                    .await?
                    .into_inner()
                    .images;
                if json {
                    let v: Vec<_> = list.iter().map(json::image).collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    print!("{}", ctl::images_table(&list));
                }
            }
            ImagesCmd::Rm { reference } => {
                c.remove_image(pb::RemoveImageRequest {
                    reference: reference.clone(),
                })
                .await?;
                println!("removed {reference}");
            }
        },
        Cmd::Pool { cmd } => match cmd {
            PoolCmd::Set {
                image,
                size,
                instance_type,
            } => {
                let p = c
                    .set_warm_pool(pb::SetWarmPoolRequest {
                        image,
                        instance_type: Some(instance_type.to_pb()),
                        size,
                    })
                    .await?
                    .into_inner();
                if json {
                    println!("{}", json::pool(&p));
                } else {
                    println!(
                        "pool {} ({}): target {}, {} ready",
                        p.image, p.image_digest, p.target, p.ready
                    );
                }
            }
            PoolCmd::Ls => {
                let r = c
                    .list_warm_pools(pb::ListWarmPoolsRequest {})
                    .await?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "memory_budget_mib": r.memory_budget_mib,
                            "memory_used_mib": r.memory_used_mib,
                            "pools": r.pools.iter().map(json::pool).collect::<Vec<_>>(),
                        })
                    );
                } else {
                    print!("{}", ctl::pools_table(&r));
                }
            }
        },
        Cmd::Node => {
            let n = c.get_node(pb::GetNodeRequest {}).await?.into_inner();
            if json {
                println!("{}", json::node(&n));
            } else {
                print!("{}", ctl::node_detail(&n));
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A gRPC status carries the agent's message; print it without the transport noise.
            if let Some(s) = e.downcast_ref::<tonic::Status>() {
                eprintln!("hearthctl: {:?}: {}", s.code(), s.message());
            } else {
                eprintln!("hearthctl: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
