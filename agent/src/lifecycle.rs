//! Auto Scaling lifecycle hooks, from the instance's side.
//!
//! - **Launch** (`drain.launch_hook`): the group holds a new instance in
//!   `Pending:Wait` until the hook is completed; the agent completes it
//!   with `CONTINUE` once it is ready to take jobs, so the group counts
//!   the instance as capacity only when it is.
//! - **Termination** (`drain.lifecycle_hook`): a scale-in or an instance
//!   refresh holds the instance in `Terminating:Wait`; instance metadata's
//!   `target-lifecycle-state` says `Terminated` and the agent drains.
//!   While it drains it records heartbeats so the hook does not time out
//!   (a third of the hook's heartbeat timeout, read from the group), and
//!   when the drain is over, also if it failed, it completes the hook with
//!   `CONTINUE`: a completion lost would leave the instance waiting out the
//!   hook's whole timeout.
//!
//! Both address the action by instance id, not by token: the token travels
//! in the group's notification, which the agent never sees. The group's
//! name comes from instance metadata (the `aws:autoscaling:groupName` tag,
//! where instance metadata tags are on) or else from
//! `DescribeAutoScalingInstances`.
//!
//! Every call goes through the agent's one retry policy
//! (`crate::retry`); the SDK's own retries are off for this client.

use std::time::Duration;

use aws_sdk_autoscaling::Client;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;

use crate::imds::InstanceId;
use crate::retry::{ErrorClass, GaveUp};

/// How long the launch completion keeps trying (the hook's own timeout,
/// an hour by default, is the real limit; past this something is wrong
/// that retrying will not mend).
const LAUNCH_BUDGET: Duration = Duration::from_secs(600);
/// How long the termination completion keeps trying after the drain.
pub const COMPLETE_BUDGET: Duration = Duration::from_secs(30);
/// Heartbeats per heartbeat timeout: a lost or slow one leaves two more.
const BEATS_PER_TIMEOUT: u32 = 3;
/// Between two heartbeats when the hook's timeout cannot be read. Auto
/// Scaling's shortest heartbeat timeout is 30 s.
const DEFAULT_BEAT_EVERY: Duration = Duration::from_secs(10);
/// Bounds of the heartbeat interval derived from the hook.
const MIN_BEAT_EVERY: Duration = Duration::from_secs(1);
const MAX_BEAT_EVERY: Duration = Duration::from_secs(300);
/// One heartbeat's own budget (retried within it).
const BEAT_BUDGET: Duration = Duration::from_secs(10);

