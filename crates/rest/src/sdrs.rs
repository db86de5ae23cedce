//! SDRS v1 under `/v1/{project_id}`, as the public OTC SDK (`otcextensions`,
//! `sdk/sdrs/v1`) drives it:
//!
//! | resource | calls | underneath |
//! |---|---|---|
//! | `active-domains` | `GET` | one domain per pair of the cluster's zones |
//! | `server-groups` | create, list, show, update (name), delete, `action` (start, stop, failover, reverse) | a consistency group with a protection spec |
//! | `replications` | create, list, show, update (name), delete (`delete_target_volume`), `action` (`extend-replication`) | a pair made for the group, its DR volume from a pool |
//! | `jobs/{job_id}` | `GET` | the coordinator's job |
//! | `sdrs/quotas` | `GET` | `[api]` quotas |
//! | `disaster-recovery-drills` | create, list, show, update (name), delete | a group drill at the newest point (module `drills`) |
//! | `protected-instances`, `task-center` | anything | 501 |
//!
//! Creates, deletes and actions answer `{"job_id": ...}` (200, as the seed gives it); a
//! client follows the job. A protection group's status is its group's, spelled as SDRS
//! does, with the job under way ("starting", "stopping", "reprotecting") or the last one
//! failed ("error-starting", ...).

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{any, get, post};
use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{body, one_action, required};
use crate::list::{Filter, page};
use crate::time::seed_time;
use crate::{Api, Fail, Family, unexpected};

const V1: &str = "/v1/{project_id}";

pub fn routes() -> Router<Api> {
    Router::new()
        .route(&format!("{V1}/active-domains"), get(active_domains))
        .route(
            &format!("{V1}/server-groups"),
            post(create_group).get(list_groups),
        )
        .route(
            &format!("{V1}/server-groups/{{id}}"),
            get(show_group).put(update_group).delete(delete_group),
        )
        .route(
            &format!("{V1}/server-groups/{{id}}/action"),
            post(group_action),
        )
        .route(
            &format!("{V1}/replications"),
            post(create_pair).get(list_pairs),
        )
        .route(
            &format!("{V1}/replications/{{id}}"),
            get(show_pair).put(update_pair).delete(delete_pair),
        )
        .route(
            &format!("{V1}/replications/{{id}}/action"),
            post(pair_action),
        )
        .route(&format!("{V1}/jobs/{{id}}"), get(show_job))
        .route(&format!("{V1}/sdrs/quotas"), get(quotas))
        .route(&format!("{V1}/protected-instances"), any(servers))
        .route(&format!("{V1}/protected-instances/{{*rest}}"), any(servers))
        .merge(crate::drills::routes())
        .route(&format!("{V1}/task-center"), any(task_center))
        .route(&format!("{V1}/task-center/{{*rest}}"), any(task_center))
}

type Answer = Result<HttpResponse, Fail>;

fn fail(e: ApiError) -> Fail {
    Fail::new(Family::Sdrs, e)
}

fn ok(value: Value) -> HttpResponse {
    (StatusCode::OK, axum::Json(value)).into_response()
}

/// A group's call that starts a job, answered as SDRS answers: `{"job_id": ...}`.
async fn started(api: &Api, headers: &HeaderMap, project: &str, request: Request) -> Answer {
    let (_, job) = api
        .group_job(headers, project, request)
        .await
        .map_err(fail)?;
    let job = job.ok_or_else(|| fail(unexpected("a call without its job")))?;
    Ok(ok(json!({ "job_id": job.id })))
}

// ---- what blockrep does not serve ----

async fn servers() -> Fail {
    fail(ApiError::NotImplemented(
        "protected instances and their NICs are servers, which blockrep does not manage: it replicates volumes (use /v1/{project_id}/replications)".into(),
    ))
}

async fn task_center() -> Fail {
    fail(ApiError::NotImplemented(
        "the task center is not served: a failed job keeps its reason (GET /v1/{project_id}/jobs/{job_id})".into(),
    ))
}

