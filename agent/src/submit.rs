//! `batchly-agent submit`: builds job specs (from flags or a spec file),
//! signs each one as an envelope with the producer's key, and enqueues it.
//! It checks every spec with the same parser the agent uses, so a job that
//! would be rejected is refused here, with the reason, before it is sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::app::AppError;
use crate::envelope::{self, JobSpec, SigningKey};
use crate::queue::dir;

/// What to submit, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct JobRequest {
    pub spec_file: Option<PathBuf>,
    pub id: Option<String>,
    pub count: u32,
    pub timeout_s: Option<u64>,
    pub max_attempts: Option<u32>,
    pub env: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
    pub interrupt_signal: Option<String>,
    pub grace_s: Option<u64>,
    pub command: Vec<String>,
}

/// Parses `KEY=VALUE` (for `--env` and `--tag`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

fn random_id() -> String {
    format!("job-{:08x}", rand::random::<u32>())
}

/// The base spec (without its id) as a JSON object.
fn base_spec(req: &JobRequest) -> Result<(Map<String, Value>, String), AppError> {
    if let Some(path) = &req.spec_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AppError::Usage(format!("--spec {}: {e}", path.display())))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            AppError::Usage(format!("--spec {}: not valid JSON: {e}", path.display()))
        })?;
        let Value::Object(mut obj) = value else {
            return Err(AppError::Usage(format!(
                "--spec {}: a job spec must be a JSON object",
                path.display()
            )));
        };
        let id = match obj.remove("id") {
            Some(Value::String(id)) => id,
            Some(other) => {
                return Err(AppError::Usage(format!(
                    "--spec {}: id must be a string, got {other}",
                    path.display()
                )))
            }
            None => req.id.clone().unwrap_or_else(random_id),
        };
        return Ok((obj, id));
    }
    if req.command.is_empty() {
        return Err(AppError::Usage(
            "nothing to run: give the command after `--` (submit -- CMD ARGS...) or use --spec FILE".into(),
        ));
    }
    let mut obj = Map::new();
    obj.insert("command".into(), json!(req.command));
    if !req.env.is_empty() {
        let env: BTreeMap<_, _> = req.env.iter().cloned().collect();
        obj.insert("env".into(), json!(env));
    }
    if !req.tags.is_empty() {
        let tags: BTreeMap<_, _> = req.tags.iter().cloned().collect();
        obj.insert("tags".into(), json!(tags));
    }
    if let Some(t) = req.timeout_s {
        obj.insert("timeout_s".into(), json!(t));
    }
    if let Some(m) = req.max_attempts {
        obj.insert("max_attempts".into(), json!(m));
    }
    if req.interrupt_signal.is_some() || req.grace_s.is_some() {
        let mut int = Map::new();
        if let Some(s) = &req.interrupt_signal {
            int.insert("signal".into(), json!(s));
        }
        if let Some(g) = req.grace_s {
            int.insert("grace_s".into(), json!(g));
        }
        obj.insert("interrupt".into(), Value::Object(int));
    }
    Ok((obj, req.id.clone().unwrap_or_else(random_id)))
}

