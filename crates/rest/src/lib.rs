//! The seed REST APIs, served as their documents give them: EVS v2 replication pairs and
//! consistency groups ([`evs`]) and SDRS v1 protection groups ([`sdrs`]), over the same
//! coordinator calls as the local gRPC API.
//!
//! Every request carries an `X-Auth-Token`; the [`Backend`] forwards each call to the
//! coordinator with the token's SHA-256 and the `{project_id}` of its path
//! ([`proto::ApiScope`]), and the coordinator answers for that project only (401, 403, 404
//! otherwise). Nothing here keeps state: a request is parsed, turned into coordinator calls,
//! and their answers into the seed's JSON.
//!
//! | module | what it holds |
//! |---|---|
//! | [`error`] | a refusal as the seeds' `{"error": {"message", "code"}}` with its status |
//! | [`list`] | the lists' filters, sorting and paging (`limit`, `offset`, `marker`) |
//! | [`evs`] | EVS v2: `/v2/{project_id}/os-vendor-replications[...]` and `...-consistency-groups` |
//! | [`sdrs`] | SDRS v1: `/v1/{project_id}/...` |
//! | [`server`] | the HTTP(S) listener |

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::HeaderMap;
use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};

mod drills;
pub mod error;
pub mod evs;
pub mod list;
pub mod sdrs;
pub mod server;
mod time;

pub use error::{Fail, Family};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the REST API's calls go: the coordinator (through the daemon's cluster link).
pub trait Backend: Send + Sync + 'static {
    fn call(
        &self,
        scope: proto::ApiScope,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, ApiError>>;
}

/// What every handler shares.
#[derive(Clone)]
pub struct Api {
    backend: Arc<dyn Backend>,
    quotas: Quotas,
}

/// The most SDRS protection groups and replication pairs a project may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub server_groups: u64,
    pub replications: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            server_groups: 100,
            replications: 1000,
        }
    }
}

/// The header that carries the token.
pub const TOKEN_HEADER: &str = "x-auth-token";

impl Api {
    pub fn new(backend: Arc<dyn Backend>, quotas: Quotas) -> Self {
        Self { backend, quotas }
    }

    /// A group's call (create, update, delete, an action), answered with the group and
    /// the job that follows it.
    async fn group_job(
        &self,
        headers: &HeaderMap,
        project: &str,
        request: Request,
    ) -> Result<(proto::Group, Option<proto::Job>), ApiError> {
        match self.call(headers, project, request).await? {
            Response::GroupJob(answer) => Ok((answer.group.unwrap_or_default(), answer.job)),
            _ => Err(unexpected("a group's call")),
        }
    }

    /// The project's pairs.
    async fn pairs(
        &self,
        headers: &HeaderMap,
        project: &str,
    ) -> Result<Vec<proto::Pair>, ApiError> {
        let request = Request::ListPairs(proto::ListPairsRequest {});
        match self.call(headers, project, request).await? {
            Response::Pairs(list) => Ok(list.pairs),
            _ => Err(unexpected("the pair list")),
        }
    }

    /// The project's groups.
    async fn groups(
        &self,
        headers: &HeaderMap,
        project: &str,
    ) -> Result<Vec<proto::Group>, ApiError> {
        let request = Request::ListGroups(proto::ListGroupsRequest {});
        match self.call(headers, project, request).await? {
            Response::Groups(list) => Ok(list.groups),
            _ => Err(unexpected("the group list")),
        }
    }

    /// One of the project's pairs, by id or name.
    async fn pair(
        &self,
        headers: &HeaderMap,
        project: &str,
        id: &str,
    ) -> Result<proto::Pair, ApiError> {
        let request = Request::GetPair(proto::PairRef {
            pair: id.to_owned(),
        });
        match self.call(headers, project, request).await? {
            Response::Pair(pair) => Ok(pair),
            _ => Err(unexpected("a pair")),
        }
    }

    /// One of the project's groups, by id or name.
    async fn group(
        &self,
        headers: &HeaderMap,
        project: &str,
        id: &str,
    ) -> Result<proto::Group, ApiError> {
        let request = Request::GetGroup(proto::GroupRef {
            group: id.to_owned(),
        });
        match self.call(headers, project, request).await? {
            Response::Group(group) => Ok(group),
            _ => Err(unexpected("a group")),
        }
    }

    /// A coordinator call for the caller of `headers` (its token) in `project`.
    async fn call(
        &self,
        headers: &HeaderMap,
        project: &str,
        request: Request,
    ) -> Result<Response, ApiError> {
        let token = headers
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthenticated("no X-Auth-Token header: every request needs one".into())
            })?;
        // A path's project is a project id; an empty or malformed one names none.
        let project = blockrep_api::model::ProjectId::try_from(project.to_owned())
            .map_err(|e| ApiError::NotFound(format!("no such project: {e}")))?;
        let scope = proto::ApiScope {
            token_sha256: blockrep_api::token::sha256(token),
            project_id: project.to_string(),
        };
        self.backend.call(scope, request).await
    }
}

/// The whole API: both families, and JSON answers for unknown paths and methods.
pub fn router(api: Api) -> Router {
    Router::new()
        .merge(evs::routes())
        .merge(sdrs::routes())
        .fallback(|| async {
            Fail::new(
                Family::Api,
                ApiError::NotFound("no such resource in the EVS v2 or SDRS v1 API".into()),
            )
        })
        .method_not_allowed_fallback(|| async { error::method_not_allowed() })
        .layer(axum::middleware::from_fn(body_within))
        .with_state(api)
}

/// The most a request body may hold, and how long a client has to send it.
pub const MAX_BODY_BYTES: usize = 1 << 20;
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a request's body before its handler runs, within [`MAX_BODY_BYTES`] and
/// [`BODY_TIMEOUT`]: a client that sends too much, or too slowly, is answered 400 and
/// holds no connection past it.
async fn body_within(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    let refused = |message: String| {
        Fail::new(Family::Api, ApiError::InvalidArgument(message)).into_response()
    };
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => {
            let body = axum::body::Body::from(collected.to_bytes());
            next.run(axum::extract::Request::from_parts(parts, body))
                .await
        }
        Ok(Err(e)) => refused(format!(
            "the request body could not be read (at most {MAX_BODY_BYTES} bytes): {e}"
        )),
        Err(_) => refused(format!(
            "the request body did not come within {} s",
            BODY_TIMEOUT.as_secs()
        )),
    }
}

/// The answer of an unexpected kind: the coordinator and this API disagree.
fn unexpected(what: &str) -> ApiError {
    ApiError::Internal(format!(
        "the coordinator answered {what} with something unexpected"
    ))
}

#[cfg(test)]
mod testing;