// ---- active-active domains ----

/// The zones of the cluster, two by two.
async fn zones(api: &Api, headers: &HeaderMap, project: &str) -> Result<Vec<String>, Fail> {
    match api
        .call(
            headers,
            project,
            Request::ListNodes(proto::ListNodesRequest {}),
        )
        .await
        .map_err(fail)?
    {
        Response::Nodes(list) => {
            let mut zones: Vec<String> = list
                .nodes
                .into_iter()
                .map(|n| n.availability_zone)
                .collect();
            zones.sort();
            zones.dedup();
            Ok(zones)
        }
        _ => Err(fail(unexpected("the node list"))),
    }
}

fn domain_name(a: &str, b: &str) -> String {
    format!("{a}-{b}")
}

/// The name of the domain of two zones, in either order.
fn domain_of(a: &str, b: &str) -> String {
    if a <= b {
        domain_name(a, b)
    } else {
        domain_name(b, a)
    }
}

async fn active_domains(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let zones = zones(&api, &headers, &project).await?;
    let mut domains = Vec::new();
    for (i, a) in zones.iter().enumerate() {
        for b in &zones[i + 1..] {
            domains.push(json!({
                "id": blockrep_api::domain_id(a, b),
                "name": domain_name(a, b),
                "description": format!("volumes replicated between {a} and {b}"),
                "sold_out": false,
                "local_replication_cluster": {"availability_zone": a},
                "remote_replication_cluster": {"availability_zone": b},
            }));
        }
    }
    Ok(ok(json!({ "domains": domains })))
}

// ---- protection groups ----

#[derive(Deserialize)]
struct CreateGroupBody {
    server_group: Option<CreateGroup>,
}

#[derive(Deserialize)]
struct CreateGroup {
    name: Option<String>,
    #[serde(default)]
    description: String,
    source_availability_zone: Option<String>,
    target_availability_zone: Option<String>,
    domain_id: Option<String>,
    source_vpc_id: Option<String>,
    #[serde(default)]
    dr_type: String,
    /// blockrep's own: "hypermetro" (the default) or "async".
    #[serde(default)]
    replication_model: String,
}

async fn create_group(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: CreateGroupBody = body(&bytes).map_err(fail)?;
    let g = required(request.server_group, "server_group").map_err(fail)?;
    let spec = proto::ProtectionGroupSpec {
        source_availability_zone: required(
            g.source_availability_zone,
            "server_group.source_availability_zone",
        )
        .map_err(fail)?,
        target_availability_zone: required(
            g.target_availability_zone,
            "server_group.target_availability_zone",
        )
        .map_err(fail)?,
        domain_id: required(g.domain_id, "server_group.domain_id").map_err(fail)?,
        source_vpc_id: required(g.source_vpc_id, "server_group.source_vpc_id").map_err(fail)?,
        dr_type: g.dr_type,
    };
    let name = required(g.name, "server_group.name").map_err(fail)?;
    let groups = protection_groups(&api, &headers, &project).await?;
    check_quota(api.quotas.server_groups, groups.len(), "protection groups")?;
    let request = proto::CreateGroupRequest {
        name,
        description: g.description,
        pairs: Vec::new(),
        priority_station: String::new(),
        replication_model: g.replication_model,
        protection: Some(spec),
        retention: None,
    };
    started(&api, &headers, &project, Request::CreateGroup(request)).await
}

fn check_quota(quota: u64, used: usize, what: &str) -> Result<(), Fail> {
    if used as u64 >= quota {
        return Err(fail(ApiError::FailedPrecondition(format!(
            "the project has {used} {what}; its quota is {quota}"
        ))));
    }
    Ok(())
}

/// The project's protection groups (its other groups are EVS consistency groups).
async fn protection_groups(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
) -> Result<Vec<proto::Group>, Fail> {
    let groups = api.groups(headers, project).await.map_err(fail)?;
    Ok(groups
        .into_iter()
        .filter(|g| g.protection.is_some())
        .collect())
}

