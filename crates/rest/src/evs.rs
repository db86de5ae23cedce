//! EVS v2 (the deprecated appendix the seeds come from): replication pairs
//! (`/v2/{project_id}/os-vendor-replications`) and replication consistency groups
//! (`/v2/{project_id}/os-vendor-replication-consistency-groups`), bodies, fields and status
//! codes as the documents give them:
//!
//! | call | answer |
//! |---|---|
//! | `POST` pairs, groups | 202, the new record (short form) |
//! | `GET` a list (also `.../detail`), `GET` one | 200, the records (full form) |
//! | `PUT` a group | 202, the group (short form) |
//! | `DELETE` a pair, a group | 202, no body |
//! | `POST` a group's `action` | 200, no body; `os-extend-replication-volumes` answers once the volumes grew |
//!
//! A pair's `volume_ids` is one string (`"a, b"` when created, `"a,b"` after, as the
//! documents show); `progress` and `fault_level` are strings; `record_metadata` is a JSON
//! string. `replication_model` is `hypermetro` (the seeds' only model) or `async`.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{body, one_action, required};
use crate::list::{Filter, page};
use crate::time::seed_time;
use crate::{Api, Fail, Family, unexpected};

const PAIRS: &str = "/v2/{project_id}/os-vendor-replications";
const GROUPS: &str = "/v2/{project_id}/os-vendor-replication-consistency-groups";

/// The largest volume an extend asks for (1 PiB).
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

/// How long `os-extend-replication-volumes` waits for one pair's volumes to grow.
const EXTEND_WAIT: Duration = Duration::from_secs(300);

pub fn routes() -> Router<Api> {
    Router::new()
        .route(PAIRS, post(create_pair).get(list_pairs))
        .route(&format!("{PAIRS}/detail"), get(list_pairs))
        .route(
            &format!("{PAIRS}/{{id}}"),
            get(show_pair).delete(delete_pair),
        )
        .route(GROUPS, post(create_group).get(list_groups))
        .route(&format!("{GROUPS}/detail"), get(list_groups))
        .route(
            &format!("{GROUPS}/{{id}}"),
            get(show_group).put(update_group).delete(delete_group),
        )
        .route(&format!("{GROUPS}/{{id}}/action"), post(group_action))
}

type Answer = Result<HttpResponse, Fail>;

fn fail(e: ApiError) -> Fail {
    Fail::new(Family::Evs, e)
}

fn answer(status: StatusCode, value: Value) -> HttpResponse {
    (status, axum::Json(value)).into_response()
}

// ---- replication pairs ----

#[derive(Deserialize)]
struct CreatePairBody {
    replication: Option<CreatePair>,
}

#[derive(Deserialize)]
struct CreatePair {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    volume_ids: Option<Vec<String>>,
    priority_station: Option<String>,
    replication_model: Option<String>,
}

async fn create_pair(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: CreatePairBody = body(&bytes).map_err(fail)?;
    let r = required(request.replication, "replication").map_err(fail)?;
    let request = proto::CreatePairRequest {
        name: r.name,
        description: r.description,
        volumes: required(r.volume_ids, "replication.volume_ids").map_err(fail)?,
        priority_station: required(r.priority_station, "replication.priority_station")
            .map_err(fail)?,
        replication_model: required(r.replication_model, "replication.replication_model")
            .map_err(fail)?,
    };
    match api
        .call(&headers, &project, Request::CreatePair(request))
        .await
        .map_err(fail)?
    {
        Response::Created(created) => {
            let pair = created.pair.unwrap_or_default();
            Ok(answer(
                StatusCode::ACCEPTED,
                json!({ "replication": pair_short(&pair) }),
            ))
        }
        _ => Err(fail(unexpected("a pair's creation"))),
    }
}

async fn list_pairs(
    State(api): State<Api>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let pairs = api.pairs(&headers, &project).await.map_err(fail)?;
    let items = pairs.iter().map(pair_full).collect();
    let filters = [
        ("name", Filter::Equals("name")),
        ("status", Filter::Equals("status")),
        (
            "replication_consistency_group_id",
            Filter::Equals("replication_consistency_group_id"),
        ),
        ("volume_ids", Filter::Equals("volume_ids")),
        ("volume_id", Filter::Lists("volume_ids")),
        ("priority_station", Filter::Equals("priority_station")),
        ("changes-since", Filter::ChangedSince),
    ];
    let items = page(items, &query, &filters).map_err(fail)?;
    Ok(answer(StatusCode::OK, json!({ "replications": items })))
}

