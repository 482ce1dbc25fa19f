//! The ingress proxy's view of the instances ([`Router`] over the [`Manager`]): where a request
//! for an id can go, activity for sleep_after, and starting a stopped instance on request.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use super::{Manager, spec::http_port, state_of};
use crate::{
    ingress::{Route, Router, StartError, UpstreamProtocol},
    model::pb,
};

/// How long a start on request may take before the proxy's own timeout matters.
const START_WAIT: Duration = Duration::from_secs(600);

/// The agent's [`Router`].
#[derive(Debug, Clone)]
pub struct NodeRouter {
    mgr: Arc<Manager>,
}

impl NodeRouter {
    /// A router over `mgr`.
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self { mgr }
    }

    fn route(&self, inst: &pb::Instance, image: Option<&crate::images::ResolvedImage>) -> Route {
        match state_of(inst) {
            pb::InstanceState::Healthy => {
                let Ok(ip) = inst.address.parse::<std::net::IpAddr>() else {
                    return Route::Failed {
                        reason: "the instance has no network address".into(),
                    };
                };
                let spec = inst.spec.clone().unwrap_or_default();
                let port = http_port(&spec, image, self.mgr.cfg.defaults.default_port);
                Route::Ready {
                    addr: SocketAddr::new(ip, port as u16),
                    protocol: UpstreamProtocol::Http1,
                }
            }
            pb::InstanceState::Creating
            | pb::InstanceState::Starting
            | pb::InstanceState::Running => Route::Starting,
            pb::InstanceState::Created
            | pb::InstanceState::Stopping
            | pb::InstanceState::Stopped
            | pb::InstanceState::Unspecified => Route::Stopped,
            pb::InstanceState::Failed => Route::Failed {
                reason: inst
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_else(|| "the instance failed".into()),
            },
        }
    }
}

impl Router for NodeRouter {
    fn lookup(&self, id: &str) -> Option<Route> {
        let entry = self.mgr.entry(id).ok()?;
        let private = entry.private();
        Some(self.route(&entry.instance(), private.image.as_ref()))
    }

    fn on_activity(&self, id: &str) {
        if let Ok(entry) = self.mgr.entry(id) {
            entry.touch(self.mgr.clock.now());
            entry.count_ingress_request();
        }
    }

    fn start_on_request(
        &self,
        id: &str,
    ) -> impl std::future::Future<Output = Result<Route, StartError>> + Send {
        let mgr = self.mgr.clone();
        let id = id.to_owned();
        let this = self.clone();
        async move {
            let inst = mgr.start(&id).await.map_err(|e| match e {
                super::InstanceError::NotFound(_) => StartError::Unknown,
                e => StartError::Failed(super::anyhow_chain(&e)),
            })?;
            let _ = inst;
            let inst = mgr
                .wait_for(
                    &id,
                    &[
                        pb::InstanceState::Healthy,
                        pb::InstanceState::Failed,
                        pb::InstanceState::Stopped,
                    ],
                    START_WAIT,
                )
                .await
                .map_err(|e| StartError::Failed(super::anyhow_chain(&e)))?;
            let image = mgr.entry(&id).ok().and_then(|e| e.private().image);
            Ok(this.route(&inst, image.as_ref()))
        }
    }
}