async fn list_groups(
    State(api): State<Api>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let groups = protection_groups(&api, &headers, &project).await?;
    let items = groups.iter().map(group_view).collect();
    let filters = [
        ("name", Filter::Equals("name")),
        ("status", Filter::Equals("status")),
        (
            "availability_zone",
            Filter::Equals("source_availability_zone"),
        ),
    ];
    let items = page(items, &without_sort(query), &filters).map_err(fail)?;
    Ok(ok(json!({ "server_groups": items })))
}

/// SDRS lists take no sort parameters: newest first.
fn without_sort(mut query: HashMap<String, String>) -> HashMap<String, String> {
    query.remove("sort_key");
    query.remove("sort_dir");
    query
}

/// A protection group by id or name, or 404 (another group is not one).
async fn protection_group(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
    id: &str,
) -> Result<proto::Group, Fail> {
    match api.group(headers, project, id).await {
        Ok(g) if g.protection.is_some() => Ok(g),
        Ok(_) | Err(ApiError::NotFound(_)) => Err(fail(ApiError::NotFound(format!(
            "no protection group {id:?}"
        )))),
        Err(e) => Err(fail(e)),
    }
}

async fn show_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let group = protection_group(&api, &headers, &project, &id).await?;
    Ok(ok(json!({ "server_group": group_view(&group) })))
}

#[derive(Deserialize)]
struct UpdateGroupBody {
    server_group: Option<UpdateGroup>,
}

#[derive(Deserialize)]
struct UpdateGroup {
    name: Option<String>,
}

async fn update_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: UpdateGroupBody = body(&bytes).map_err(fail)?;
    let g = required(request.server_group, "server_group").map_err(fail)?;
    let name = required(g.name, "server_group.name").map_err(fail)?;
    let group = protection_group(&api, &headers, &project, &id).await?;
    let request = proto::UpdateGroupRequest {
        group: group.id,
        name: Some(name),
        ..Default::default()
    };
    let (group, _) = api
        .group_job(&headers, &project, Request::UpdateGroup(request))
        .await
        .map_err(fail)?;
    Ok(ok(json!({ "server_group": group_view(&group) })))
}

async fn delete_group(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let group = protection_group(&api, &headers, &project, &id).await?;
    let request = Request::DeleteGroup(proto::GroupRef { group: group.id });
    started(&api, &headers, &project, request).await
}

#[derive(Deserialize)]
struct Reverse {
    priority_station: Option<String>,
}

async fn group_action(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let (action, argument) = one_action(&bytes, "{\"start-server-group\": {}}").map_err(fail)?;
    let group = protection_group(&api, &headers, &project, &id).await?;
    let reference = proto::GroupRef {
        group: group.id.clone(),
    };
    let request = match action.as_str() {
        // Protection starts; after a failover, starting it again is the reprotect.
        "start-server-group" if group.status == "failovered" => Request::ReprotectGroup(reference),
        "start-server-group" => Request::SyncGroup(reference),
        "stop-server-group" => Request::StopGroup(reference),
        "failover-server-group" => Request::FailoverGroup(reference),
        "reverse-server-group" => {
            let reverse: Reverse = serde_json::from_value(argument).map_err(|e| {
                fail(ApiError::InvalidArgument(format!(
                    "reverse-server-group: {e}"
                )))
            })?;
            let wanted = required(
                reverse.priority_station,
                "reverse-server-group.priority_station",
            )
            .map_err(fail)?;
            if wanted != "source" && wanted != "target" {
                return Err(fail(ApiError::InvalidArgument(format!(
                    "priority_station {wanted:?} is not source or target"
                ))));
            }
            if wanted == priority_station(&group) {
                return Err(fail(ApiError::FailedPrecondition(format!(
                    "the protection group's production site is the {wanted} already"
                ))));
            }
            Request::ReverseGroup(reference)
        }
        other => {
            return Err(fail(ApiError::InvalidArgument(format!(
                "unknown action {other:?}: start-server-group, stop-server-group, failover-server-group or reverse-server-group"
            ))));
        }
    };
    started(&api, &headers, &project, request).await
}