async fn show_pair(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let pair = api.pair(&headers, &project, &id).await.map_err(fail)?;
    Ok(answer(
        StatusCode::OK,
        json!({ "replication": pair_full(&pair) }),
    ))
}

async fn delete_pair(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    match api
        .call(
            &headers,
            &project,
            Request::DeletePair(proto::PairRef { pair: id }),
        )
        .await
        .map_err(fail)?
    {
        Response::Deleted(_) => Ok(StatusCode::ACCEPTED.into_response()),
        _ => Err(fail(unexpected("a pair's deletion"))),
    }
}

/// A pair as its creation answers: nine fields, `volume_ids` joined by ", ".
fn pair_short(p: &proto::Pair) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "status": p.status,
        "replication_consistency_group_id": id_or_null(&p.replication_consistency_group_id),
        "volume_ids": p.volume_ids.join(", "),
        "priority_station": p.priority_station,
        "created_at": seed_time(&p.created_at),
        "updated_at": seed_time(&p.updated_at),
    })
}

/// A pair as the lists and `GET` show it: fifteen fields.
pub fn pair_full(p: &proto::Pair) -> Value {
    let volume_size_gb = p.size_bytes.div_ceil(1 << 30);
    let record_metadata = json!({
        "volume_size": volume_size_gb,
        "volume_type": "blockrep",
        "multiattach": false,
    });
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "status": p.status,
        "replication_consistency_group_id": id_or_null(&p.replication_consistency_group_id),
        "volume_ids": p.volume_ids.join(","),
        "priority_station": p.priority_station,
        "created_at": seed_time(&p.created_at),
        "updated_at": seed_time(&p.updated_at),
        "replication_model": p.replication_model,
        "replication_status": p.replication_status,
        "progress": progress(p),
        "failure_detail": id_or_null(&p.failure_detail),
        "record_metadata": record_metadata.to_string(),
        "fault_level": p.fault_level.to_string(),
    })
}

/// A pair's sync progress in percent, as a string: `null` before any sync ran.
fn progress(p: &proto::Pair) -> Value {
    if p.replication_status == "active" || p.replication_status == "active-stopped" {
        Value::String("100".into())
    } else if p.replication_status == "copying" {
        Value::String(format!("{}", (p.progress * 100.0).floor() as u32))
    } else {
        Value::Null
    }
}

fn id_or_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

// ---- replication consistency groups ----

#[derive(Deserialize)]
struct CreateGroupBody {
    replication_consistency_group: Option<CreateGroup>,
}

#[derive(Deserialize)]
struct CreateGroup {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    replication_ids: Option<Vec<String>>,
    priority_station: Option<String>,
    replication_model: Option<String>,
}

async fn create_group(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: CreateGroupBody = body(&bytes).map_err(fail)?;
    let g = required(
        request.replication_consistency_group,
        "replication_consistency_group",
    )
    .map_err(fail)?;
    let pairs = required(
        g.replication_ids,
        "replication_consistency_group.replication_ids",
    )
    .map_err(fail)?;
    let request = proto::CreateGroupRequest {
        name: g.name,
        description: g.description,
        pairs,
        priority_station: required(
            g.priority_station,
            "replication_consistency_group.priority_station",
        )
        .map_err(fail)?,
        replication_model: required(
            g.replication_model,
            "replication_consistency_group.replication_model",
        )
        .map_err(fail)?,
        protection: None,
        retention: None,
    };
    let (group, _) = api
        .group_job(&headers, &project, Request::CreateGroup(request))
        .await
        .map_err(fail)?;
    Ok(answer(
        StatusCode::ACCEPTED,
        json!({ "replication_consistency_group": group_short(&group) }),
    ))
}

