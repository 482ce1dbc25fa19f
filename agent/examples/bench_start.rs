//! The client half of `cargo xtask bench cold-start`: times instance starts on a running
//! hearth-agent, from the `StartInstance` call to the first successful HTTP response through
//! the agent's ingress, with the agent's own breakdown from the `started` and `ready` events.
//!
//! Usage: `bench_start --socket PATH --ingress HOST:PORT --image REF [--memory-mib N]` (the
//! instances' memory, default 64; a microVM needs more), then one command per line on stdin,
//! one JSON object per line on stdout:
//!
//! - `pool N`: sets the warm pool of the image (the warm instance type) to N members and waits
//!   until they are ready.
//! - `cold ID` / `warm ID`: creates instance ID (the cold or the warm instance type: only the
//!   warm one has a pool), waits (warm) until the pool is full, times its start, destroys it.
//!
//! Cold instances differ from warm ones only in their disk size (63 vs 64 MiB of writable
//! layer), so that no pool matches them.

use std::{
    io::BufRead as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hearth_agent::{
    ctl::{self, Client},
    model::pb,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Opts {
    socket: PathBuf,
    ingress: SocketAddr,
    image: String,
    memory_mib: u64,
}

fn opts() -> anyhow::Result<Opts> {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut ingress, mut image) = (None, None, None);
    let mut memory_mib = 64;
    while let Some(a) = args.next() {
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(v)),
            "--ingress" => ingress = Some(v.parse().context("--ingress HOST:PORT")?),
            "--image" => image = Some(v),
            "--memory-mib" => memory_mib = v.parse().context("--memory-mib N")?,
            _ => bail!("unknown option {a}"),
        }
    }
    Ok(Opts {
        socket: socket.context("--socket is required")?,
        ingress: ingress.context("--ingress is required")?,
        image: image.context("--image is required")?,
        memory_mib,
    })
}

fn instance_type(o: &Opts, warm: bool) -> pb::InstanceType {
    pb::InstanceType {
        vcpus: 1,
        memory_mib: o.memory_mib,
        disk_mib: if warm { 64 } else { 63 },
    }
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

async fn pool(c: &mut Client, image: &str) -> anyhow::Result<Option<pb::WarmPool>> {
    let l = c
        .list_warm_pools(pb::ListWarmPoolsRequest {})
        .await?
        .into_inner();
    Ok(l.pools.into_iter().find(|p| p.image == image))
}

/// Waits until the pool has as many ready members as its target (polled every 2 ms).
async fn pool_full(c: &mut Client, image: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match pool(c, image).await? {
            Some(p) if p.ready >= p.target && p.booting == 0 => return Ok(()),
            Some(p) if !p.last_error.is_empty() && Instant::now() > deadline => {
                bail!("the pool does not fill: {}", p.last_error)
            }
            _ if Instant::now() > deadline => bail!("the pool did not fill within {TIMEOUT:?}"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// GET / through the ingress: the status code.
async fn get(ingress: SocketAddr, id: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(ingress).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {id}\r\nx-hearth-instance: {id}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let head = String::from_utf8_lossy(&out[..out.len().min(12)]).into_owned();
    Ok(head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0))
}

async fn time_start(
    c: &mut Client,
    o: &Opts,
    id: &str,
    warm: bool,
) -> anyhow::Result<serde_json::Value> {
    if warm {
        pool_full(c, &o.image).await?;
    }
    c.create_instance(pb::CreateInstanceRequest {
        id: id.to_owned(),
        spec: Some(pb::InstanceSpec {
            image: o.image.clone(),
            instance_type: Some(instance_type(o, warm)),
            required_ports: vec![8080],
            default_port: 8080,
            ..Default::default()
        }),
    })
    .await?;
    // Subscribed before the start, so no event of it is missed.
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            from_seq: 0,
            instance_id: id.to_owned(),
        })
        .await?
        .into_inner();
    let wall0 = unix_nanos();
    let t0 = Instant::now();
    c.start_instance(pb::StartInstanceRequest { id: id.to_owned() })
        .await?;
    let api = t0.elapsed();
    let mut started = None;
    let (ready, ready_at) = loop {
        let e = tokio::time::timeout(TIMEOUT, events.next())
            .await
            .context("no ready event in time")?
            .context("the event stream ended")??;
        match e.kind {
            Some(pb::event::Kind::Started(s)) => started = Some(s),
            Some(pb::event::Kind::Ready(r)) => break (r, e.at_unix_nanos),
            Some(pb::event::Kind::Error(er)) => bail!("{id} failed: {:?}", er.error),
            Some(pb::event::Kind::Stopped(s)) => bail!("{id} stopped: {:?}", s.exit),
            _ => {}
        }
    };
    // The ingress answers 503 until the instance is healthy: from here the first request
    // should pass; retry from 1 ms in case it does not.
    let mut pause = Duration::from_millis(1);
    let mut tries = 0;
    let response = loop {
        tries += 1;
        if let Ok(200) = get(o.ingress, id).await {
            break t0.elapsed();
        }
        if t0.elapsed() > TIMEOUT {
            bail!("no successful response from {id} within {TIMEOUT:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(8));
    };
    let s = started.context("no started event before ready")?;
    // The agent's times are from its start request; place that on our clock.
    let requested_at = ready_at - (ready.start_to_ready_micros as i64) * 1000;
    let offset_ms = (requested_at - wall0) as f64 / 1e6;
    let at = |micros: u64| offset_ms + micros as f64 / 1000.0;
    c.destroy_instance(pb::DestroyInstanceRequest { id: id.to_owned() })
        .await?;
    Ok(serde_json::json!({
        "id": id,
        "warm": s.warm,
        "api_ms": api.as_secs_f64() * 1000.0,
        "runtime_ms": at(s.runtime_micros),
        "init_ms": at(s.init_micros),
        "spawned_ms": at(s.spawned_micros),
        "ready_ms": at(ready.start_to_ready_micros),
        "response_ms": response.as_secs_f64() * 1000.0,
        "http_tries": tries,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let mut c = ctl::connect(&o.socket).await?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let out = match (words.next(), words.next()) {
            (Some("pool"), Some(n)) => {
                let size: u32 = n.parse().context("pool N")?;
                c.set_warm_pool(pb::SetWarmPoolRequest {
                    image: o.image.clone(),
                    instance_type: Some(instance_type(&o, true)),
                    size,
                })
                .await?;
                pool_full(&mut c, &o.image).await?;
                serde_json::json!({"pool": size})
            }
            (Some("cold"), Some(id)) => time_start(&mut c, &o, id, false).await?,
            (Some("warm"), Some(id)) => time_start(&mut c, &o, id, true).await?,
            _ => bail!("unknown command {line:?}"),
        };
        println!("{out}");
    }
    Ok(())
}