/// One failed Auto Scaling call, in one line, with how to treat it.
#[derive(Debug, Clone)]
pub struct HookError {
    pub class: ErrorClass,
    pub text: String,
    /// The service found no lifecycle action waiting for this instance:
    /// the hook was completed already, timed out, or was never entered.
    pub no_action: bool,
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl HookError {
    fn from_sdk<E, R>(e: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> HookError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug + crate::retry::HttpStatus,
    {
        let failed = crate::aws_errors::CallFailure::of(e);
        // Auto Scaling's only word for it: a ValidationError whose message
        // says "No active Lifecycle Action found".
        let no_action = failed.text.contains("No active Lifecycle Action");
        HookError {
            class: failed.class,
            text: failed.text,
            no_action,
        }
    }

    fn plain(class: ErrorClass, text: String) -> HookError {
        HookError {
            class,
            text,
            no_action: false,
        }
    }
}

/// The hooks the config names, and what is needed to address them.
#[derive(Debug)]
pub struct Hooks {
    client: Client,
    instance: InstanceId,
    launch: Option<String>,
    termination: Option<String>,
    group: OnceCell<String>,
}

impl Hooks {
    /// `None` when the config names neither hook.
    pub fn new(
        client: Client,
        instance: InstanceId,
        launch: Option<String>,
        termination: Option<String>,
    ) -> Option<Hooks> {
        (launch.is_some() || termination.is_some()).then(|| Hooks {
            client,
            instance,
            launch,
            termination,
            group: OnceCell::new(),
        })
    }

    fn instance_id(&self) -> Result<String, HookError> {
        let id = self.instance.get();
        if id == crate::imds::UNKNOWN_INSTANCE {
            return Err(HookError::plain(
                ErrorClass::Transient,
                "the instance id is not known yet (instance metadata unreachable)".into(),
            ));
        }
        Ok(id)
    }

    /// The instance's Auto Scaling group: from instance metadata's tags,
    /// else asked of Auto Scaling (once found, kept).
    async fn group(&self) -> Result<String, HookError> {
        self.group
            .get_or_try_init(|| async {
                if let Some(group) = self.instance.identity().and_then(|i| i.autoscaling_group) {
                    return Ok(group);
                }
                let id = self.instance_id()?;
                let out = self
                    .client
                    .describe_auto_scaling_instances()
                    .instance_ids(&id)
                    .send()
                    .await
                    .map_err(|e| HookError::from_sdk(&e))?;
                out.auto_scaling_instances()
                    .iter()
                    .find(|i| i.instance_id() == Some(id.as_str()))
                    .and_then(|i| i.auto_scaling_group_name())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        HookError::plain(
                            ErrorClass::Permanent,
                            format!("instance {id} is in no Auto Scaling group"),
                        )
                    })
            })
            .await
            .cloned()
    }