/// "source" while production is in the group's source zone, else "target".
fn priority_station(g: &proto::Group) -> &'static str {
    match &g.protection {
        Some(p) if g.priority_station != p.source_availability_zone => "target",
        _ => "source",
    }
}

/// A protection group's status as SDRS spells it.
pub fn sdrs_status(g: &proto::Group) -> String {
    let job = g.job.as_ref();
    let running = |t: &str| job.is_some_and(|j| j.job_type == t && j.status == "RUNNING");
    let failed = |t: &str| job.is_some_and(|j| j.job_type == t && j.status == "FAIL");
    let status = match g.status.as_str() {
        "creating" => "creating",
        "deleting" => "deleting",
        "error_deleting" => "error-deleting",
        "failovering" => "failing-over",
        "error_failovering" => "error-failing-over",
        "failovered" if failed("reprotectReplicationConsistencyGroup") => "error-reprotecting",
        "failovered" => "failed-over",
        "reversing" => "reversing",
        "error_reversing" => "error-reversing",
        "error" => "error",
        _ if running("reprotectReplicationConsistencyGroup") => "reprotecting",
        _ if running("syncReplicationConsistencyGroup") => "starting",
        _ if running("stopReplicationConsistencyGroup") => "stopping",
        _ if failed("syncReplicationConsistencyGroup") => "error-starting",
        _ if failed("stopReplicationConsistencyGroup") => "error-stopping",
        _ if g.stopped => "available",
        // Protected once failover-able: every pair replicates as the group's, which has a
        // consistent point; until then protection is still starting.
        _ if !g.replication_ids.is_empty()
            && (g.replication_status != "active" || g.consistent_epoch == 0) =>
        {
            "starting"
        }
        _ => "protected",
    };
    status.to_owned()
}

fn group_view(g: &proto::Group) -> Value {
    let spec = g.protection.clone().unwrap_or_default();
    let progress = match g.replication_status.as_str() {
        "active" => 100,
        "copying" => g
            .job
            .as_ref()
            .map_or(0, |j| (j.progress * 100.0).floor() as u32),
        _ => 0,
    };
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "status": sdrs_status(g),
        "source_availability_zone": spec.source_availability_zone,
        "target_availability_zone": spec.target_availability_zone,
        "domain_id": spec.domain_id,
        "domain_name": domain_of(&spec.source_availability_zone, &spec.target_availability_zone),
        "priority_station": priority_station(g),
        "protected_status": if g.stopped { "stopped" } else { "started" },
        "replication_status": g.replication_status,
        "health_status": if g.fault_level == 0 { "normal" } else { "abnormal" },
        "progress": progress,
        "replication_num": g.replication_ids.len(),
        "protected_instance_num": 0,
        "disaster_recovery_drill_num": g.drills,
        "source_vpc_id": spec.source_vpc_id,
        "target_vpc_id": null,
        "test_vpc_id": null,
        "dr_type": spec.dr_type,
        "protection_type": "replication-pair",
        "replication_model": g.replication_model,
        "created_at": sdrs_time(&g.created_at),
        "updated_at": sdrs_time(&g.updated_at),
    })
}

/// SDRS's time: `2022-02-26 20:39:30.718`.
pub(crate) fn sdrs_time(rfc3339: &str) -> Value {
    match seed_time(rfc3339) {
        Value::String(t) => Value::String(t.replacen('T', " ", 1)[..23.min(t.len())].to_owned()),
        other => other,
    }
}

// ---- replication pairs ----

#[derive(Deserialize)]
struct CreatePairBody {
    replication: Option<CreatePair>,
}

