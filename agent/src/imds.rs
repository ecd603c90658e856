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

/// The `instance_id` events carry: fixed (`agent.instance_id`, `dev`, a
/// host that is no EC2 instance), or `unknown` until instance metadata
/// has told it.
#[derive(Debug, Clone)]
pub struct InstanceId(std::sync::Arc<std::sync::RwLock<(String, Option<Identity>)>>);

impl InstanceId {
    pub fn fixed(id: impl Into<String>) -> InstanceId {
        InstanceId(std::sync::Arc::new(std::sync::RwLock::new((
            id.into(),
            None,
        ))))
    }

    pub fn get(&self) -> String {
        self.0.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// The whole identity, once instance metadata has told it.
    pub fn identity(&self) -> Option<Identity> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn learn(&self, id: String, identity: Identity) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = (id, Some(identity));
    }
}

/// The longest pause between two reads of an identity not known yet.
const IDENTITY_RETRY_MAX: Duration = Duration::from_secs(30);

/// What events say of an instance whose id is not known yet.
pub const UNKNOWN_INSTANCE: &str = "unknown";

/// Reads the identity within `budget`; failing that, the id is
/// `unknown` and is read again in the background (backing off to a
/// minute) until known.
pub async fn discover(imds: std::sync::Arc<Imds>, budget: Duration) -> InstanceId {
    let id = InstanceId::fixed(UNKNOWN_INSTANCE);
    let learn = |identity: &Identity, id: &InstanceId| -> bool {
        match &identity.instance_id {
            Some(known) => {
                tracing::info!(
                    instance_id = %known,
                    instance_type = identity.instance_type.as_deref().unwrap_or("?"),
                    availability_zone = identity.availability_zone.as_deref().unwrap_or("?"),
                    life_cycle = identity.life_cycle.as_deref().unwrap_or("?"),
                    autoscaling_group = identity.autoscaling_group.as_deref().unwrap_or("-"),
                    "instance identity"
                );
                id.learn(known.clone(), identity.clone());
                true
            }
            None => false,
        }
    };
    match tokio::time::timeout(budget, Identity::read(&imds)).await {
        Ok(Ok(identity)) if learn(&identity, &id) => return id,
        Ok(Ok(_)) => tracing::warn!("instance metadata has no instance-id; events say {UNKNOWN_INSTANCE:?} until it has"),
        Ok(Err(e)) => tracing::warn!("cannot read the instance identity yet ({e}); events say {UNKNOWN_INSTANCE:?} until it is known"),
        Err(_) => tracing::warn!("no instance identity within {}s; events say {UNKNOWN_INSTANCE:?} until it is known", budget.as_secs()),
    }
    let later = id.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            if let Ok(identity) = Identity::read(&imds).await {
                if learn(&identity, &later) {
                    return;
                }
            }
            wait = (wait * 2).min(IDENTITY_RETRY_MAX);
        }
    });
    id
}

/// Who this instance is, read once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

// ------------------------------------------------------------- watcher --

/// How often the notices are read (a spot notice gives two minutes).
pub const POLL: Duration = Duration::from_secs(2);
/// At most one warning per this long about a failing metadata service.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the watcher has seen, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    /// The last notice that changed something, and when it was read.
    pub last_notice: Option<String>,
    pub last_notice_at: Option<String>,
    /// Polls and failed reads so far; the last failure.
    pub polls: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Turns notices into the drain's modes: a spot interruption drains by its
/// time less `margin`; `target-lifecycle-state` `Terminated` drains within
/// `lifecycle_timeout`; a rebalance recommendation pauses intake and lifts
/// the pause after `rebalance_resume` unless a drain came. A notice seen
/// again is not a new trigger, and a failing read never starts a drain.
#[derive(Debug)]
pub struct Notices {
    drain: crate::drain::Drain,
    margin: Duration,
    rebalance_resume: Duration,
    lifecycle_timeout: Duration,
    last_spot: Option<String>,
    last_rebalance: Option<String>,
    terminated: bool,
    /// Whether the group is taking the instance out of service
    /// (`Terminated` seen): the termination hook must then be completed,
    /// whatever else started the drain.
    terminating: tokio::sync::watch::Sender<bool>,
    resume_at: Option<std::time::Instant>,
    last_error_log: Option<std::time::Instant>,
    errors_since_log: u64,
    pub seen: Seen,
}

/// The reason of a rebalance pause (and so the only pause lifted by time).
pub const REBALANCE_REASON: &str = "rebalance recommendation";

/// One poll's three answers.
pub struct Poll {
    pub spot: Result<Option<String>, ImdsFailure>,
    pub rebalance: Result<Option<String>, ImdsFailure>,
    pub lifecycle: Result<Option<String>, ImdsFailure>,
}

impl Notices {
    pub fn new(
        drain: crate::drain::Drain,
        margin: Duration,
        rebalance_resume: Duration,
        lifecycle_timeout: Duration,
    ) -> Notices {
        Notices {
            drain,
            margin,
            rebalance_resume,
            lifecycle_timeout,
            last_spot: None,
            last_rebalance: None,
            terminated: false,
            terminating: tokio::sync::watch::Sender::new(false),
            resume_at: None,
            last_error_log: None,
            errors_since_log: 0,
            seen: Seen::default(),
        }
    }