async fn list_groups(
    State(api): State<Api>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let groups = api.groups(&headers, &project).await.map_err(fail)?;
    // `volume_id` selects the groups holding a pair of that volume.
    let volume_groups: Option<Vec<String>> = match query.get("volume_id") {
        Some(volume) => {
            let pairs = api.pairs(&headers, &project).await.map_err(fail)?;
            Some(
                pairs
                    .into_iter()
                    .filter(|p| p.volume_ids.contains(volume))
                    .map(|p| p.replication_consistency_group_id)
                    .collect(),
            )
        }
        None => None,
    };
    let items = groups
        .iter()
        .filter(|g| volume_groups.as_ref().is_none_or(|ids| ids.contains(&g.id)))
        .map(group_full)
        .collect();
    let filters = [
        ("name", Filter::Equals("name")),
        ("status", Filter::Equals("status")),
        ("priority_station", Filter::Equals("priority_station")),
        ("changes-since", Filter::ChangedSince),
    ];
    let items = page(items, &query, &filters).map_err(fail)?;
    Ok(answer(
        StatusCode::OK,
        json!({ "replication_consistency_groups": items }),
    ))
}

async fn show_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let group = api.group(&headers, &project, &id).await.map_err(fail)?;
    Ok(answer(
        StatusCode::OK,
        json!({ "replication_consistency_group": group_full(&group) }),
    ))
}

#[derive(Deserialize)]
struct UpdateGroupBody {
    replication_consistency_group: Option<UpdateGroup>,
}

#[derive(Deserialize)]
struct UpdateGroup {
    name: Option<String>,
    description: Option<String>,
    replication_model: Option<String>,
    #[serde(default)]
    add_replication_ids: Vec<String>,
    #[serde(default)]
    remove_replication_ids: Vec<String>,
}

async fn update_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: UpdateGroupBody = body(&bytes).map_err(fail)?;
    let g = required(
        request.replication_consistency_group,
        "replication_consistency_group",
    )
    .map_err(fail)?;
    if let Some(model) = &g.replication_model {
        // The model is the group's; it is named only to confirm it.
        let current = api.group(&headers, &project, &id).await.map_err(fail)?;
        if *model != current.replication_model {
            return Err(fail(ApiError::InvalidArgument(format!(
                "replication_model {model:?}: group {} is {} and its model cannot change",
                current.name, current.replication_model
            ))));
        }
    }
    let request = proto::UpdateGroupRequest {
        group: id,
        name: g.name,
        description: g.description,
        add_pairs: g.add_replication_ids,
        remove_pairs: g.remove_replication_ids,
        retention: None,
    };
    let (group, _) = api
        .group_job(&headers, &project, Request::UpdateGroup(request))
        .await
        .map_err(fail)?;
    Ok(answer(
        StatusCode::ACCEPTED,
        json!({ "replication_consistency_group": group_short(&group) }),
    ))
}

async fn delete_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let request = Request::DeleteGroup(proto::GroupRef { group: id });
    api.group_job(&headers, &project, request)
        .await
        .map_err(fail)?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[derive(Deserialize)]
struct ExtendBody {
    replications: Option<Vec<ExtendPair>>,
}

#[derive(Deserialize)]
struct ExtendPair {
    id: Option<String>,
    new_size: Option<u64>,
}

/// `{"<action>": null}`: the five actions without arguments, and
/// `{"os-extend-replication-volumes": {"replications": [{"id", "new_size"}]}}`.
async fn group_action(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let (action, argument) =
        one_action(&bytes, "{\"os-sync-replication-consistency-group\": null}").map_err(fail)?;
    let group = proto::GroupRef { group: id };
    let request = match action.as_str() {
        "os-sync-replication-consistency-group" => Request::SyncGroup(group),
        "os-stop-replication-consistency-group" => Request::StopGroup(group),
        "os-failover-replication-consistency-group" => Request::FailoverGroup(group),
        "os-reverse-replication-consistency-group" => Request::ReverseGroup(group),
        "os-reprotect-replication-consistency-group" => Request::ReprotectGroup(group),
        "os-extend-replication-volumes" => {
            extend(&api, &headers, &project, &group.group, argument).await?;
            return Ok(StatusCode::OK.into_response());
        }
        other => {
            return Err(fail(ApiError::InvalidArgument(format!(
                "unknown action {other:?}: os-sync-, os-stop-, os-failover-, os-reverse- or os-reprotect-replication-consistency-group, or os-extend-replication-volumes"
            ))));
        }
    };
    api.group_job(&headers, &project, request)
        .await
        .map_err(fail)?;
    Ok(StatusCode::OK.into_response())
}

