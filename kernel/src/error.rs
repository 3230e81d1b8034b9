//! API errors: JSON `{code, message, field}` with a status code, and the JSON body extractor
//! that names the offending field.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// An error as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every problem with its field, when there are several (e.g. package options).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub errors: Vec<FieldError>,
}

/// One field's problem in `ApiError::errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            field: None,
            errors: Vec::new(),
        }
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", message).field(field)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn unavailable(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

impl From<cairn_raft::node::NodeError> for ApiError {
    fn from(e: cairn_raft::node::NodeError) -> Self {
        use cairn_raft::node::NodeError::*;
        match &e {
            NoLeader(_) => ApiError::unavailable("no_leader", e.to_string()),
            Timeout(_) => ApiError::unavailable("timeout", e.to_string()),
            Membership(_) => {
                ApiError::new(StatusCode::CONFLICT, "membership_failed", e.to_string())
            }
            Fatal(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "raft_stopped",
                e.to_string(),
            ),
        }
    }
}

/// Checks `Authorization: Bearer <token>` in constant time; masters and agents share it.
pub fn check_bearer(headers: &axum::http::HeaderMap, token: &str) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if given.is_empty() || !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong token: send 'Authorization: Bearer <token>' (see --token / CAIRN_TOKEN)",
        ));
    }
    Ok(())
}

/// A JSON request body, decoded with the failing field's path in the error.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| match e {
                BytesRejection::FailedToBufferBody(_) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "request body is larger than the limit (--max-body-bytes) or was cut off",
                ),
                other => ApiError::new(StatusCode::BAD_REQUEST, "bad_body", other.to_string()),
            })?;
        decode_json(&bytes).map(JsonBody)
    }
}

/// Decodes JSON, reporting the path of the field that failed.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let code = if inner.is_syntax() || inner.is_eof() {
            "malformed_json"
        } else {
            "invalid_field"
        };
        let msg = inner.to_string();
        let mut err = ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("request body: {msg}"),
        );
        // A missing field is reported at its parent's path; name the field itself.
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_string());
        let field = match (path.as_str(), missing) {
            (".", Some(m)) => Some(m),
            (p, Some(m)) => Some(format!("{p}.{m}")),
            (".", None) => None,
            (p, None) => Some(p.to_string()),
        };
        if let Some(f) = field {
            err = err.field(f);
        }
        err
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        value: String,
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    fn check(input: &str) -> String {
        match decode_json::<Body>(input.as_bytes()) {
            Ok(_) => "ok".into(),
            Err(e) => format!("{} {} {:?}", e.code, e.field.unwrap_or_default(), e.message),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(check(r#"{"value":"x"}"#), "ok");
        assert_eq!(
            check(r#"{"value":1}"#),
            r#"invalid_field value "request body: invalid type: integer `1`, expected a string at line 1 column 10""#
        );
        assert_eq!(
            check(r#"{"value":"x","inner":{"n":-1}}"#),
            r#"invalid_field inner.n "request body: invalid value: integer `-1`, expected u32 at line 1 column 28""#
        );
        assert!(check(r#"{"value":"#).starts_with("malformed_json"));
        assert!(check(r#"{"value":"x","bogus":1}"#).starts_with("invalid_field bogus"));
        assert!(check(r#"{}"#).starts_with("invalid_field value "));
        assert!(check(r#"{"value":"x","inner":{}}"#).starts_with("invalid_field inner.n "));
    }
}
