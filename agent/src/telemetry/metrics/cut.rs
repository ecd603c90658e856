//! CloudWatch's `PutMetricData` limits, each enforced here and nowhere else:
//! how many data one request may carry, how large the request may be, how
//! many distinct values one datum may hold and how many dimensions one
//! metric may have. [`cut`] turns an interval's data into requests that
//! respect all of them; the publisher sends what it returns as it is.
//!
//! Source for every limit: the `PutMetricData` API reference and its
//! `MetricDatum` and `Dimension` types. moto 5.2.5 checks none of them (only
//! NaN values, mismatched `Values`/`Counts` lengths and incomplete
//! statistic sets), so the unit tests below are what holds them.

use std::time::SystemTime;

/// Most metric data in one request.
pub const MAX_DATA_PER_REQUEST: usize = 1_000;
/// Largest request body ("1 MB for HTTP POST requests"), counted as decimal
/// megabyte of the query-encoded body so the bound holds whichever MB is
/// meant.
pub const MAX_REQUEST_BYTES: usize = 1_000_000;
/// Most distinct values in one datum's `Values` (with as many `Counts`).
pub const MAX_VALUES_PER_DATUM: usize = 150;
/// Most dimensions of one metric.
pub const MAX_DIMENSIONS: usize = 30;
/// Longest dimension value, in characters (and at least one).
pub const MAX_DIMENSION_VALUE_LEN: usize = 1_024;

/// The longest a number is written in the request (`f64` in the SDK's
/// shortest round-trip form, sign and exponent included).
const NUMBER_TEXT_MAX: usize = 32;
/// The longest a timestamp is written (RFC 3339 with nanoseconds).
const TIMESTAMP_TEXT_MAX: usize = 32;
/// The longest unit name the agent uses ("Milliseconds").
const UNIT_TEXT_MAX: usize = 12;
/// What prefixes every field of one datum: `MetricData.member.1000.`.
const MEMBER_PREFIX_MAX: usize = "MetricData.member.1000.".len();
/// What every request carries besides its data and its namespace.
const REQUEST_FIXED: &str = "Action=PutMetricData&Version=2010-08-01&Namespace=";

/// What a datum measures, in CloudWatch's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Bytes,
    Percent,
}

/// A datum's value: one number, or a distribution of values with how often
/// each occurred (from which CloudWatch derives sum, extremes and
/// percentiles).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Single(f64),
    /// `(value, count)` pairs, distinct values in ascending order.
    Distribution(Vec<(f64, f64)>),
}

/// One metric datum as the agent builds it, before it becomes the SDK's
/// type: what [`cut`] measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub unit: Unit,
    /// `(name, value)`, at most [`MAX_DIMENSIONS`], every value 1 to
    /// [`MAX_DIMENSION_VALUE_LEN`] characters.
    pub dimensions: Vec<(String, String)>,
    pub timestamp: SystemTime,
    pub value: Value,
}

impl Datum {
    /// An upper bound of the bytes this datum adds to a query-encoded
    /// request: every field at the longest member prefix, every character
    /// as if it had to be percent-encoded.
    pub fn encoded_len_bound(&self) -> usize {
        let field = |key: &str, value_len: usize| MEMBER_PREFIX_MAX + key.len() + value_len * 3 + 2;
        let mut len = field("MetricName", self.name.len())
            + field("Timestamp", TIMESTAMP_TEXT_MAX)
            + field("Unit", UNIT_TEXT_MAX);
        for (name, value) in &self.dimensions {
            len += field("Dimensions.member.30.Name", name.len());
            len += field("Dimensions.member.30.Value", value.len());
        }
        len += match &self.value {
            Value::Single(_) => field("Value", NUMBER_TEXT_MAX),
            Value::Distribution(pairs) => {
                pairs.len()
                    * (field("Values.member.150", NUMBER_TEXT_MAX)
                        + field("Counts.member.150", NUMBER_TEXT_MAX))
            }
        };
        len
    }
}

/// What a request costs before its first datum.
fn request_overhead(namespace: &str) -> usize {
    REQUEST_FIXED.len() + namespace.len() * 3
}

/// Splits a distribution with more than [`MAX_VALUES_PER_DATUM`] distinct
/// values into several data of the same metric, dimensions and time, which
/// CloudWatch adds up as one.
fn split_values(datum: Datum) -> Vec<Datum> {
    match &datum.value {
        Value::Distribution(pairs) if pairs.len() > MAX_VALUES_PER_DATUM => pairs
            .chunks(MAX_VALUES_PER_DATUM)
            .map(|chunk| Datum {
                value: Value::Distribution(chunk.to_vec()),
                ..datum.clone()
            })
            .collect(),
        _ => vec![datum],
    }
}

