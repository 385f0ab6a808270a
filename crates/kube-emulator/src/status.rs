//! API errors as the real server sends them: a `Status` object with code, reason and message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::resources::Resource;

/// An error response.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, `Gone`, `TooManyRequests`, ...
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

fn what(r: &Resource) -> String {
    if r.group.is_empty() {
        r.plural.to_string()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

impl ApiError {
    /// 404.
    pub fn not_found(r: &Resource, name: &str) -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("{} \"{name}\" not found", what(r)),
        }
    }
    /// 404 for a path that names no resource.
    pub fn no_such_path(path: &str) -> Self {
        ApiError {
            code: 404,
            reason: "NotFound",
            message: format!("the server could not find the requested resource ({path})"),
        }
    }
    /// 409 on create.
    pub fn already_exists(r: &Resource, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{} \"{name}\" already exists", what(r)),
        }
    }
    /// 409 on a stale resourceVersion.
    pub fn conflict(r: &Resource, name: &str) -> Self {
        ApiError {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                what(r)
            ),
        }
    }
    /// 422.
    pub fn invalid(r: &Resource, name: &str, detail: &str) -> Self {
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {detail}", r.kind),
        }
    }
    /// 403, as a denying admission policy answers.
    pub fn forbidden(message: &str) -> Self {
        ApiError {
            code: 403,
            reason: "Forbidden",
            message: message.to_string(),
        }
    }
    /// 400.
    pub fn bad_request(message: &str) -> Self {
        ApiError {
            code: 400,
            reason: "BadRequest",
            message: message.to_string(),
        }
    }
    /// 410 for a watch from a resourceVersion older than the retention window.
    pub fn gone(rv: u64, oldest: u64) -> Self {
        ApiError {
            code: 410,
            reason: "Expired",
            message: format!("too old resource version: {rv} ({oldest})"),
        }
    }
    /// 429 when an eviction would break a PodDisruptionBudget (message as the real server's).
    pub fn disruption_budget() -> Self {
        ApiError {
            code: 429,
            reason: "TooManyRequests",
            message: "Cannot evict pod as it would violate the pod's disruption budget.".to_string(),
        }
    }
    /// 405.
    pub fn method_not_allowed() -> Self {
        ApiError {
            code: 405,
            reason: "MethodNotAllowed",
            message: "the server does not allow this method on the requested resource".into(),
        }
    }
    /// 415.
    pub fn unsupported_media(ct: &str) -> Self {
        ApiError {
            code: 415,
            reason: "UnsupportedMediaType",
            message: format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})"
            ),
        }
    }
    /// 500 (also used by fault injection).
    pub fn internal(message: &str) -> Self {
        ApiError {
            code: 500,
            reason: "InternalError",
            message: message.to_string(),
        }
    }

    /// The Status object.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.body())).into_response()
    }
}