/// The job texts to sign: one per `--count`, ids suffixed `-0001`... when
/// more than one. Each is checked with the agent's own parser.
pub fn job_texts(req: &JobRequest) -> Result<Vec<(String, String)>, AppError> {
    let (base, id) = base_spec(req)?;
    let count = req.count.max(1);
    (1..=count)
        .map(|n| {
            let job_id = if count == 1 {
                id.clone()
            } else {
                format!("{id}-{n:04}")
            };
            let mut obj = Map::new();
            obj.insert("id".into(), json!(job_id));
            obj.extend(base.clone());
            let text = Value::Object(obj).to_string();
            JobSpec::parse(&text).map_err(|e| AppError::Usage(format!("invalid job spec: {e}")))?;
            Ok((job_id, text))
        })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Signs and enqueues every job into the `dev` directory `root`, calling
/// `queued(job id, message id)` as each one lands, so a failure part-way
/// still tells exactly which jobs were queued. Returns how many were.
pub fn submit_to_dir(
    root: &Path,
    key: &SigningKey,
    jobs: &[(String, String)],
    ttl: Duration,
    mut queued: impl FnMut(&str, &str),
) -> Result<usize, AppError> {
    let iat = unix_now();
    let exp = iat.saturating_add(ttl.as_secs() as i64);
    for (n, (job_id, text)) in jobs.iter().enumerate() {
        let body = envelope::sign(key, iat, exp, text);
        let msg_id = dir::enqueue(root, body.as_bytes()).map_err(|e| {
            AppError::Failed(format!(
                "enqueueing {job_id}: {e} ({n} of {} jobs were queued before it)",
                jobs.len()
            ))
        })?;
        queued(job_id, &msg_id);
    }
    Ok(jobs.len())
}

/// Signs and sends every job to the SQS queue `url` (10 per
/// `SendMessageBatch`), calling `queued(job id, message id)` for each one
/// SQS accepted. On a FIFO queue each message goes to `group` (default: its
/// job id, so jobs run in parallel but each job's messages in order), with
/// the job id and signing time as deduplication id.
pub async fn submit_to_sqs(
    client: &aws_sdk_sqs::Client,
    url: &str,
    key: &SigningKey,
    jobs: &[(String, String)],
    ttl: Duration,
    group: Option<&str>,
    mut queued: impl FnMut(&str, &str),
) -> Result<usize, AppError> {
    use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
    let iat = unix_now();
    let exp = iat.saturating_add(ttl.as_secs() as i64);
    let fifo = url.ends_with(".fifo");
    let mut sent = 0;
    for batch in jobs.chunks(crate::queue::batch::MAX_BATCH_ENTRIES) {
        let mut entries = Vec::with_capacity(batch.len());
        for (i, (job_id, text)) in batch.iter().enumerate() {
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(envelope::sign(key, iat, exp, text));
            if fifo {
                entry = entry
                    .message_group_id(group.unwrap_or(job_id))
                    .message_deduplication_id(format!("{job_id}-{iat}"));
            }
            entries.push(entry.build().map_err(|e| AppError::Failed(e.to_string()))?);
        }
        let out = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
                AppError::Failed(format!(
                    "sending to {url}: {} ({sent} of {} jobs were queued before)",
                    crate::aws_errors::describe(&e),
                    jobs.len()
                ))
            })?;
        for ok in out.successful() {
            if let Some((job_id, _)) = ok.id().parse::<usize>().ok().and_then(|i| batch.get(i)) {
                queued(job_id, ok.message_id());
                sent += 1;
            }
        }
        if let Some(failed) = out.failed().first() {
            return Err(AppError::Failed(format!(
                "SQS refused a message for {url}: {}: {} ({sent} of {} jobs were queued)",
                failed.code(),
                failed.message().unwrap_or(""),
                jobs.len()
            )));
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cmd: &[&str]) -> JobRequest {
        JobRequest {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            count: 1,
            ..Default::default()
        }
    }

    #[test]
    fn flags_become_a_valid_job_spec() {
        let mut r = req(&["echo", "hi"]);
        r.id = Some("hello".into());
        r.env = vec![("A".into(), "1".into())];
        r.timeout_s = Some(5);
        r.max_attempts = Some(3);
        let texts = job_texts(&r).expect("valid");
        assert_eq!(texts.len(), 1);
        let spec = JobSpec::parse(&texts[0].1).expect("parses");
        assert_eq!(spec.id, "hello");
        assert_eq!(spec.command, vec!["echo", "hi"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.timeout, Some(Duration::from_secs(5)));
        assert_eq!(spec.max_attempts, 3);
    }

    #[test]
    fn count_gives_each_job_its_own_numbered_id() {
        let mut r = req(&["true"]);
        r.id = Some("load".into());
        r.count = 3;
        let ids: Vec<_> = job_texts(&r)
            .expect("valid")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec!["load-0001", "load-0002", "load-0003"]);
    }

    #[test]
    fn an_invalid_spec_is_refused_before_anything_is_sent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("spec.json");
        std::fs::write(&path, r#"{"id": "x", "command": [], "comand": 1}"#).expect("write");
        let r = JobRequest {
            spec_file: Some(path),
            count: 1,
            ..Default::default()
        };
        let err = job_texts(&r).expect_err("invalid");
        assert!(matches!(err, AppError::Usage(_)));
        assert!(err.to_string().contains("invalid job spec"), "{err}");
    }

    #[test]
    fn no_command_and_no_spec_is_a_usage_error() {
        let err = job_texts(&req(&[])).expect_err("nothing to run");
        assert!(err.to_string().contains("nothing to run"), "{err}");
    }

    #[test]
    fn env_pairs_need_an_equals_sign() {
        assert_eq!(parse_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_pair("novalue").is_err());
        assert!(parse_pair("=x").is_err());
    }
}
