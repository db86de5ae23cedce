//! SDRS v1: protection groups, replication pairs, jobs, active-active domains and quotas
//! under `/v1/{project_id}`.

use axum::Router;

use crate::Api;

pub fn routes() -> Router<Api> {
    Router::new()
}