    /// Completes `hook` for this instance with `CONTINUE`, retrying until
    /// `deadline`. An action that is not waiting (any more) is done.
    async fn complete(&self, hook: &str, deadline: Instant) -> Result<(), GaveUp<HookError>> {
        crate::retry::retry(
            "CompleteLifecycleAction",
            deadline,
            |e: &HookError| e.class,
            || async {
                let group = self.group().await?;
                let id = self.instance_id()?;
                self.client
                    .complete_lifecycle_action()
                    .auto_scaling_group_name(&group)
                    .lifecycle_hook_name(hook)
                    .instance_id(&id)
                    .lifecycle_action_result("CONTINUE")
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| HookError::from_sdk(&e))
            },
        )
        .await
    }

    /// Completes the launch hook, if one is configured; to be called once
    /// the agent is ready to take jobs. Logs the outcome.
    pub async fn complete_launch(&self) {
        let Some(hook) = &self.launch else { return };
        match self.complete(hook, Instant::now() + LAUNCH_BUDGET).await {
            Ok(()) => tracing::info!(hook = %hook, "launch lifecycle hook completed: CONTINUE"),
            Err(GaveUp::Final(_, e)) if e.no_action => tracing::info!(
                hook = %hook,
                "no launch lifecycle action waits for this instance (it is in service already)"
            ),
            Err(e) => tracing::error!(
                hook = %hook,
                "cannot complete drain.launch_hook ({}); the group keeps the instance in Pending:Wait until the hook times out",
                gave_up(&e)
            ),
        }
    }

    /// How often to heartbeat `hook`: a third of its heartbeat timeout.
    async fn beat_every(&self, hook: &str) -> Duration {
        let read = async {
            let group = self.group().await?;
            let out = self
                .client
                .describe_lifecycle_hooks()
                .auto_scaling_group_name(&group)
                .lifecycle_hook_names(hook)
                .send()
                .await
                .map_err(|e| HookError::from_sdk(&e))?;
            Ok::<_, HookError>(
                out.lifecycle_hooks()
                    .iter()
                    .find(|h| h.lifecycle_hook_name() == Some(hook))
                    .and_then(|h| h.heartbeat_timeout())
                    .filter(|s| *s > 0),
            )
        };
        match tokio::time::timeout(BEAT_BUDGET, read).await {
            Ok(Ok(Some(secs))) => heartbeat_interval(Duration::from_secs(secs as u64)),
            Ok(Ok(None)) => {
                tracing::warn!(hook = %hook, "drain.lifecycle_hook: the group has no such hook; heartbeats every {}s", DEFAULT_BEAT_EVERY.as_secs());
                DEFAULT_BEAT_EVERY
            }
            Ok(Err(e)) => {
                tracing::warn!(hook = %hook, "cannot read the hook's heartbeat timeout ({e}); heartbeats every {}s", DEFAULT_BEAT_EVERY.as_secs());
                DEFAULT_BEAT_EVERY
            }
            Err(_) => DEFAULT_BEAT_EVERY,
        }
    }

    /// Once `terminating` turns true, records a heartbeat on the
    /// termination hook at once and then regularly, until aborted (the
    /// drain's end). A failed heartbeat is logged; the next one is tried.
    pub async fn heartbeat_while_terminating(&self, mut terminating: watch::Receiver<bool>) {
        let Some(hook) = &self.termination else {
            return;
        };
        if terminating.wait_for(|t| *t).await.is_err() {
            return;
        }
        let every = self.beat_every(hook).await;
        tracing::info!(hook = %hook, every_s = every.as_secs(), "recording lifecycle heartbeats while draining");
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let beat = crate::retry::retry(
                "RecordLifecycleActionHeartbeat",
                Instant::now() + BEAT_BUDGET,
                |e: &HookError| e.class,
                || async {
                    let group = self.group().await?;
                    let id = self.instance_id()?;
                    self.client
                        .record_lifecycle_action_heartbeat()
                        .auto_scaling_group_name(&group)
                        .lifecycle_hook_name(hook)
                        .instance_id(&id)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| HookError::from_sdk(&e))
                },
            )
            .await;
            if let Err(e) = beat {
                tracing::warn!(hook = %hook, "lifecycle heartbeat failed: {}", gave_up(&e));
            }
        }
    }

    /// After the drain: completes the termination hook with `CONTINUE` if
    /// the drain was (also) for a lifecycle transition. Logs the outcome.
    pub async fn complete_termination(&self, terminating: bool) {
        let Some(hook) = &self.termination else {
            return;
        };
        if !terminating {
            return;
        }
        match self.complete(hook, Instant::now() + COMPLETE_BUDGET).await {
            Ok(()) => {
                tracing::info!(hook = %hook, "termination lifecycle hook completed: CONTINUE")
            }
            Err(GaveUp::Final(_, e)) if e.no_action => tracing::warn!(
                hook = %hook,
                "no termination lifecycle action waits for this instance any more (completed or timed out)"
            ),
            Err(e) => tracing::error!(
                hook = %hook,
                "cannot complete drain.lifecycle_hook ({}); the instance waits for the hook's timeout",
                gave_up(&e)
            ),
        }
    }
}

/// A third of the hook's heartbeat timeout, within sane bounds.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / BEATS_PER_TIMEOUT).clamp(MIN_BEAT_EVERY, MAX_BEAT_EVERY)
}

fn gave_up(e: &GaveUp<HookError>) -> String {
    match e {
        GaveUp::Final(_, e) => e.text.clone(),
        GaveUp::Deadline(Some(e)) => format!("gave up at the deadline: {e}"),
        GaveUp::Deadline(None) => "no answer in time".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_three_times_per_timeout_within_bounds() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(heartbeat_interval(Duration::from_secs(2)), MIN_BEAT_EVERY);
    }

    #[test]
    fn no_hook_configured_means_no_hooks() {
        let conf = aws_sdk_autoscaling::Config::builder()
            .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
            .region(aws_sdk_autoscaling::config::Region::new("eu-west-1"))
            .build();
        let client = Client::from_conf(conf);
        let id = InstanceId::fixed("i-0123");
        assert!(Hooks::new(client.clone(), id.clone(), None, None).is_none());
        assert!(Hooks::new(client, id, None, Some("drain".into())).is_some());
    }
}
