//! Why an HTTP request is refused. [`ApiError::status`] is the one place errors become status
//! codes; the body is always `{"error": "...", "path": "..."?}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A refused or failed HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No bearer token (401: send one).
    #[error("a bearer token is required (a service-account token; see docs/install.md, API access)")]
    NoToken,
    /// The token is not valid (401).
    #[error("the bearer token is not valid")]
    BadToken,
    /// The caller may not do this (403: grant it a ClusterRole).
    #[error(
        "{user} may not {verb} {path} (a ClusterRole with nonResourceURLs grants it; see docs/install.md, API access)"
    )]
    Forbidden {
        /// The caller.
        user: String,
        /// `get` or `create`.
        verb: String,
        /// The URL path.
        path: String,
    },
    /// The API server could not review the caller (503: try again).
    #[error("cannot check the caller with the API server now")]
    ReviewUnavailable,
    /// No plan computed yet (503: try again).
    #[error("no plan yet: the caches are still syncing or the first batch has not been planned")]
    NoPlanYet,
    /// The caches are not synced (503).
    #[error("caches not synced yet")]
    NotReady,
    /// No such endpoint or object (404).
    #[error("{0}")]
    NotFound(String),
    /// The endpoint exists but not with this method (405).
    #[error("method {method} is not allowed on {path} (docs/controller.md lists each endpoint's methods)")]
    MethodNotAllowed {
        /// The method asked for.
        method: String,
        /// The path.
        path: String,
    },
    /// Too many what-if plans at once (429: try again later).
    #[error("{running} what-if plan(s) already running (http.maxConcurrentPlans); try again later")]
    Busy {
        /// The limit, all taken.
        running: usize,
    },
    /// The body is not UTF-8 (400).
    #[error("body is not UTF-8 JSON")]
    NotUtf8,
    /// The snapshot does not parse (400), with where.
    #[error("{message}")]
    BadSnapshot {
        /// What is wrong.
        message: String,
        /// Where in the document.
        path: String,
    },
    /// The snapshot is larger than the controller plans (413).
    #[error(
        "the snapshot has {gpus} GPUs and {pods} pods; at most {max_gpus} and {max_pods} are planned here (http.maxSnapshotGpus, http.maxSnapshotPods)"
    )]
    TooLarge {
        /// GPUs in it.
        gpus: usize,
        /// Pods in it.
        pods: usize,
        /// `http.maxSnapshotGpus`.
        max_gpus: usize,
        /// `http.maxSnapshotPods`.
        max_pods: usize,
    },
    /// The request took longer than `http.requestTimeout` (408).
    #[error("the request timed out (http.requestTimeout)")]
    TimedOut,
    /// The planner failed (500: a bug, or the what-if child was killed).
    #[error("planner failed: {0}")]
    Planner(String),
}

impl ApiError {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoToken | ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::ReviewUnavailable | ApiError::NoPlanYet | ApiError::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotUtf8 | ApiError::BadSnapshot { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            ApiError::Planner(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether this says something about the caller (cached by the reviewer) rather than about the
    /// API server's health.
    pub fn about_the_caller(&self) -> bool {
        !matches!(self, ApiError::ReviewUnavailable)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.to_string()});
        if let ApiError::BadSnapshot { path, .. } = &self {
            body["path"] = json!(path);
        }
        (self.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_status_and_a_json_body() {
        let cases = [
            (ApiError::NoToken, 401),
            (
                ApiError::Forbidden {
                    user: "u".into(),
                    verb: "get".into(),
                    path: "/p".into(),
                },
                403,
            ),
            (ApiError::ReviewUnavailable, 503),
            (ApiError::Busy { running: 2 }, 429),
            (
                ApiError::BadSnapshot {
                    message: "m".into(),
                    path: "nodes[0]".into(),
                },
                400,
            ),
            (ApiError::TimedOut, 408),
            (
                ApiError::MethodNotAllowed {
                    method: "DELETE".into(),
                    path: "/api/v1/plan".into(),
                },
                405,
            ),
            (ApiError::Planner("x".into()), 500),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
            assert_eq!(e.clone().into_response().status().as_u16(), code);
        }
        assert!(!ApiError::ReviewUnavailable.about_the_caller());
        assert!(ApiError::BadToken.about_the_caller());
    }
}