/// Grows the volumes of each pair listed, one pair after the other, and answers once they
/// all grew (as the seed's 200 says); the first refusal or failure ends it.
async fn extend(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
    group: &str,
    argument: Value,
) -> Result<(), Fail> {
    let argument: ExtendBody = serde_json::from_value(argument).map_err(|e| {
        fail(ApiError::InvalidArgument(format!(
            "os-extend-replication-volumes: {e}"
        )))
    })?;
    let pairs = required(
        argument.replications,
        "os-extend-replication-volumes.replications",
    )
    .map_err(fail)?;
    if pairs.is_empty() {
        return Err(fail(ApiError::InvalidArgument(
            "os-extend-replication-volumes.replications lists no pair".into(),
        )));
    }
    // Every pair is checked before any grows: a refusal changes nothing.
    let group = api.group(headers, project, group).await.map_err(fail)?;
    let mut checked: Vec<(String, u64)> = Vec::new();
    for p in pairs {
        let id = required(p.id, "replications[].id").map_err(fail)?;
        let gb = required(p.new_size, "replications[].new_size").map_err(fail)?;
        let size_bytes = gb
            .checked_mul(1 << 30)
            .filter(|s| *s <= MAX_VOLUME_BYTES)
            .ok_or_else(|| {
                fail(ApiError::InvalidArgument(format!(
                    "new_size {gb} GB is more than a volume can be"
                )))
            })?;
        let pair = api.pair(headers, project, &id).await.map_err(fail)?;
        if checked.iter().any(|(p, _)| *p == pair.id) {
            return Err(fail(ApiError::InvalidArgument(format!(
                "pair {id} is listed twice"
            ))));
        }
        if pair.replication_consistency_group_id != group.id {
            return Err(fail(ApiError::InvalidArgument(format!(
                "pair {id} is not in group {}",
                group.name
            ))));
        }
        if size_bytes <= pair.size_bytes {
            return Err(fail(ApiError::InvalidArgument(format!(
                "new_size {gb} GB is not larger than pair {id}'s volumes ({} bytes): an extend grows them",
                pair.size_bytes
            ))));
        }
        checked.push((pair.id, size_bytes));
    }
    let group = group.id;
    for (pair, size_bytes) in checked {
        let request = Request::ExtendGroup(proto::ExtendGroupRequest {
            group: group.clone(),
            pair: pair.clone(),
            size_bytes,
        });
        let job = match api.call(headers, project, request).await.map_err(fail)? {
            Response::GroupJob(answer) => answer.job.unwrap_or_default(),
            _ => return Err(fail(unexpected("an extend"))),
        };
        let ended = wait_for_job(api, headers, project, &job.id, EXTEND_WAIT).await?;
        if ended.status != "SUCCESS" {
            return Err(fail(ApiError::FailedPrecondition(format!(
                "extending pair {pair} failed: {}",
                ended.fail_reason
            ))));
        }
    }
    Ok(())
}

/// Polls a job until it ends, or 503 once `wait` has passed.
pub(crate) async fn wait_for_job(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
    job: &str,
    wait: Duration,
) -> Result<proto::Job, Fail> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let request = Request::GetJob(proto::JobRef {
            job: job.to_owned(),
        });
        match api.call(headers, project, request).await.map_err(fail)? {
            Response::Job(j) if j.status == "SUCCESS" || j.status == "FAIL" => return Ok(j),
            Response::Job(_) => {}
            _ => return Err(fail(unexpected("a job"))),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(ApiError::Unavailable(format!(
                "job {job} did not end within {} s; follow it with GET /v1/{project}/jobs/{job}",
                wait.as_secs()
            ))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A group as its creation and update answer: seven fields.
fn group_short(g: &proto::Group) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "status": g.status,
        "priority_station": g.priority_station,
        "created_at": seed_time(&g.created_at),
        "updated_at": seed_time(&g.updated_at),
    })
}

