//! A refusal as the seeds give it: the EVS API's status code (400, 401, 403, 404, 409, 501,
//! 503, 500) and `{"error": {"message": ..., "code": ...}}`, where `code` is the API family
//! and the status (`"EVS.409"`, `"SDRS.404"`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use blockrep_api::ApiError;
use serde_json::json;

/// Which API a refusal belongs to: it names its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Evs,
    Sdrs,
    /// A path of neither.
    Api,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::Evs => "EVS",
            Family::Sdrs => "SDRS",
            Family::Api => "API",
        }
    }
}

/// A refused request.
#[derive(Debug)]
pub struct Fail {
    pub family: Family,
    pub error: ApiError,
}

impl Fail {
    pub fn new(family: Family, error: ApiError) -> Self {
        Self { family, error }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.error.code() as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({
            "error": {
                "message": self.error.to_string(),
                "code": format!("{}.{}", self.family.prefix(), status.as_u16()),
            }
        });
        (status, axum::Json(body)).into_response()
    }
}

pub fn method_not_allowed() -> Response {
    let body = json!({
        "error": {
            "message": "this method is not allowed on this resource",
            "code": "API.405",
        }
    });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// A request body as JSON of `T`, or a 400 that says what is wrong with it.
pub fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::InvalidArgument(
            "the request has no body; it needs a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidArgument(format!("request body: {e}")))
}

/// A mandatory field, or a 400 naming it.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::InvalidArgument(format!("{field} is required")))
}

/// The one action a body names (`{"<action>": <argument>}`) and its argument; `example`
/// shows the caller's form in the refusal.
pub fn one_action(bytes: &[u8], example: &str) -> Result<(String, serde_json::Value), ApiError> {
    let request: serde_json::Map<String, serde_json::Value> = body(bytes)?;
    let mut actions = request.into_iter();
    match (actions.next(), actions.next()) {
        (Some(action), None) => Ok(action),
        _ => Err(ApiError::InvalidArgument(format!(
            "the body names exactly one action, such as {example}"
        ))),
    }
}
