//! The seed REST API (`[api]`), served by any daemon of a cluster: each call goes to the
//! coordinator with its caller's token, as the local API's cluster calls do.

use std::sync::Arc;

use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use blockrep_rest::{Api, Backend, BoxFuture};

use crate::cluster::Cluster;
use crate::config::ApiConfig;

/// The coordinator, through this daemon's cluster link (none: every call is refused).
struct ThroughCluster(Option<Arc<Cluster>>);

impl Backend for ThroughCluster {
    fn call(
        &self,
        scope: proto::ApiScope,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, ApiError>> {
        Box::pin(async move {
            match &self.0 {
                Some(cluster) => cluster.coordinator_call_as(Some(scope), request).await,
                None => Err(ApiError::Unavailable(
                    "this daemon is not in a cluster: the REST API needs a [cluster] section"
                        .into(),
                )),
            }
        })
    }
}

/// Binds `api.listen` and serves the API there until the returned task is aborted.
pub async fn serve(
    config: &ApiConfig,
    cluster: Option<Arc<Cluster>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let tls = config
        .tls
        .as_ref()
        .map(|(cert, key)| blockrep_rest::server::tls_acceptor(cert, key))
        .transpose()?;
    let listener = blockrep_rest::server::bind(config.listen).await?;
    let router = blockrep_rest::router(Api::new(Arc::new(ThroughCluster(cluster)), config.quotas));
    tracing::info!(listen = %config.listen, tls = tls.is_some(), "REST API served");
    Ok(tokio::spawn(blockrep_rest::server::serve(
        listener, tls, router,
    )))
}
