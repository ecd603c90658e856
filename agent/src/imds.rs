//! The instance metadata service (IMDSv2 only) and what the agent reads
//! from it: the instance's identity once, and the notices that end an
//! instance's life (spot interruption, rebalance recommendation, Auto
//! Scaling lifecycle) all the time.
//!
//! The SDK's client does the protocol: a session token from
//! `PUT /latest/api/token`, cached and renewed before it expires, never a
//! request without one (no IMDSv1 fallback), the endpoint from
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`. Two things it does not do are done
//! here: a token the service refuses before its time (a 401) is dropped at
//! once, by building a fresh client, and a 404 is an answer ("no notice"),
//! not an error. Every call is bounded by short timeouts and two attempts:
//! a notice gives two minutes, so a slow answer is worth less than the next
//! poll.

use std::time::{Duration, SystemTime};

use aws_config::imds::client::error::ImdsError;
use aws_config::imds::client::Client;

/// How long a session token lives (the service's longest is 6 h).
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// One call, its retry and their backoff, at most.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(4);
const ATTEMPTS: u32 = 2;

/// Why a metadata read gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImdsFailure {
    /// The service answered with an error status (not 404).
    #[error("instance metadata answered {0}")]
    Status(u16),
    /// No session token (the PUT failed, was refused or timed out).
    #[error("no instance metadata session token: {0}")]
    Token(String),
    /// Unreachable, timed out, reset.
    #[error("instance metadata unreachable: {0}")]
    Unreachable(String),
}

/// The IMDSv2 client.
pub struct Imds {
    endpoint: Option<String>,
    client: std::sync::Mutex<Client>,
}

impl std::fmt::Debug for Imds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imds")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Imds {
    /// A client of `endpoint`, or of the SDK's default (the environment's
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else 169.254.169.254).
    pub fn new(endpoint: Option<String>) -> Result<Imds, String> {
        let client = build(endpoint.as_deref())?;
        Ok(Imds {
            endpoint,
            client: std::sync::Mutex::new(client),
        })
    }

    fn client(&self) -> Client {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The text at `path` (`/latest/meta-data/...`), `None` for a 404.
    pub async fn get(&self, path: &str) -> Result<Option<String>, ImdsFailure> {
        match self.client().get(path).await {
            Ok(text) => Ok(Some(text.as_ref().to_string())),
            Err(e) => match classify(&e) {
                Answer::NotFound => Ok(None),
                Answer::Failed(failure) => {
                    if failure == ImdsFailure::Status(401) {
                        // The service no longer takes our token: the next
                        // call starts from a fresh one.
                        if let Ok(fresh) = build(self.endpoint.as_deref()) {
                            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                        }
                    }
                    Err(failure)
                }
            },
        }
    }
}

fn build(endpoint: Option<&str>) -> Result<Client, String> {
    let mut builder = Client::builder()
        .token_ttl(TOKEN_TTL)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .max_attempts(ATTEMPTS);
    if let Some(endpoint) = endpoint {
        builder = builder
            .endpoint(endpoint)
            .map_err(|e| format!("instance metadata endpoint {endpoint:?}: {e}"))?;
    }
    Ok(builder.build())
}

enum Answer {
    NotFound,
    Failed(ImdsFailure),
}

fn classify(e: &ImdsError) -> Answer {
    match e {
        ImdsError::ErrorResponse(r) if r.response().status().as_u16() == 404 => Answer::NotFound,
        ImdsError::ErrorResponse(r) => {
            Answer::Failed(ImdsFailure::Status(r.response().status().as_u16()))
        }
        ImdsError::FailedToLoadToken(_) => Answer::Failed(ImdsFailure::Token(error_chain(e))),
        other => Answer::Failed(ImdsFailure::Unreachable(error_chain(other))),
    }
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

// ------------------------------------------------------------- notices --

pub const SPOT_ACTION: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
pub const LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";

/// A spot interruption notice: the instance is stopped, hibernated or
/// terminated at `time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotAction {
    pub action: String,
    pub time: SystemTime,
}

/// Parses `spot/instance-action`: `{"action": "terminate", "time": "2026-12-02T10:00:00Z"}`.
pub fn parse_spot_action(text: &str) -> Result<SpotAction, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        action: String,
        time: String,
    }
    let raw: Raw = serde_json::from_str(text)
        .map_err(|e| format!("spot/instance-action is not the expected JSON ({e}): {text:?}"))?;
    Ok(SpotAction {
        time: parse_time(&raw.time)
            .ok_or_else(|| format!("spot/instance-action time {:?} is not RFC 3339", raw.time))?,
        action: raw.action,
    })
}

/// Parses `events/recommendations/rebalance`: `{"noticeTime": "..."}`.
pub fn parse_rebalance(text: &str) -> Result<SystemTime, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| {
        format!("events/recommendations/rebalance is not the expected JSON ({e}): {text:?}")
    })?;
    parse_time(&raw.notice_time).ok_or_else(|| {
        format!(
            "events/recommendations/rebalance noticeTime {:?} is not RFC 3339",
            raw.notice_time
        )
    })
}

fn parse_time(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(SystemTime::from(t))
}

// ------------------------------------------------------------ identity --

/// Who this instance is, read once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub instance_id: Option<String>,
    pub region: Option<String>,
    pub availability_zone: Option<String>,
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub life_cycle: Option<String>,
    /// Only where instance metadata tags are on (the group's
    /// `aws:autoscaling:groupName` tag).
    pub autoscaling_group: Option<String>,
}

impl Identity {
    /// Reads every field; the first failure (not a 404) ends it, so a
    /// caller can retry the whole later.
    pub async fn read(imds: &Imds) -> Result<Identity, ImdsFailure> {
        let get = |path: &'static str| async move {
            imds.get(path)
                .await
                .map(|v| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        };
        Ok(Identity {
            instance_id: get("/latest/meta-data/instance-id").await?,
            region: get("/latest/meta-data/placement/region").await?,
            availability_zone: get("/latest/meta-data/placement/availability-zone").await?,
            instance_type: get("/latest/meta-data/instance-type").await?,
            life_cycle: get("/latest/meta-data/instance-life-cycle").await?,
            autoscaling_group: get("/latest/meta-data/tags/instance/aws:autoscaling:groupName")
                .await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spot_notice_gives_its_action_and_time() {
        let notice =
            parse_spot_action(r#"{"action": "terminate", "time": "2026-12-02T10:00:00Z"}"#)
                .expect("a notice");
        assert_eq!(notice.action, "terminate");
        assert_eq!(
            notice.time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_205_600)
        );
    }

    #[test]
    fn a_malformed_notice_is_an_error_quoting_it() {
        let err = parse_spot_action("<html>").expect_err("not JSON");
        assert!(err.contains("<html>"), "{err}");
        let err = parse_spot_action(r#"{"action": "stop", "time": "soon"}"#).expect_err("bad time");
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn a_rebalance_recommendation_gives_its_notice_time() {
        assert_eq!(
            parse_rebalance(r#"{"noticeTime": "2026-12-02T09:58:00Z"}"#),
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_205_480))
        );
    }

    #[test]
    fn an_endpoint_that_is_no_uri_is_refused_naming_it() {
        let err = Imds::new(Some("not a uri".into())).expect_err("bad endpoint");
        assert!(err.contains("not a uri"), "{err}");
    }
}
