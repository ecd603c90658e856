//! Copies of a message sent back to its queue: a release that is not a
//! failure (exit 75, a drain, agent-side trouble) replaces the message with
//! a new one carrying the job's counts, so SQS's receive count, which
//! starts over with the copy, only grows with failures. Custody copies go
//! back the same way.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;
use aws_sdk_sqs::Client;

use crate::aws_errors::describe;
use crate::queue::custody::{Attribute, Held};
use crate::queue::QueueError;
use crate::retry;

/// Failed attempts of the job before this copy of its message was sent.
/// Not signed: a producer that sets it only shortens its own job's retries.
pub const ATTR_FAILURES: &str = "batchly-failures";
/// Receives of the job before this copy of its message was sent, so that
/// backoffs for agent-side trouble keep growing across copies, log stream
/// names stay unique, and uncounted releases can be bounded.
pub const ATTR_RECEIVES: &str = "batchly-receives";
/// The attributes the agent adds to a copy.
pub const OWN_ATTRIBUTES: usize = 2;
/// SQS allows at most this many message attributes.
pub const MAX_ATTRIBUTES: usize = 10;
/// SQS delays a new message by at most 15 minutes.
pub const MAX_SEND_DELAY: Duration = Duration::from_secs(900);

/// What a message carries in its attributes: the counts a copy took over
/// from the message it replaced, and the producer's own attributes (sent
/// on with any copy).
pub struct Carried {
    pub failures: u32,
    pub receives: u32,
    pub attributes: Vec<Attribute>,
}

pub fn split_attributes(attrs: HashMap<String, MessageAttributeValue>) -> Carried {
    let count = |value: &MessageAttributeValue| {
        value
            .string_value()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut carried = Carried {
        failures: 0,
        receives: 0,
        attributes: Vec::new(),
    };
    for (name, value) in attrs {
        match name.as_str() {
            ATTR_FAILURES => carried.failures = count(&value),
            ATTR_RECEIVES => carried.receives = count(&value),
            _ => carried.attributes.push(Attribute {
                name,
                data_type: value.data_type().to_string(),
                string_value: value.string_value().map(str::to_string),
                binary_base64: value.binary_value().map(|b| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.encode(b.as_ref())
                }),
            }),
        }
    }
    carried.attributes.sort_by(|a, b| a.name.cmp(&b.name));
    carried
}

/// The attributes of a copy sent back: the producer's and the agent's
/// counts. None when they do not fit SQS's limit of ten.
pub fn copy_attributes(held: &Held) -> Option<Vec<(String, MessageAttributeValue)>> {
    if held.attributes.len() + OWN_ATTRIBUTES > MAX_ATTRIBUTES {
        return None;
    }
    let mut out = Vec::with_capacity(held.attributes.len() + OWN_ATTRIBUTES);
    for a in &held.attributes {
        let mut value = MessageAttributeValue::builder().data_type(&a.data_type);
        if let Some(s) = &a.string_value {
            value = value.string_value(s);
        }
        if let Some(b) = &a.binary_base64 {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
            value = value.binary_value(aws_smithy_types::Blob::new(bytes));
        }
        out.push((a.name.clone(), value.build().ok()?));
    }
    for (name, count) in [
        (ATTR_FAILURES, held.failures),
        (ATTR_RECEIVES, held.receives),
    ] {
        let value = MessageAttributeValue::builder()
            .data_type("Number")
            .string_value(count.to_string())
            .build()
            .ok()?;
        out.push((name.to_string(), value));
    }
    Some(out)
}

/// Sends a copy of a message back to its queue as a new message (with its
/// attributes and counts), once; returns the new message's id. The caller
/// retries by the one retry policy.
pub async fn send_back(
    client: &Client,
    held: &Held,
    delay: Duration,
) -> Result<String, QueueError> {
    let delay_s = delay.min(MAX_SEND_DELAY).as_secs() as i32;
    let mut send = client
        .send_message()
        .queue_url(&held.queue_url)
        .message_body(&held.body);
    match copy_attributes(held) {
        Some(attrs) => {
            for (name, value) in attrs {
                send = send.message_attributes(name, value);
            }
        }
        None => {
            tracing::warn!(message_id = %held.message_id, "message has too many attributes to add its counts; the copy sent back starts counting attempts over");
        }
    }
    if held.queue_url.ends_with(".fifo") {
        // FIFO queues take no per-message delay; order within the group
        // restarts from this message.
        send = send
            .message_group_id(
                held.group
                    .clone()
                    .unwrap_or_else(|| held.message_id.clone()),
            )
            .message_deduplication_id(format!(
                "{}-returned-{}",
                held.message_id,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ));
    } else {
        send = send.delay_seconds(delay_s);
    }
    send.send()
        .await
        .map(|out| out.message_id.unwrap_or_default())
        .map_err(|e| QueueError::Service {
            action: "sending a copy of a message back to",
            target: held.queue_url.clone(),
            class: retry::classify(&e),
            detail: describe(&e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_attr(value: &str, data_type: &str) -> MessageAttributeValue {
        MessageAttributeValue::builder()
            .data_type(data_type)
            .string_value(value)
            .build()
            .expect("attribute")
    }

    #[test]
    fn the_failure_count_is_read_apart_from_the_producers_attributes_and_sent_back_with_them() {
        let mut attrs = HashMap::new();
        attrs.insert(ATTR_FAILURES.to_string(), string_attr("3", "Number"));
        attrs.insert("trace".to_string(), string_attr("t-1", "String"));
        attrs.insert(
            "blob".to_string(),
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(aws_smithy_types::Blob::new(vec![0u8, 255, 7]))
                .build()
                .expect("attribute"),
        );
        attrs.insert(ATTR_RECEIVES.to_string(), string_attr("5", "Number"));
        let carried = split_attributes(attrs);
        assert_eq!((carried.failures, carried.receives), (3, 5));
        let kept = carried.attributes;
        let names: Vec<&str> = kept.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["blob", "trace"]);

        let held = Held {
            message_id: "m".into(),
            queue_url: "q".into(),
            body: "b".into(),
            group: None,
            failures: 4,
            receives: 6,
            attributes: kept,
        };
        let sent: HashMap<String, MessageAttributeValue> =
            copy_attributes(&held).expect("fits").into_iter().collect();
        assert_eq!(sent[ATTR_FAILURES].string_value(), Some("4"));
        assert_eq!(sent[ATTR_FAILURES].data_type(), "Number");
        assert_eq!(sent[ATTR_RECEIVES].string_value(), Some("6"));
        assert_eq!(sent["trace"].string_value(), Some("t-1"));
        assert_eq!(
            sent["blob"].binary_value().map(|b| b.as_ref().to_vec()),
            Some(vec![0u8, 255, 7])
        );
    }

    #[test]
    fn an_unreadable_failure_count_counts_as_none() {
        let mut attrs = HashMap::new();
        attrs.insert(ATTR_FAILURES.to_string(), string_attr("-2", "Number"));
        assert_eq!(split_attributes(attrs).failures, 0);
    }

    #[test]
    fn a_message_with_nine_attributes_has_no_room_for_the_agents_counts() {
        let attributes = (0..MAX_ATTRIBUTES - 1)
            .map(|i| Attribute {
                name: format!("a{i}"),
                data_type: "String".into(),
                string_value: Some("v".into()),
                binary_base64: None,
            })
            .collect();
        let held = Held {
            message_id: "m".into(),
            queue_url: "q".into(),
            body: "b".into(),
            group: None,
            failures: 1,
            receives: 1,
            attributes,
        };
        assert!(copy_attributes(&held).is_none());
    }
}