    /// Turns true once `target-lifecycle-state` has said `Terminated`.
    pub fn terminating(&self) -> tokio::sync::watch::Receiver<bool> {
        self.terminating.subscribe()
    }

    /// Acts on one poll's answers read at `now` (`wall` on the host clock).
    pub fn observe(&mut self, poll: Poll, now: std::time::Instant, wall: SystemTime) {
        self.seen.polls += 1;
        let mut failures = Vec::new();
        match poll.spot {
            Ok(Some(text)) if self.last_spot.as_deref() != Some(text.as_str()) => {
                match parse_spot_action(&text) {
                    Ok(notice) => {
                        let at = notice.time.checked_sub(self.margin).unwrap_or(notice.time);
                        let left = at.duration_since(wall).unwrap_or(Duration::ZERO);
                        let why = format!(
                            "spot interruption: {} at {}",
                            notice.action,
                            crate::events::rfc3339(notice.time)
                        );
                        tracing::warn!("{why}; draining within {}s", left.as_secs());
                        self.drain.request(&why, now + left);
                        self.noticed(why, wall);
                    }
                    Err(e) => failures.push(e),
                }
                self.last_spot = Some(text);
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: {e}", SPOT_ACTION)),
        }
        match poll.lifecycle {
            Ok(Some(state)) if state.trim() == "Terminated" && !self.terminated => {
                self.terminated = true;
                self.terminating.send_replace(true);
                let why = "auto scaling lifecycle: Terminated".to_string();
                tracing::warn!("{why}; draining");
                self.drain.request(&why, now + self.lifecycle_timeout);
                self.noticed(why, wall);
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: {e}", LIFECYCLE_STATE)),
        }
        match poll.rebalance {
            Ok(Some(text)) if self.last_rebalance.as_deref() != Some(text.as_str()) => {
                match parse_rebalance(&text) {
                    Ok(_) => {
                        if self.drain.current().is_none() {
                            tracing::warn!(
                                "{REBALANCE_REASON}: taking no new jobs for {}s unless an interruption follows",
                                self.rebalance_resume.as_secs()
                            );
                            self.drain.stop_intake(REBALANCE_REASON);
                            self.resume_at = Some(now + self.rebalance_resume);
                            self.noticed(format!("{REBALANCE_REASON} ({})", text.trim()), wall);
                        }
                    }
                    Err(e) => failures.push(e),
                }
                self.last_rebalance = Some(text);
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{}: {e}", REBALANCE)),
        }
        if self.resume_at.is_some_and(|at| now >= at) {
            self.resume_at = None;
            if self.drain.resume_intake_paused_for(REBALANCE_REASON) {
                tracing::info!(
                    "no interruption followed the rebalance recommendation: taking jobs again"
                );
            }
        }
        if !failures.is_empty() {
            self.failed(failures, now);
        }
    }

    fn noticed(&mut self, what: String, wall: SystemTime) {
        self.seen.last_notice = Some(what);
        self.seen.last_notice_at = Some(crate::events::rfc3339(wall));
    }

    fn failed(&mut self, failures: Vec<String>, now: std::time::Instant) {
        self.seen.errors += failures.len() as u64;
        self.errors_since_log += failures.len() as u64;
        let text = failures.join("; ");
        let due = self
            .last_error_log
            .is_none_or(|at| now.duration_since(at) >= ERROR_LOG_EVERY);
        if due {
            tracing::warn!(
                failed_reads = self.errors_since_log,
                "instance metadata: {text} (jobs go on; notices are read again every {}s)",
                POLL.as_secs()
            );
            self.last_error_log = Some(now);
            self.errors_since_log = 0;
        }
        self.seen.last_error = Some(text);
    }
}

/// Reads the notices every `poll` for ever, acting on them through
/// `notices`; `seen` is updated after every poll.
pub async fn watch(
    imds: std::sync::Arc<Imds>,
    mut notices: Notices,
    poll: Duration,
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A poll is three concurrent reads, each bounded by OPERATION_TIMEOUT.
    let beat = crate::liveness::global().register(
        "instance metadata watcher",
        poll + OPERATION_TIMEOUT * 4 + Duration::from_secs(10),
    );
    loop {
        tick.tick().await;
        beat.beat();
        let (spot, rebalance, lifecycle) = tokio::join!(
            imds.get(SPOT_ACTION),
            imds.get(REBALANCE),
            imds.get(LIFECYCLE_STATE)
        );
        notices.observe(
            Poll {
                spot,
                rebalance,
                lifecycle,
            },
            std::time::Instant::now(),
            SystemTime::now(),
        );
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = notices.seen.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::{Drain, DrainMode};
    use std::time::Instant;

    fn notices(drain: &Drain) -> Notices {
        Notices::new(
            drain.clone(),
            Duration::from_secs(15),
            Duration::from_secs(600),
            Duration::from_secs(90),
        )
    }

    fn poll(spot: Option<&str>, rebalance: Option<&str>, lifecycle: Option<&str>) -> Poll {
        Poll {
            spot: Ok(spot.map(String::from)),
            rebalance: Ok(rebalance.map(String::from)),
            lifecycle: Ok(lifecycle.map(String::from)),
        }
    }

    const T0: u64 = 1_796_205_600; // 2026-12-02T10:00:00Z

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_spot_notice_drains_by_its_time_less_the_margin_once() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        let notice = r#"{"action": "terminate", "time": "2026-12-02T10:00:00Z"}"#;
        n.observe(
            poll(Some(notice), None, Some("InService")),
            now,
            wall(T0 - 120),
        );
        let req = drain.draining().expect("a drain");
        assert_eq!(req.deadline, now + Duration::from_secs(105));
        assert!(
            req.reason.contains("spot interruption: terminate"),
            "{}",
            req.reason
        );
        // The same notice again, later: not a new trigger (the deadline is
        // not recomputed from the later clock).
        n.observe(
            poll(Some(notice), None, None),
            now + Duration::from_secs(2),
            wall(T0 - 118),
        );
        assert_eq!(drain.deadline(), Some(now + Duration::from_secs(105)));
    }

    #[test]
    fn a_notice_already_past_its_margin_drains_at_once() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        n.observe(
            poll(
                Some(r#"{"action": "stop", "time": "2026-12-02T10:00:00Z"}"#),
                None,
                None,
            ),
            now,
            wall(T0 - 5),
        );
        assert_eq!(drain.deadline(), Some(now));
    }

    #[test]
    fn a_rebalance_pauses_intake_and_lifts_the_pause_after_the_quiet_period() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        let rebalance = r#"{"noticeTime": "2026-12-02T09:58:00Z"}"#;
        n.observe(poll(None, Some(rebalance), None), now, wall(T0));
        assert_eq!(drain.current().map(|r| r.mode), Some(DrainMode::StopIntake));
        n.observe(
            poll(None, Some(rebalance), None),
            now + Duration::from_secs(599),
            wall(T0),
        );
        assert!(drain.current().is_some(), "still paused");
        n.observe(
            poll(None, Some(rebalance), None),
            now + Duration::from_secs(600),
            wall(T0),
        );
        assert_eq!(
            drain.current(),
            None,
            "resumed, and the same recommendation does not pause again"
        );
        n.observe(
            poll(None, Some(rebalance), None),
            now + Duration::from_secs(602),
            wall(T0),
        );
        assert_eq!(drain.current(), None);
    }

    #[test]
    fn a_notice_during_the_rebalance_pause_drains_and_the_pause_never_lifts_it() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        let rebalance = r#"{"noticeTime": "2026-12-02T09:58:00Z"}"#;
        n.observe(poll(None, Some(rebalance), None), now, wall(T0 - 300));
        n.observe(
            poll(
                Some(r#"{"action": "terminate", "time": "2026-12-02T10:00:00Z"}"#),
                Some(rebalance),
                None,
            ),
            now + Duration::from_secs(2),
            wall(T0 - 120),
        );
        assert!(drain.draining().is_some());
        n.observe(
            poll(None, Some(rebalance), None),
            now + Duration::from_secs(700),
            wall(T0),
        );
        assert!(drain.draining().is_some(), "a drain is never undone");
    }

    #[test]
    fn another_pause_is_not_lifted_by_the_rebalance_timer() {
        let drain = Drain::new();
        drain.stop_intake("operator");
        let mut n = notices(&drain);
        let now = Instant::now();
        n.observe(
            poll(
                None,
                Some(r#"{"noticeTime": "2026-12-02T09:58:00Z"}"#),
                None,
            ),
            now,
            wall(T0),
        );
        n.observe(
            poll(None, None, None),
            now + Duration::from_secs(601),
            wall(T0),
        );
        assert_eq!(
            drain.current().map(|r| r.reason),
            Some("operator".to_string())
        );
    }

    #[test]
    fn lifecycle_terminated_drains_within_the_drain_timeout() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        n.observe(poll(None, None, Some("InService")), now, wall(T0));
        assert_eq!(drain.current(), None);
        n.observe(poll(None, None, Some("Terminated")), now, wall(T0));
        assert_eq!(drain.deadline(), Some(now + Duration::from_secs(90)));
    }

    #[test]
    fn failing_reads_start_nothing_and_are_counted() {
        let drain = Drain::new();
        let mut n = notices(&drain);
        let now = Instant::now();
        for i in 0..3 {
            n.observe(
                Poll {
                    spot: Err(ImdsFailure::Status(500)),
                    rebalance: Err(ImdsFailure::Unreachable("reset".into())),
                    lifecycle: Err(ImdsFailure::Token("timed out".into())),
                },
                now + Duration::from_secs(2 * i),
                wall(T0),
            );
        }
        assert_eq!(drain.current(), None);
        assert_eq!((n.seen.polls, n.seen.errors), (3, 9));
        assert!(n
            .seen
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500")));
        // A notice after the trouble still drains.
        n.observe(
            poll(None, None, Some("Terminated")),
            now + Duration::from_secs(8),
            wall(T0),
        );
        assert!(drain.draining().is_some());
    }

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
