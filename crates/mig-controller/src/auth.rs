//! Who may call the HTTP API: a bearer token checked with a TokenReview, and the call with a
//! SubjectAccessReview for its non-resource URL (`get`, or `create` for `POST /api/v1/plan`), the
//! way kube-rbac-proxy does. Answers are cached for [`TTL`] per token, verb and path, so a flood of
//! requests with one token costs the API server two reviews, not two per request. Probes are open.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// How long an answer is reused.
pub const TTL: Duration = Duration::from_secs(30);
/// Most cached answers (the cache is emptied when full).
const MAX_CACHED: usize = 10_000;

use crate::error::ApiError;

/// A cached answer and when it was given.
type Cached = (Instant, Result<(), ApiError>);

/// Checks callers against the API server.
pub struct Reviewer {
    client: Client,
    clock: mig_protocol::SharedClock,
    cache: Mutex<HashMap<u64, Cached>>,
}

impl Reviewer {
    /// Reviews through `client` (which needs `create` on tokenreviews and subjectaccessreviews).
    pub fn new(client: Client, clock: mig_protocol::SharedClock) -> Reviewer {
        Reviewer {
            client,
            clock,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the holder of `authorization` (the header's value) may `verb` on `path`.
    pub async fn check(&self, authorization: Option<&str>, verb: &str, path: &str) -> Result<(), ApiError> {
        let Some(token) = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Err(ApiError::NoToken);
        };
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (token, verb, path).hash(&mut h);
            h.finish()
        };
        if let Some((at, answer)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && self.clock.instant().saturating_duration_since(*at) < TTL
        {
            return answer.clone();
        }
        let answer = self.review(token, verb, path).await;
        // An API server error is not an answer about the caller: not cached.
        if answer.as_ref().err().is_none_or(ApiError::about_the_caller) {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, (self.clock.instant(), answer.clone()));
        }
        answer
    }

    async fn review(&self, token: &str, verb: &str, path: &str) -> Result<(), ApiError> {
        let unavailable = |e: kube::Error| {
            tracing::warn!(error = %e, "cannot review an API caller");
            ApiError::ReviewUnavailable
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let answered = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = answered.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Err(ApiError::BadToken);
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
            .map_err(unavailable)?;
        if answered.status.is_some_and(|s| s.allowed) {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                user: user.username.unwrap_or_default(),
                verb: verb.to_string(),
                path: path.to_string(),
            })
        }
    }
}
