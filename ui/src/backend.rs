//! The UI reads and writes through the master's own API router, in process: the same
//! handlers, validation, admission and auth as `curl` gets, with the session's token as the
//! bearer. There is no second path to state.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Largest API answer a page reads (a page of a huge cluster asks for less).
const MAX_READ: usize = 64 << 20;

/// An API error as a page shows it: the API's message and the field it names.
#[derive(Debug, Clone, Default)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    /// Each field's problem, when the API lists several.
    pub errors: Vec<(String, String)>,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

/// The API router and a way to call it.
#[derive(Clone)]
pub struct Backend {
    api: Router,
}

impl Backend {
    pub fn new(api: Router) -> Backend {
        Backend { api }
    }

    /// Calls the API; the raw response (status, headers, streaming body).
    pub async fn raw(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> axum::response::Response {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(&v).unwrap_or_default())
            }
            None => Body::empty(),
        };
        // A token or path that cannot be put in a request (e.g. control characters) is the
        // caller's error, answered as the API would, never a panic.
        let req = match req.body(body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({
                        "code": "invalid_request",
                        "message": format!("the request cannot be sent: {e}"),
                    })),
                )
                    .into_response()
            }
        };
        match self.api.clone().oneshot(req).await {
            Ok(r) => r,
            Err(e) => match e {},
        }
    }

    /// Calls the API and reads the whole answer: `(status, bytes, x-file-size)`.
    pub async fn bytes(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Vec<u8>, Option<u64>), ApiFailure> {
        let r = self.raw(token, method, path, body).await;
        let status = r.status();
        let size = r
            .headers()
            .get("x-file-size")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let limited = http_body_util::Limited::new(r.into_body(), MAX_READ);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| ApiFailure {
                status: 500,
                code: "read".into(),
                message: format!("reading the API's answer: {e}"),
                ..Default::default()
            })?
            .to_bytes()
            .to_vec();
        if !status.is_success() {
            return Err(failure(status, &bytes));
        }
        Ok((status, bytes, size))
    }

    /// A JSON read (`GET`).
    pub async fn get(&self, token: &str, path: &str) -> Result<Value, ApiFailure> {
        self.json(token, Method::GET, path, None).await
    }

    /// A JSON call of any method.
    pub async fn json(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiFailure> {
        let (_, bytes, _) = self.bytes(token, method, path, body).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiFailure {
            status: 500,
            code: "decode".into(),
            message: format!("the API's answer is not JSON: {e}"),
            ..Default::default()
        })
    }
}

fn failure(status: StatusCode, bytes: &[u8]) -> ApiFailure {
    let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let errors = v["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or("").to_string(),
                        e["message"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ApiFailure {
        status: status.as_u16(),
        code: v["code"].as_str().unwrap_or("error").to_string(),
        message: v["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("the API answered {status}")),
        field: v["field"].as_str().map(str::to_string),
        errors,
    }
}

/// Percent-encodes one path segment or query value.
pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