#[derive(Deserialize)]
struct CreatePair {
    server_group_id: Option<String>,
    volume_id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_pair(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: CreatePairBody = body(&bytes).map_err(fail)?;
    let r = required(request.replication, "replication").map_err(fail)?;
    let group_id = required(r.server_group_id, "replication.server_group_id").map_err(fail)?;
    let volume = required(r.volume_id, "replication.volume_id").map_err(fail)?;
    let group = protection_group(&api, &headers, &project, &group_id).await?;
    let used = protected_pairs(&api, &headers, &project).await?.0.len();
    check_quota(api.quotas.replications, used, "replication pairs")?;
    let request = Request::AddGroupPair(proto::AddGroupPairRequest {
        group: group.id,
        volume,
        name: r.name,
        description: r.description,
    });
    started(&api, &headers, &project, request).await
}

/// The project's pairs that are in a protection group, and those groups.
async fn protected_pairs(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
) -> Result<(Vec<proto::Pair>, Vec<proto::Group>), Fail> {
    let groups = protection_groups(api, headers, project).await?;
    let pairs = api.pairs(headers, project).await.map_err(fail)?;
    let pairs = pairs
        .into_iter()
        .filter(|p| {
            groups
                .iter()
                .any(|g| g.id == p.replication_consistency_group_id)
        })
        .collect();
    Ok((pairs, groups))
}

async fn list_pairs(
    State(api): State<Api>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    // Pairs attach to no protected instance: asking by instance finds none.
    if query.contains_key("protected_instance_id") || query.contains_key("protected_instance_ids") {
        return Ok(ok(json!({ "replications": [] })));
    }
    let (pairs, groups) = protected_pairs(&api, &headers, &project).await?;
    let items = pairs
        .iter()
        .filter_map(|p| {
            let g = groups
                .iter()
                .find(|g| g.id == p.replication_consistency_group_id)?;
            Some(pair_view(p, g))
        })
        .collect();
    let filters = [
        ("server_group_id", Filter::Equals("server_group_id")),
        ("name", Filter::Equals("name")),
        ("status", Filter::Equals("status")),
    ];
    let items = page(items, &without_sort(query), &filters).map_err(fail)?;
    Ok(ok(json!({ "replications": items })))
}

/// A pair of a protection group by id or name, and its group; or 404.
async fn protected_pair(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
    id: &str,
) -> Result<(proto::Pair, proto::Group), Fail> {
    let not_found = || fail(ApiError::NotFound(format!("no replication pair {id:?}")));
    let pair = match api.pair(headers, project, id).await {
        Ok(p) => p,
        Err(ApiError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(fail(e)),
    };
    if pair.replication_consistency_group_id.is_empty() {
        return Err(not_found());
    }
    match protection_group(
        api,
        headers,
        project,
        &pair.replication_consistency_group_id,
    )
    .await
    {
        Ok(group) => Ok((pair, group)),
        Err(_) => Err(not_found()),
    }
}

async fn show_pair(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let (pair, group) = protected_pair(&api, &headers, &project, &id).await?;
    Ok(ok(json!({ "replication": pair_view(&pair, &group) })))
}

#[derive(Deserialize)]
struct UpdatePairBody {
    replication: Option<UpdatePair>,
}

#[derive(Deserialize)]
struct UpdatePair {
    name: Option<String>,
}

async fn update_pair(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: UpdatePairBody = body(&bytes).map_err(fail)?;
    let r = required(request.replication, "replication").map_err(fail)?;
    let name = required(r.name, "replication.name").map_err(fail)?;
    let (pair, group) = protected_pair(&api, &headers, &project, &id).await?;
    let request = Request::UpdatePair(proto::UpdatePairRequest {
        pair: pair.id,
        name: Some(name),
        ..Default::default()
    });
    match api.call(&headers, &project, request).await.map_err(fail)? {
        Response::Pair(p) => Ok(ok(json!({ "replication": pair_view(&p, &group) }))),
        _ => Err(fail(unexpected("a pair's update"))),
    }
}

#[derive(Deserialize, Default)]
struct DeletePairBody {
    replication: Option<DeletePair>,
}

#[derive(Deserialize, Default)]
struct DeletePair {
    #[serde(default)]
    delete_target_volume: bool,
}

async fn delete_pair(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    // The SDK sends a body; a client may send none (the DR volume is kept then).
    let request: DeletePairBody = if bytes.is_empty() {
        DeletePairBody::default()
    } else {
        body(&bytes).map_err(fail)?
    };
    let delete_dr_volume = request.replication.unwrap_or_default().delete_target_volume;
    let (pair, _) = protected_pair(&api, &headers, &project, &id).await?;
    let request = Request::RemoveGroupPair(proto::RemoveGroupPairRequest {
        pair: pair.id,
        delete_dr_volume,
    });
    started(&api, &headers, &project, request).await
}

#[derive(Deserialize)]
struct Extend {
    new_size: Option<u64>,
}

async fn pair_action(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let (action, argument) =
        one_action(&bytes, "{\"extend-replication\": {\"new_size\": 10}}").map_err(fail)?;
    if action != "extend-replication" {
        return Err(fail(ApiError::InvalidArgument(format!(
            "unknown action {action:?}: extend-replication"
        ))));
    }
    let extend: Extend = serde_json::from_value(argument).map_err(|e| {
        fail(ApiError::InvalidArgument(format!(
            "extend-replication: {e}"
        )))
    })?;
    let gib = required(extend.new_size, "extend-replication.new_size").map_err(fail)?;
    let size_bytes = gib
        .checked_mul(1 << 30)
        .filter(|s| *s <= crate::evs::MAX_VOLUME_BYTES)
        .ok_or_else(|| {
            fail(ApiError::InvalidArgument(format!(
                "new_size {gib} GiB is more than a volume can be"
            )))
        })?;
    let (pair, group) = protected_pair(&api, &headers, &project, &id).await?;
    let request = Request::ExtendGroup(proto::ExtendGroupRequest {
        group: group.id,
        pair: pair.id,
        size_bytes,
    });
    started(&api, &headers, &project, request).await
}

fn pair_view(p: &proto::Pair, g: &proto::Group) -> Value {
    let status = match p.status.as_str() {
        "available" => sdrs_status(g),
        "error_deleting" => "error-deleting".to_owned(),
        other => other.to_owned(),
    };
    let progress = match p.replication_status.as_str() {
        "active" | "active-stopped" => 100,
        "copying" => (p.progress * 100.0).floor() as u32,
        _ => 0,
    };
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "replication_model": p.replication_model,
        "status": status,
        "volume_ids": p.volume_ids.join(","),
        "server_group_id": g.id,
        "priority_station": priority_station(g),
        "progress": progress,
        "replication_status": p.replication_status,
        "fault_level": p.fault_level.to_string(),
        "failure_detail": if p.failure_detail.is_empty() { Value::Null } else { json!(p.failure_detail) },
        "record_metadata": {
            "volume_size": p.size_bytes.div_ceil(1 << 30),
            "volume_type": "blockrep",
            "multiattach": false,
            "bootable": false,
        },
        "attachment": [],
        "created_at": sdrs_time(&p.created_at),
        "updated_at": sdrs_time(&p.updated_at),
    })
}

