//! SDRS disaster-recovery drills under `/v1/{project_id}/disaster-recovery-drills`, as the
//! OTC SDK's `DRDrill` drives them: a drill of a protection group is blockrep's group drill
//! at the group's newest point in time (docs/POINT-IN-TIME.md): on every DR volume a
//! writable drill volume, served over NBD by its DR agent. So a protection group has drills
//! only if it is async and keeps points (`blockrep group update --retention`, an operator's
//! call); otherwise a create is refused (409) with the reason. Drill servers are servers,
//! which blockrep does not manage: `drill_servers` is empty.
//!
//! Create and delete answer `{"job_id": ...}` (the job is done by the time it answers).

use std::collections::HashMap;

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

use crate::error::{body, required};
use crate::list::{Filter, page};
use crate::sdrs::sdrs_time;
use crate::{Api, Fail, Family, unexpected};

const DRILLS: &str = "/v1/{project_id}/disaster-recovery-drills";

pub fn routes() -> Router<Api> {
    Router::new().route(DRILLS, post(create).get(list)).route(
        &format!("{DRILLS}/{{id}}"),
        get(show).put(update).delete(delete),
    )
}

type Answer = Result<HttpResponse, Fail>;

fn fail(e: ApiError) -> Fail {
    Fail::new(Family::Sdrs, e)
}

fn ok(value: Value) -> HttpResponse {
    (StatusCode::OK, axum::Json(value)).into_response()
}

async fn drill_call(
    api: &Api,
    headers: &HeaderMap,
    project: &str,
    request: Request,
) -> Result<proto::Drill, Fail> {
    match api.call(headers, project, request).await.map_err(fail)? {
        Response::Drill(d) => Ok(d),
        _ => Err(fail(unexpected("an answer that is not a drill"))),
    }
}

/// A drill as SDRS shows it.
fn view(d: &proto::Drill) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "status": d.status,
        "drill_vpc_id": d.drill_vpc_id,
        "server_group_id": d.group_id,
        "drill_servers": [],
        "created_at": sdrs_time(&d.created_at),
        "updated_at": if d.updated_at.is_empty() { Value::Null } else { sdrs_time(&d.updated_at) },
    })
}

#[derive(Deserialize)]
struct CreateBody {
    disaster_recovery_drill: Option<Create>,
}

#[derive(Deserialize)]
struct Create {
    name: Option<String>,
    server_group_id: Option<String>,
    #[serde(default)]
    drill_vpc_id: String,
}

async fn create(
    State(api): State<Api>,
    Path(project): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: CreateBody = body(&bytes).map_err(fail)?;
    let d = required(request.disaster_recovery_drill, "disaster_recovery_drill").map_err(fail)?;
    let name = required(d.name, "disaster_recovery_drill.name").map_err(fail)?;
    let group =
        required(d.server_group_id, "disaster_recovery_drill.server_group_id").map_err(fail)?;
    // A protection group's, not an EVS consistency group's.
    match api.group(&headers, &project, &group).await {
        Ok(g) if g.protection.is_some() => {}
        Ok(_) | Err(ApiError::NotFound(_)) => {
            return Err(fail(ApiError::NotFound(format!(
                "no protection group {group:?}"
            ))));
        }
        Err(e) => return Err(fail(e)),
    }
    let request = Request::CreateGroupDrill(proto::CreateDrillRequest {
        group,
        name,
        point: String::new(),
        drill_vpc_id: d.drill_vpc_id,
    });
    let drill = drill_call(&api, &headers, &project, request).await?;
    Ok(ok(json!({ "job_id": drill.job_id })))
}

async fn list(
    State(api): State<Api>,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let request = Request::ListDrills(proto::ListDrillsRequest::default());
    let drills = match api.call(&headers, &project, request).await.map_err(fail)? {
        Response::Drills(list) => list.drills,
        _ => return Err(fail(unexpected("an answer that is not a list of drills"))),
    };
    let items = drills.iter().map(view).collect();
    let filters = [
        ("name", Filter::Equals("name")),
        ("status", Filter::Equals("status")),
        ("server_group_id", Filter::Equals("server_group_id")),
        ("drill_vpc_id", Filter::Equals("drill_vpc_id")),
    ];
    let mut query = query;
    query.remove("sort_key");
    query.remove("sort_dir");
    let items = page(items, &query, &filters).map_err(fail)?;
    Ok(ok(json!({ "disaster_recovery_drills": items })))
}

async fn show(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let drill = drill_call(
        &api,
        &headers,
        &project,
        Request::GetDrill(proto::DrillRef { drill: id }),
    )
    .await?;
    Ok(ok(json!({ "disaster_recovery_drill": view(&drill) })))
}

#[derive(Deserialize)]
struct UpdateBody {
    disaster_recovery_drill: Option<Update>,
}

#[derive(Deserialize)]
struct Update {
    name: Option<String>,
}

async fn update(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Answer {
    let request: UpdateBody = body(&bytes).map_err(fail)?;
    let d = required(request.disaster_recovery_drill, "disaster_recovery_drill").map_err(fail)?;
    let name = required(d.name, "disaster_recovery_drill.name").map_err(fail)?;
    let request = Request::UpdateDrill(proto::UpdateDrillRequest { drill: id, name });
    let drill = drill_call(&api, &headers, &project, request).await?;
    Ok(ok(json!({ "disaster_recovery_drill": view(&drill) })))
}

async fn delete(
    State(api): State<Api>,
    Path((project, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    let request = Request::DeleteGroupDrill(proto::DrillRef { drill: id });
    let drill = drill_call(&api, &headers, &project, request).await?;
    Ok(ok(json!({ "job_id": drill.job_id })))
}
