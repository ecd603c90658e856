//! The one retry policy and the one error classifier every caller uses.
//!
//! `Backoff` is capped exponential backoff with jitter; it spaces job
//! retries (failed attempts) as well as retried calls. `retry` runs a call
//! until it works, its error is not transient, or the next wait would pass
//! the caller's deadline. `classify` sorts an AWS SDK error into transient
//! (retry it), permanent (never retry it) or gone (the receipt or message is
//! no longer ours: never retry it, and do not count it as our failure).
//!
//! The AWS SDK's own retries are switched off for SQS (`app` builds the
//! client so), so that every SQS call has exactly one retry loop, this one,
//! and every wait is bounded by the deadline its caller answers to.

use std::future::Future;
use std::time::Duration;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use tokio::time::Instant;

/// Exponential backoff, capped, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Upper bound of the delay after the `n`-th failure (1-based): base,
    /// 2×base, 4×base, ... capped at `max`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// A delay in [ceiling/2, ceiling]: spread out so that a fleet of
    /// failures does not come back at the same instant.
    pub fn delay(&self, n: u32, jitter01: f64) -> Duration {
        let c = self.ceiling(n);
        c / 2 + c.mul_f64(jitter01.clamp(0.0, 1.0) / 2.0)
    }
}

/// Waits between retried calls: 200 ms doubling up to 10 s. A call that
/// keeps failing is retried until its caller's deadline.
pub const CALL_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

/// What an error means for whoever made the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Throttling, a 5xx, a timeout, a connection that failed: try again.
    Transient,
    /// The request can never succeed as sent (missing queue, access denied,
    /// invalid parameter): never retried.
    Permanent,
    /// The receipt handle is not accepted any more, or the message is no
    /// longer in flight with it: the message is not ours now (another
    /// worker may have it). Never retried.
    Gone,
}

/// Service error codes that mean "not ours any more". SQS reports them
/// per entry in batch answers too.
const GONE_CODES: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
    "InvalidReceiptHandle",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
];

/// Service error codes worth another try although they are client errors
/// (4xx): throttling, and credentials the SDK refreshes by itself.
const TRANSIENT_CODES: &[&str] = &[
    "RequestThrottled",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
    "KmsThrottled",
    "KMS.ThrottlingException",
    "AWS.SimpleQueueService.KmsThrottled",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "RequestTimeout",
    "RequestTimeoutException",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "OverLimit",
];

/// Classifies a service error by its code (the SQS JSON protocol may
/// prefix a namespace, `com.amazonaws.sqs#QueueDoesNotExist`) and, when
/// the code is not a known one, by its HTTP status.
pub fn classify_code(code: &str, status: Option<u16>) -> ErrorClass {
    let code = code.rsplit('#').next().unwrap_or(code);
    if GONE_CODES.contains(&code) {
        return ErrorClass::Gone;
    }
    if TRANSIENT_CODES.contains(&code) || code.contains("Throttl") {
        return ErrorClass::Transient;
    }
    match status {
        Some(s) if s >= 500 || s == 429 => ErrorClass::Transient,
        // A known 4xx code, or a code without a status (a batch entry,
        // whose `SenderFault` says the request is at fault): permanent.
        _ => ErrorClass::Permanent,
    }
}

/// Classifies an AWS SDK error.
pub fn classify<E, R>(e: &SdkError<E, R>) -> ErrorClass
where
    E: ProvideErrorMetadata,
    R: HttpStatus,
{
    match e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status_code();
            match s.err().code() {
                Some(code) => classify_code(code, Some(status)),
                None if status >= 500 || status == 429 => ErrorClass::Transient,
                None => ErrorClass::Permanent,
            }
        }
        // The request could not be built: sending it again cannot help.
        SdkError::ConstructionFailure(_) => ErrorClass::Permanent,
        // Timeouts, connections refused or reset, an answer that could not
        // be read: the service may well answer the next time.
        _ => ErrorClass::Transient,
    }
}

/// The HTTP status of a raw response, for `classify`.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Why `retry` gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The last error was not transient.
    Final(ErrorClass, E),
    /// The deadline came before a call worked; the last error, if any call
    /// was made.
    Deadline(Option<E>),
}

impl<E> GaveUp<E> {
    /// The class of the reason: a deadline counts as transient (the call
    /// may work later, just not in time).
    pub fn class(&self) -> ErrorClass {
        match self {
            GaveUp::Final(class, _) => *class,
            GaveUp::Deadline(_) => ErrorClass::Transient,
        }
    }
}