// ---- jobs and quotas ----

/// SDRS's name of a job's type.
fn job_type(t: &str) -> &str {
    match t {
        "createReplicationConsistencyGroup" => "createServerGroup",
        "updateReplicationConsistencyGroup" => "updateServerGroup",
        "deleteReplicationConsistencyGroup" => "deleteServerGroup",
        "syncReplicationConsistencyGroup" => "startServerGroup",
        "stopReplicationConsistencyGroup" => "stopServerGroup",
        "failoverReplicationConsistencyGroup" => "failoverServerGroup",
        "reverseReplicationConsistencyGroup" => "reverseServerGroup",
        "reprotectReplicationConsistencyGroup" => "reprotectServerGroup",
        "createGroupReplicationPair" => "createReplicationPair",
        "deleteGroupReplicationPair" => "deleteReplicationPair",
        "extendReplicationVolumes" => "expandReplicationPair",
        "createDisasterRecoveryDrill" => "createDrDrill",
        "deleteDisasterRecoveryDrill" => "deleteDrDrill",
        other => other,
    }
}

async fn show_job(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let request = Request::GetJob(proto::JobRef { job: id });
    let job = match api.call(&headers, &project, request).await.map_err(fail)? {
        Response::Job(j) => j,
        _ => return Err(fail(unexpected("a job"))),
    };
    // A failed job's reason in the service's form: words, then "error : " and the error.
    let (error_code, fail_reason) = if job.status == "FAIL" {
        let error = json!({"error": {"message": job.fail_reason, "code": "SDRS.500"}});
        (
            json!("SDRS.500"),
            json!(format!("{} error : {error}", job_type(&job.job_type))),
        )
    } else {
        (Value::Null, Value::Null)
    };
    let mut entities = serde_json::Map::new();
    if !job.group_id.is_empty() {
        entities.insert("server_group_id".into(), json!(job.group_id));
    }
    if !job.pair_id.is_empty() {
        entities.insert("replication_id".into(), json!(job.pair_id));
    }
    let status = match job.status.as_str() {
        "SUCCESS" | "FAIL" | "INIT" | "RUNNING" => job.status.clone(),
        _ => "RUNNING".into(),
    };
    Ok(ok(json!({
        "job_id": job.id,
        "job_type": job_type(&job.job_type),
        "status": status,
        "begin_time": job_time(&job.begin_time),
        "end_time": job_time(&job.end_time),
        "error_code": error_code,
        "fail_reason": fail_reason,
        "entities": entities,
    })))
}

