//! One line per AWS SDK error, for operators: the service's error code and
//! message (`QueueDoesNotExist: The specified queue does not exist.`), or
//! what kept the request from being answered (`connection refused`,
//! `timed out`). Never the SDK's debug dump, which runs to pages and can
//! carry request details.

use std::error::Error;

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// One failed AWS call: how to treat it, the service's code if it gave
/// one, and its one-line description.
#[derive(Debug, Clone)]
pub struct CallFailure {
    pub class: crate::retry::ErrorClass,
    pub code: Option<String>,
    pub text: String,
    /// No answer within the call's timeout (the connection is dropped).
    pub timed_out: bool,
}

impl CallFailure {
    pub fn of<E, R>(e: &SdkError<E, R>) -> CallFailure
    where
        E: Error + ProvideErrorMetadata + 'static,
        R: std::fmt::Debug + crate::retry::HttpStatus,
    {
        CallFailure {
            class: crate::retry::classify(e),
            code: e.code().map(str::to_string),
            text: describe(e),
            timed_out: matches!(e, SdkError::TimeoutError(_)),
        }
    }
}

/// Describes an SDK error in one line.
pub fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: Error + ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    match e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            match (err.code(), err.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_string(),
                _ => chain(err),
            }
        }
        SdkError::TimeoutError(_) => "timed out waiting for an answer".to_string(),
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timed out connecting"
            } else if d.is_io() {
                "cannot connect"
            } else {
                "request failed"
            };
            match e.source() {
                Some(source) => format!("{kind}: {}", chain(source)),
                None => kind.to_string(),
            }
        }
        other => match other.source() {
            Some(source) => chain(source),
            None => other.to_string(),
        },
    }
}

/// An error and its causes, joined with ": ", without repeats.
fn chain(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}