/// A group as the lists and `GET` show it: twelve fields.
pub fn group_full(g: &proto::Group) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "status": g.status,
        "priority_station": g.priority_station,
        "replication_model": g.replication_model,
        "replication_status": g.replication_status,
        "replication_ids": g.replication_ids,
        "created_at": seed_time(&g.created_at),
        "updated_at": seed_time(&g.updated_at),
        "failure_detail": id_or_null(&g.failure_detail),
        "fault_level": g.fault_level.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;
    use crate::testing::*;

    const P: &str = "/v2/tenant-a/os-vendor-replications";
    const G: &str = "/v2/tenant-a/os-vendor-replication-consistency-groups";

    fn pair(n: u8, created: &str) -> proto::Pair {
        proto::Pair {
            id: format!("pair-{n}"),
            name: format!("p{n}"),
            status: "available".into(),
            replication_status: "active".into(),
            volume_ids: vec![format!("vol-{n}a"), format!("vol-{n}b")],
            priority_station: "az1".into(),
            replication_model: "hypermetro".into(),
            created_at: created.into(),
            size_bytes: 10 << 30,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_request_without_a_token_is_refused_before_any_call() {
        let backend = FakeBackend::new(|_, _| panic!("no call expected"));
        let (status, body) = send(&backend, Method::GET, P, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "EVS.401");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("X-Auth-Token")
        );
        assert!(backend.requests().is_empty());
    }

    #[tokio::test]
    async fn the_coordinators_refusals_keep_their_status_and_message() {
        let backend = FakeBackend::new(|_, _| {
            Err(ApiError::FailedPrecondition(
                "volume d1 is already in pair x".into(),
            ))
        });
        let body = json!({"replication": {"volume_ids": ["a", "b"], "priority_station": "az1", "replication_model": "hypermetro"}});
        let (status, answer) = send(&backend, Method::POST, P, Some("t"), Some(body)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            answer,
            json!({"error": {"message": "volume d1 is already in pair x", "code": "EVS.409"}})
        );
        // The call carried the token's hash and the path's project.
        let calls = backend.calls.lock().unwrap();
        assert_eq!(calls[0].0.project_id, "tenant-a");
        assert_eq!(calls[0].0.token_sha256, blockrep_api::token::sha256("t"));
    }

    #[tokio::test]
    async fn a_pair_is_created_as_the_seed_shows() {
        let backend = FakeBackend::new(|_, r| match r {
            Request::CreatePair(req) => {
                assert_eq!(req.volumes, ["vol-1a", "vol-1b"]);
                assert_eq!(req.priority_station, "az1");
                assert_eq!(req.name, "my replication");
                let mut p = pair(1, "2026-12-06T20:00:00Z");
                p.status = "creating".into();
                Ok(Response::Created(proto::CreatePairResponse {
                    pair: Some(p),
                    job: None,
                }))
            }
            other => panic!("{other:?}"),
        });
        let body = json!({"replication": {
            "name": "my replication", "description": "my replication",
            "volume_ids": ["vol-1a", "vol-1b"], "priority_station": "az1",
            "replication_model": "hypermetro"}});
        let (status, answer) = send(&backend, Method::POST, P, Some("t"), Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            answer,
            json!({"replication": {
                "id": "pair-1", "name": "p1", "description": "", "status": "creating",
                "replication_consistency_group_id": null,
                "volume_ids": "vol-1a, vol-1b", "priority_station": "az1",
                "created_at": "2026-12-06T20:00:00.000000", "updated_at": null}})
        );
    }

    #[tokio::test]
    async fn a_body_missing_a_mandatory_field_is_refused_and_nothing_is_called() {
        let backend = FakeBackend::new(|_, r| panic!("no call expected: {r:?}"));
        let cases = [
            (P, json!({}), "replication is required"),
            (
                P,
                json!({"replication": {"priority_station": "az1", "replication_model": "hypermetro"}}),
                "replication.volume_ids is required",
            ),
            (
                G,
                json!({"replication_consistency_group": {"replication_ids": ["x"], "replication_model": "hypermetro"}}),
                "replication_consistency_group.priority_station is required",
            ),
            (P, json!([1, 2]), "request body"),
        ];
        for (path, body, words) in cases {
            let (status, answer) = send(&backend, Method::POST, path, Some("t"), Some(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(words), "{message} names {words}");
        }
        let (status, _) = send(&backend, Method::POST, P, Some("t"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn lists_show_every_field_and_page_with_a_marker() {
        let backend = FakeBackend::new(|_, r| match r {
            Request::ListPairs(_) => Ok(Response::Pairs(proto::ListPairsResponse {
                pairs: (1..=3)
                    .map(|n| pair(n, &format!("2026-12-0{n}T00:00:00Z")))
                    .collect(),
            })),
            other => panic!("{other:?}"),
        });
        let (status, answer) = send(
            &backend,
            Method::GET,
            &format!("{P}/detail"),
            Some("t"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let first = &answer["replications"][0];
        assert_eq!(first["id"], "pair-3", "newest first");
        assert_eq!(first["volume_ids"], "vol-3a,vol-3b");
        assert_eq!(first["progress"], "100");
        assert_eq!(first["fault_level"], "0");
        let metadata: Value =
            serde_json::from_str(first["record_metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["volume_size"], 10);
        assert_eq!(first.as_object().unwrap().len(), 15);

        let (_, page) = send(
            &backend,
            Method::GET,
            &format!("{P}?limit=2&marker=pair-3"),
            Some("t"),
            None,
        )
        .await;
        let ids: Vec<&str> = page["replications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["pair-2", "pair-1"]);
        let (_, empty) = send(
            &backend,
            Method::GET,
            &format!("{P}?limit=2&marker=pair-1"),
            Some("t"),
            None,
        )
        .await;
        assert_eq!(empty, json!({"replications": []}));
        let (status, _) = send(
            &backend,
            Method::GET,
            &format!("{P}?marker=gone"),
            Some("t"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn each_action_is_its_groups_call_and_answers_200_without_a_body() {
        let backend =
            FakeBackend::new(|_, _| Ok(Response::GroupJob(proto::GroupJobResponse::default())));
        let actions = [
            "os-sync-replication-consistency-group",
            "os-stop-replication-consistency-group",
            "os-failover-replication-consistency-group",
            "os-reverse-replication-consistency-group",
            "os-reprotect-replication-consistency-group",
        ];
        for action in actions {
            let (status, answer) = send(
                &backend,
                Method::POST,
                &format!("{G}/g1/action"),
                Some("t"),
                Some(json!({ action: null })),
            )
            .await;
            assert_eq!((status, answer), (StatusCode::OK, Value::Null), "{action}");
        }
        let kinds: Vec<String> = backend
            .requests()
            .iter()
            .map(|r| format!("{r:?}").split('(').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            kinds,
            [
                "SyncGroup",
                "StopGroup",
                "FailoverGroup",
                "ReverseGroup",
                "ReprotectGroup"
            ]
        );
        for body in [
            json!({"os-dance": null}),
            json!({}),
            json!({"os-sync-replication-consistency-group": null, "os-stop-replication-consistency-group": null}),
        ] {
            let (status, _) = send(
                &backend,
                Method::POST,
                &format!("{G}/g1/action"),
                Some("t"),
                Some(body),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
        assert_eq!(backend.requests().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn extend_answers_once_every_pairs_job_ended() {
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let backend = FakeBackend::new(move |_, r| match r {
            Request::ExtendGroup(req) => {
                assert_eq!(req.size_bytes, 20 << 30);
                Ok(Response::GroupJob(proto::GroupJobResponse {
                    group: None,
                    job: Some(proto::Job {
                        id: format!("job-{}", req.pair),
                        ..Default::default()
                    }),
                }))
            }
            Request::GetGroup(_) => Ok(Response::Group(proto::Group {
                id: "g1".into(),
                ..Default::default()
            })),
            Request::GetPair(p) => Ok(Response::Pair(proto::Pair {
                id: p.pair.clone(),
                replication_consistency_group_id: "g1".into(),
                size_bytes: 10 << 30,
                ..Default::default()
            })),
            Request::GetJob(j) => {
                let n = polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let status = if n.is_multiple_of(2) {
                    "RUNNING"
                } else {
                    "SUCCESS"
                };
                Ok(Response::Job(proto::Job {
                    id: j.job.clone(),
                    status: status.into(),
                    ..Default::default()
                }))
            }
            other => panic!("{other:?}"),
        });
        let body = json!({"os-extend-replication-volumes": {"replications": [
            {"id": "a", "new_size": 20}, {"id": "b", "new_size": 20}]}});
        let (status, _) = send(
            &backend,
            Method::POST,
            &format!("{G}/g1/action"),
            Some("t"),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let log: Vec<String> = backend
            .requests()
            .iter()
            .map(|r| format!("{r:?}").split('(').next().unwrap().to_owned())
            .collect();
        let log: Vec<String> = log
            .into_iter()
            .filter(|k| !k.starts_with("Get") || k == "GetJob")
            .collect();
        assert_eq!(
            log,
            [
                "ExtendGroup",
                "GetJob",
                "GetJob",
                "ExtendGroup",
                "GetJob",
                "GetJob"
            ]
        );
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_answer_json() {
        let backend = FakeBackend::new(|_, _| panic!("no call expected"));
        let (status, answer) = send(&backend, Method::GET, "/v3/x", Some("t"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(answer["error"]["code"], "API.404");
        let (status, answer) = send(&backend, Method::PATCH, P, Some("t"), None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer["error"]["code"], "API.405");
    }

    /// Every listed pair is checked before any grows: one that would shrink, is listed
    /// twice or is not the group's refuses the whole request, with nothing extended.
    #[tokio::test]
    async fn extend_checks_every_pair_before_growing_any() {
        let backend = FakeBackend::new(|_, r| match r {
            Request::GetGroup(_) => Ok(Response::Group(proto::Group {
                id: "g1".into(),
                status: "available".into(),
                replication_ids: vec!["a".into(), "b".into()],
                ..Default::default()
            })),
            Request::GetPair(p) => Ok(Response::Pair(proto::Pair {
                id: p.pair.clone(),
                replication_consistency_group_id: if p.pair == "c" { "other" } else { "g1" }.into(),
                size_bytes: if p.pair == "b" { 40 << 30 } else { 10 << 30 },
                ..Default::default()
            })),
            Request::ExtendGroup(_) => panic!("nothing may grow"),
            other => panic!("{other:?}"),
        });
        for (pairs, words) in [
            (
                json!([{"id": "a", "new_size": 20}, {"id": "b", "new_size": 20}]),
                "not larger",
            ),
            (
                json!([{"id": "a", "new_size": 20}, {"id": "b", "new_size": 40}]),
                "not larger",
            ),
            (
                json!([{"id": "a", "new_size": 20}, {"id": "a", "new_size": 30}]),
                "twice",
            ),
            (
                json!([{"id": "a", "new_size": 20}, {"id": "c", "new_size": 20}]),
                "not in",
            ),
        ] {
            let body = json!({"os-extend-replication-volumes": {"replications": pairs}});
            let (status, answer) = send(
                &backend,
                Method::POST,
                &format!("{G}/g1/action"),
                Some("t"),
                Some(body),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(words), "{message} names {words}");
        }
    }

    #[tokio::test]
    async fn a_body_too_large_is_refused_before_any_call() {
        let backend = FakeBackend::new(|_, r| panic!("no call expected: {r:?}"));
        let big = json!({"replication": {"name": "x".repeat(crate::MAX_BODY_BYTES)}});
        let (status, answer) = send(&backend, Method::POST, P, Some("t"), Some(big)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at most")
        );
    }

    #[tokio::test]
    async fn a_path_naming_no_project_is_not_found_before_any_call() {
        let backend = FakeBackend::new(|_, r| panic!("no call expected: {r:?}"));
        for path in [
            "/v2/%20/os-vendor-replications",
            "/v2/a%2Fb/os-vendor-replications",
        ] {
            let (status, _) = send(&backend, Method::GET, path, Some("t"), None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        }
    }
}
