//! The gRPC API (`hearth.v1.Agent`): thin handlers that call [`Manager`](crate::instance::Manager)
//! and the image cache, with errors mapped to statuses in [`status`].
//!
//! # Layout
//!
//! - [`status`]: error → gRPC status (the only place).
//! - [`server`]: the listeners (Unix socket; TCP + TLS with client certificates) and draining.

pub mod server;
pub mod status;

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use hearth_proto::init;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{daemon::Node, model::pb};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service.
#[derive(Clone)]
pub struct AgentService {
    node: Arc<Node>,
    // Ends open streams when the API drains.
    shutdown: CancellationToken,
}

impl AgentService {
    /// A service over `node`; streams end when `shutdown` is cancelled.
    pub fn new(node: Arc<Node>, shutdown: CancellationToken) -> Self {
        Self { node, shutdown }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> pb::agent_server::AgentServer<Self> {
        pb::agent_server::AgentServer::new(self)
    }

    fn until_shutdown<T: Send + 'static>(
        &self,
        s: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> Stream_<T> {
        let token = self.shutdown.clone();
        Box::pin(s.take_until(async move { token.cancelled_owned().await }))
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn create_instance(
        &self,
        req: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let (inst, _) = self.node.mgr.create(&r.id, spec).await?;
        Ok(Response::new(inst))
    }

    async fn start_instance(
        &self,
        req: Request<pb::StartInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        Ok(Response::new(
            self.node.mgr.start(&req.into_inner().id).await?,
        ))
    }

    async fn stop_instance(
        &self,
        req: Request<pb::StopInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.node.mgr.stop(&r.id, r.signal, r.grace_millis).await?,
        ))
    }

    async fn destroy_instance(
        &self,
        req: Request<pb::DestroyInstanceRequest>,
    ) -> Result<Response<pb::DestroyInstanceResponse>, Status> {
        self.node.mgr.destroy(&req.into_inner().id).await?;
        Ok(Response::new(pb::DestroyInstanceResponse {}))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        Ok(Response::new(self.node.mgr.get(&req.into_inner().id)?))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let labels = req.into_inner().labels;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: self.node.mgr.list(&labels),
        }))
    }

    type WatchEventsStream = Stream_<pb::Event>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let instance = if r.instance_id.is_empty() {
            None
        } else {
            crate::model::validate_id(&r.instance_id)?;
            Some(r.instance_id)
        };
        let s = self
            .node
            .mgr
            .events
            .watch(r.from_seq, instance)
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(self.until_shutdown(s)))
    }

    type StreamLogsStream = Stream_<pb::LogEntry>;

    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = req.into_inner();
        let s = self
            .node
            .mgr
            .logs(&r.id, r.since_unix_nanos, r.tail as usize, r.follow)?
            .map(|r| r.map_err(status::io));
        Ok(Response::new(self.until_shutdown(s)))
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .node
            .mgr
            .exec(
                &r.id,
                init::Exec {
                    request_id: 0,
                    argv: r.argv,
                    env: r.env,
                    working_dir: r.working_dir,
                    user: r.user,
                    timeout_millis: r.timeout_millis,
                    stdin: r.stdin,
                },
            )
            .await?;
        if !result.error.is_empty() && !result.timed_out {
            return Err(Status::failed_precondition(format!(
                "The command could not run: {}",
                result.error
            )));
        }
        Ok(Response::new(pb::ExecResponse {
            exit_code: result.exit_code,
            stdout: result.stdout,
            stderr: result.stderr,
            timed_out: result.timed_out,
        }))
    }

    async fn renew_activity(
        &self,
        req: Request<pb::RenewActivityRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        Ok(Response::new(self.node.mgr.renew(&req.into_inner().id)?))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        let id = req.into_inner().id;
        let instances = if id.is_empty() {
            self.node.all_metrics()
        } else {
            vec![self.node.metrics(&id)?]
        };
        Ok(Response::new(pb::MetricsResponse { instances }))
    }

    type PrefetchImageStream = Stream_<pb::PullProgress>;

    async fn prefetch_image(
        &self,
        req: Request<pb::PrefetchImageRequest>,
    ) -> Result<Response<Self::PrefetchImageStream>, Status> {
        let reference = req.into_inner().reference;
        reference
            .parse::<hearth_images::reference::Reference>()
            .map_err(|e| {
                Status::invalid_argument(format!("{reference:?} is not an image reference: {e}"))
            })?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let images = self.node.mgr.images.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let r2 = reference.clone();
        tokio::spawn(async move {
            let result = images.pull(&r2, Some(tx)).await;
            let _ = done_tx.send(result);
        });
        let progress = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok);
        let last = futures::stream::once(async move {
            match done_rx.await {
                Ok(Ok(img)) => Ok(pb::PullProgress {
                    reference: reference.clone(),
                    phase: "done".into(),
                    done_bytes: img.size_bytes,
                    total_bytes: img.size_bytes,
                    done: true,
                    image: Some(pb::ImageInfo {
                        reference: img.reference,
                        digest: img.digest,
                        size_bytes: img.size_bytes,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                Ok(Err(e)) => Err(Status::from(e)),
                Err(_) => Err(Status::internal("The pull task ended without a result")),
            }
        });
        Ok(Response::new(self.until_shutdown(progress.chain(last))))
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        Ok(Response::new(pb::ListImagesResponse {
            images: self.node.mgr.images.list()?,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        self.node.mgr.images.remove(&req.into_inner().reference)?;
        Ok(Response::new(pb::RemoveImageResponse {}))
    }

    async fn get_node(
        &self,
        _req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Ok(Response::new(self.node.info()?))
    }

    async fn set_warm_pool(
        &self,
        req: Request<pb::SetWarmPoolRequest>,
    ) -> Result<Response<pb::WarmPool>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.node
                .pool
                .set(&r.image, r.instance_type, r.size)
                .await?,
        ))
    }

    async fn list_warm_pools(
        &self,
        _req: Request<pb::ListWarmPoolsRequest>,
    ) -> Result<Response<pb::ListWarmPoolsResponse>, Status> {
        Ok(Response::new(self.node.pool.list()))
    }
}