/// Cuts `data` into as few `PutMetricData` requests to `namespace` as the
/// limits allow, in order: no request over [`MAX_DATA_PER_REQUEST`] data or
/// [`MAX_REQUEST_BYTES`], no datum over [`MAX_VALUES_PER_DATUM`] values.
/// Dimensions are bounded where data are built; one datum always fits a
/// request on its own (a unit test checks the largest possible one).
pub fn cut(namespace: &str, data: Vec<Datum>) -> Vec<Vec<Datum>> {
    let overhead = request_overhead(namespace);
    let mut requests: Vec<Vec<Datum>> = Vec::new();
    let mut current: Vec<Datum> = Vec::new();
    let mut bytes = overhead;
    for datum in data.into_iter().flat_map(split_values) {
        let cost = datum.encoded_len_bound();
        if !current.is_empty()
            && (current.len() == MAX_DATA_PER_REQUEST || bytes + cost > MAX_REQUEST_BYTES)
        {
            requests.push(std::mem::take(&mut current));
            bytes = overhead;
        }
        bytes += cost;
        current.push(datum);
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
}

/// `text` cut to at most [`MAX_DIMENSION_VALUE_LEN`] characters; `None`
/// when empty (CloudWatch refuses an empty dimension value).
pub fn dimension_value(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    Some(text.chars().take(MAX_DIMENSION_VALUE_LEN).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datum(name: &'static str, dimensions: Vec<(String, String)>, value: Value) -> Datum {
        Datum {
            name,
            unit: Unit::Count,
            dimensions,
            timestamp: SystemTime::UNIX_EPOCH,
            value,
        }
    }

    fn request_bytes(namespace: &str, request: &[Datum]) -> usize {
        request_overhead(namespace) + request.iter().map(Datum::encoded_len_bound).sum::<usize>()
    }

    fn assert_within_limits(namespace: &str, requests: &[Vec<Datum>]) {
        for request in requests {
            assert!(!request.is_empty(), "an empty request is never sent");
            assert!(request.len() <= MAX_DATA_PER_REQUEST, "{}", request.len());
            assert!(request_bytes(namespace, request) <= MAX_REQUEST_BYTES);
            for datum in request {
                assert!(datum.dimensions.len() <= MAX_DIMENSIONS);
                if let Value::Distribution(pairs) = &datum.value {
                    assert!(pairs.len() <= MAX_VALUES_PER_DATUM, "{}", pairs.len());
                }
            }
        }
    }

    /// The largest datum the agent can build: every dimension at its
    /// longest (values of four-byte characters), a full distribution.
    fn largest_datum(index: usize) -> Datum {
        let dimensions = (0..MAX_DIMENSIONS)
            .map(|d| {
                (
                    format!("{d:0>255}"),
                    "\u{1d11e}".repeat(MAX_DIMENSION_VALUE_LEN),
                )
            })
            .collect();
        let pairs = (0..MAX_VALUES_PER_DATUM)
            .map(|v| (-1.234_567_890_123_456_7e-300 * (v + index) as f64, 1e300))
            .collect();
        datum("JobDuration", dimensions, Value::Distribution(pairs))
    }

    #[test]
    fn many_small_data_fill_requests_of_at_most_a_thousand_in_order() {
        let data: Vec<Datum> = (0..2_500)
            .map(|n| datum("Jobs", Vec::new(), Value::Single(n as f64)))
            .collect();
        let requests = cut("Batchly/Agent", data.clone());
        let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1_000, 1_000, 500]);
        assert_within_limits("Batchly/Agent", &requests);
        assert_eq!(requests.concat(), data, "nothing lost, nothing reordered");
    }

    #[test]
    fn large_data_are_cut_by_the_request_size_before_the_count() {
        let data: Vec<Datum> = (0..40).map(largest_datum).collect();
        let one = data[0].encoded_len_bound();
        assert!(
            request_overhead(&"N".repeat(255)) + one <= MAX_REQUEST_BYTES,
            "the largest datum fits a request on its own ({one} bytes)"
        );
        let namespace = "N".repeat(255);
        let requests = cut(&namespace, data.clone());
        assert!(
            requests.len() > 1,
            "40 data of {one} bytes need several requests"
        );
        assert!(
            requests.iter().all(|r| r.len() < MAX_DATA_PER_REQUEST),
            "size, not count, cut these"
        );
        assert_within_limits(&namespace, &requests);
        // Greedy: each request but the last is full, the next datum would not fit.
        for pair in requests.windows(2) {
            assert!(request_bytes(&namespace, &pair[0]) + one > MAX_REQUEST_BYTES);
        }
        assert_eq!(requests.concat(), data);
    }

    #[test]
    fn a_distribution_of_more_than_150_values_becomes_several_data_of_the_same_metric() {
        let pairs: Vec<(f64, f64)> = (0..400).map(|v| (v as f64, 2.0)).collect();
        let dims = vec![("Queue".to_string(), "jobs".to_string())];
        let requests = cut(
            "Batchly/Agent",
            vec![datum(
                "JobDuration",
                dims.clone(),
                Value::Distribution(pairs.clone()),
            )],
        );
        assert_within_limits("Batchly/Agent", &requests);
        let data = requests.concat();
        assert_eq!(data.len(), 3, "150 + 150 + 100");
        let mut joined = Vec::new();
        for d in &data {
            assert_eq!((d.name, &d.dimensions), ("JobDuration", &dims));
            let Value::Distribution(part) = &d.value else {
                panic!("still a distribution: {d:?}")
            };
            joined.extend_from_slice(part);
        }
        assert_eq!(joined, pairs, "every value and count kept");
    }

    #[test]
    fn nothing_to_send_is_no_request() {
        assert!(cut("Batchly/Agent", Vec::new()).is_empty());
    }

    #[test]
    fn dimension_values_are_never_empty_and_cut_at_1024_characters() {
        assert_eq!(dimension_value(""), None);
        assert_eq!(dimension_value("team-a").as_deref(), Some("team-a"));
        let long = "é".repeat(2_000);
        let cut = dimension_value(&long).map(|v| v.chars().count());
        assert_eq!(cut, Some(MAX_DIMENSION_VALUE_LEN));
    }
}