/// A job's time as SDRS gives it: `2022-03-18T13:55:33.570Z`.
fn job_time(rfc3339: &str) -> Value {
    match seed_time(rfc3339) {
        Value::String(t) => Value::String(format!("{}Z", &t[..23.min(t.len())])),
        other => other,
    }
}

async fn quotas(State(api): State<Api>, Path(project): Path<String>, headers: HeaderMap) -> Answer {
    let (pairs, groups) = protected_pairs(&api, &headers, &project).await?;
    Ok(ok(json!({"quotas": {"resources": [
        {"type": "server_groups", "used": groups.len(), "quota": api.quotas.server_groups, "min": 0, "max": -1},
        {"type": "replications", "used": pairs.len(), "quota": api.quotas.replications, "min": 0, "max": -1},
    ]}})))
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;
    use crate::testing::*;

    fn group(status: &str, stopped: bool, job: Option<(&str, &str)>) -> proto::Group {
        proto::Group {
            id: "pg-1".into(),
            name: "pg".into(),
            status: status.into(),
            replication_status: if stopped { "active-stopped" } else { "active" }.into(),
            replication_ids: vec!["pair-1".into()],
            priority_station: "az1".into(),
            consistent_epoch: 3,
            stopped,
            created_at: "2026-12-06T20:00:00Z".into(),
            protection: Some(proto::ProtectionGroupSpec {
                source_availability_zone: "az1".into(),
                target_availability_zone: "az2".into(),
                domain_id: blockrep_api::domain_id("az1", "az2"),
                source_vpc_id: "vpc".into(),
                dr_type: "migration".into(),
            }),
            job: job.map(|(t, s)| proto::Job {
                job_type: t.into(),
                status: s.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_protection_groups_status_is_spelled_as_sdrs_does() {
        let sync = "syncReplicationConsistencyGroup";
        let stop = "stopReplicationConsistencyGroup";
        let reprotect = "reprotectReplicationConsistencyGroup";
        let cases = [
            (group("available", true, None), "available"),
            (group("available", false, None), "protected"),
            (
                group("available", false, Some((sync, "RUNNING"))),
                "starting",
            ),
            (
                group("available", false, Some((sync, "FAIL"))),
                "error-starting",
            ),
            (
                group("available", true, Some((stop, "RUNNING"))),
                "stopping",
            ),
            (
                group("available", false, Some((reprotect, "RUNNING"))),
                "reprotecting",
            ),
            (
                group("failovered", true, Some((reprotect, "FAIL"))),
                "error-reprotecting",
            ),
            (group("failovered", true, None), "failed-over"),
            (group("failovering", false, None), "failing-over"),
            (
                group("error_failovering", false, None),
                "error-failing-over",
            ),
            (group("reversing", false, None), "reversing"),
            (group("error_reversing", false, None), "error-reversing"),
            (group("deleting", true, None), "deleting"),
            (group("creating", true, None), "creating"),
        ];
        for (g, want) in cases {
            assert_eq!(sdrs_status(&g), want, "{} {:?}", g.status, g.job);
        }
        // Replicating, but not yet failover-able: still starting.
        let mut joining = group("available", false, None);
        joining.consistent_epoch = 0;
        assert_eq!(sdrs_status(&joining), "starting");
    }

    #[tokio::test]
    async fn start_after_a_failover_is_the_reprotect_and_reverse_checks_its_station() {
        let backend = FakeBackend::new(|_, r| match r {
            Request::GetGroup(_) => Ok(Response::Group(group("failovered", true, None))),
            Request::ReprotectGroup(_) => Ok(Response::GroupJob(proto::GroupJobResponse {
                group: None,
                job: Some(proto::Job {
                    id: "job-9".into(),
                    ..Default::default()
                }),
            })),
            other => panic!("{other:?}"),
        });
        let path = "/v1/p/server-groups/pg-1/action";
        let (status, answer) = send(
            &backend,
            Method::POST,
            path,
            Some("t"),
            Some(json!({"start-server-group": {}})),
        )
        .await;
        assert_eq!(
            (status, answer),
            (StatusCode::OK, json!({"job_id": "job-9"}))
        );
        let (status, answer) = send(
            &backend,
            Method::POST,
            path,
            Some("t"),
            Some(json!({"reverse-server-group": {"priority_station": "source"}})),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        let (status, _) = send(
            &backend,
            Method::POST,
            path,
            Some("t"),
            Some(json!({"reverse-server-group": {"priority_station": "elsewhere"}})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn servers_and_the_task_center_are_not_served() {
        let backend = FakeBackend::new(|_, r| panic!("no call expected: {r:?}"));
        for (method, path) in [
            (Method::GET, "/v1/p/protected-instances"),
            (Method::POST, "/v1/p/protected-instances/x/nic"),
            (Method::DELETE, "/v1/p/task-center/failure-jobs/batch"),
            (Method::GET, "/v1/p/task-center"),
        ] {
            let (status, answer) = send(&backend, method, path, Some("t"), None).await;
            assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{path}");
            assert_eq!(answer["error"]["code"], "SDRS.501");
        }
    }

    #[tokio::test]
    async fn a_failed_job_carries_its_reason_in_the_services_form() {
        let backend = FakeBackend::new(|_, r| match r {
            Request::GetJob(j) => Ok(Response::Job(proto::Job {
                id: j.job.clone(),
                job_type: "createGroupReplicationPair".into(),
                status: "FAIL".into(),
                begin_time: "2026-12-06T20:00:00Z".into(),
                end_time: "2026-12-06T20:00:01Z".into(),
                fail_reason: "no live node of zone az2 has a storage pool".into(),
                group_id: "pg-1".into(),
                ..Default::default()
            })),
            other => panic!("{other:?}"),
        });
        let (status, job) = send(&backend, Method::GET, "/v1/p/jobs/j1", Some("t"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(job["job_type"], "createReplicationPair");
        assert_eq!(job["begin_time"], "2026-12-06T20:00:00.000Z");
        assert_eq!(job["entities"]["server_group_id"], "pg-1");
        // The OTC CLI splits the reason at "error : " and reads the JSON after it.
        let reason = job["fail_reason"].as_str().unwrap();
        let (_, error) = reason.split_once("error : ").unwrap();
        let error: Value = serde_json::from_str(error).unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("storage pool")
        );
    }
}