/// Runs `call` until it works, fails with an error that `class_of` does
/// not call transient, or the deadline comes (a call in flight at the
/// deadline is abandoned; a wait that would end past it is not started).
/// `what` names the call in the warning logged for each retry.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    deadline: Instant,
    class_of: impl Fn(&E) -> ErrorClass,
    mut call: F,
) -> Result<T, GaveUp<E>>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    let mut last = None;
    loop {
        let outcome = match tokio::time::timeout_at(deadline, call()).await {
            Ok(outcome) => outcome,
            Err(_) => return Err(GaveUp::Deadline(last)),
        };
        let e = match outcome {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let class = class_of(&e);
        if class != ErrorClass::Transient {
            return Err(GaveUp::Final(class, e));
        }
        failures += 1;
        let wait = CALL_BACKOFF.delay(failures, rand::random());
        if Instant::now() + wait >= deadline {
            return Err(GaveUp::Deadline(Some(e)));
        }
        tracing::warn!(call = what, error = %e, retry_in_ms = wait.as_millis() as u64, "call failed; retrying");
        last = Some(e);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_stays_within_the_upper_half() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let ceilings: Vec<u64> = (1..=5).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 5, 5]);
        assert_eq!(b.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(b.delay(u32::MAX, 0.5), Duration::from_millis(3750));
    }

    #[test]
    fn receipts_not_accepted_any_more_mean_the_message_is_gone() {
        for code in [
            "ReceiptHandleIsInvalid",
            "com.amazonaws.sqs#ReceiptHandleIsInvalid",
            "AWS.SimpleQueueService.MessageNotInflight",
        ] {
            assert_eq!(classify_code(code, Some(400)), ErrorClass::Gone, "{code}");
        }
    }

    #[test]
    fn throttling_and_server_errors_are_transient_and_client_errors_permanent() {
        let cases = [
            ("RequestThrottled", Some(403), ErrorClass::Transient),
            (
                "com.amazonaws.sqs#ThrottlingException",
                Some(400),
                ErrorClass::Transient,
            ),
            ("KmsThrottled", Some(400), ErrorClass::Transient),
            ("InternalError", Some(500), ErrorClass::Transient),
            ("SomethingNew", Some(503), ErrorClass::Transient),
            ("SomethingNew", Some(429), ErrorClass::Transient),
            ("ExpiredToken", Some(403), ErrorClass::Transient),
            (
                "AWS.SimpleQueueService.NonExistentQueue",
                Some(400),
                ErrorClass::Permanent,
            ),
            (
                "com.amazonaws.sqs#QueueDoesNotExist",
                Some(400),
                ErrorClass::Permanent,
            ),
            ("AccessDenied", Some(403), ErrorClass::Permanent),
            ("InvalidParameterValue", Some(400), ErrorClass::Permanent),
            ("SomethingNew", Some(400), ErrorClass::Permanent),
            ("InvalidParameterValue", None, ErrorClass::Permanent),
        ];
        for (code, status, want) in cases {
            assert_eq!(classify_code(code, status), want, "{code} {status:?}");
        }
    }

    #[derive(Debug)]
    struct Failure(ErrorClass);

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_error_is_retried_until_the_call_works() {
        let calls = AtomicU32::new(0);
        let got = retry(
            "test",
            Instant::now() + Duration::from_secs(60),
            |e: &Failure| e.0,
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 3 {
                        Err(Failure(ErrorClass::Transient))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got.ok(), Some(3));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_and_gone_errors_are_never_retried() {
        for class in [ErrorClass::Permanent, ErrorClass::Gone] {
            let calls = AtomicU32::new(0);
            let got: Result<(), _> = retry(
                "test",
                Instant::now() + Duration::from_secs(60),
                |e: &Failure| e.0,
                || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move { Err(Failure(class)) }
                },
            )
            .await;
            assert!(matches!(got, Err(GaveUp::Final(c, _)) if c == class));
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{class:?} tried once");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_deadline_even_while_a_call_hangs() {
        let began = Instant::now();
        let deadline = began + Duration::from_secs(5);
        let calls = AtomicU32::new(0);
        let got: Result<(), GaveUp<Failure>> = retry(
            "test",
            deadline,
            |e: &Failure| e.0,
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(Failure(ErrorClass::Transient))
                    } else {
                        std::future::pending().await
                    }
                }
            },
        )
        .await;
        assert!(matches!(got, Err(GaveUp::Deadline(Some(_)))), "{got:?}");
        assert!(Instant::now() <= deadline + Duration::from_millis(1));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
