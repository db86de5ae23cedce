//! What the REST API's tests share: a backend that answers from a test's function and keeps
//! every call, and one request through the whole router.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::*;

type Answerer = dyn Fn(&proto::ApiScope, &Request) -> Result<Response, ApiError> + Send + Sync;

/// A coordinator stand-in: answers each call with `answer`, and keeps the calls.
pub struct FakeBackend {
    answer: Box<Answerer>,
    pub calls: Mutex<Vec<(proto::ApiScope, Request)>>,
}

impl FakeBackend {
    pub fn new(
        answer: impl Fn(&proto::ApiScope, &Request) -> Result<Response, ApiError>
        + Send
        + Sync
        + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            answer: Box::new(answer),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn requests(&self) -> Vec<Request> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Backend for FakeBackend {
    fn call(
        &self,
        scope: proto::ApiScope,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, ApiError>> {
        let answer = (self.answer)(&scope, &request);
        self.calls.lock().unwrap().push((scope, request));
        Box::pin(async move { answer })
    }
}

/// One request through the router: its status and JSON body (`Null` when empty).
pub async fn send(
    backend: &Arc<FakeBackend>,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let router = router(Api::new(
        Arc::clone(backend) as Arc<dyn Backend>,
        Quotas::default(),
    ));
    let mut request = HttpRequest::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("X-Auth-Token", token);
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}
