//! The AWS SDK clients, from the SDK's standard chain only (environment,
//! profile, ECS container credentials, instance profile via IMDSv2): region
//! and credentials are never the agent's own config.

use std::time::Duration;

use super::{usage, AppError};

/// The AWS SDK's configuration from its standard chain (environment,
/// profile, ECS container credentials, instance profile via IMDSv2), with
/// bounded timeouts and the SDK's retries (exponential backoff, jitter).
pub async fn aws_sdk_config() -> Result<aws_config::SdkConfig, AppError> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(4))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                // Longer than SQS's 20-second long poll.
                .operation_attempt_timeout(Duration::from_secs(40))
                .build(),
        )
        .load()
        .await;
    if sdk.region().is_none() {
        return Err(usage(
            "no AWS region: set AWS_REGION (on EC2 the SDK reads it from instance metadata)",
        ));
    }
    Ok(sdk)
}

/// SQS with one retry layer (the agent's own, `crate::retry`, bounded by
/// each caller's deadline) instead of the SDK's on top of it, and a short
/// attempt timeout for every call but the long poll (which sets its own).
pub(super) fn sqs_client(sdk: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&one_retry_layer(sdk))
}

/// Auto Scaling (lifecycle hooks) with the same single retry layer and
/// short timeouts as SQS.
pub(super) fn autoscaling_client(sdk: &aws_config::SdkConfig) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::new(&one_retry_layer(sdk))
}

/// CloudWatch Logs (the log shipper) with the same single retry layer and
/// short timeouts.
pub(super) fn logs_client(sdk: &aws_config::SdkConfig) -> aws_sdk_cloudwatchlogs::Client {
    aws_sdk_cloudwatchlogs::Client::new(&one_retry_layer(sdk))
}

/// CloudWatch (metrics) with the same single retry layer and short
/// timeouts.
pub(super) fn cloudwatch_client(sdk: &aws_config::SdkConfig) -> aws_sdk_cloudwatch::Client {
    aws_sdk_cloudwatch::Client::new(&one_retry_layer(sdk))
}

/// `sdk` with the SDK's retries off (the agent's own policy retries,
/// bounded by each caller's deadline) and short call timeouts.
fn one_retry_layer(sdk: &aws_config::SdkConfig) -> aws_config::SdkConfig {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    sdk.to_builder()
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(CALL_TIMEOUT)
                .build(),
        )
        .build()
}

/// How long a connection to SQS or Auto Scaling may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call other than a long poll may take: a hung endpoint
/// costs this much, then the caller's retry policy decides.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// S3 with path-style addressing when the endpoint is a local address (an
/// IP or localhost cannot carry a bucket name as a subdomain); AWS's own
/// endpoints use virtual-hosted style.
pub(super) fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok();
    let path_style = endpoint.as_deref().is_some_and(is_local_endpoint);
    let conf = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(path_style)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

fn is_local_endpoint(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_get_path_style_and_aws_endpoints_do_not() {
        assert!(is_local_endpoint("http://127.0.0.1:5000"));
        assert!(is_local_endpoint("http://localhost:4566/"));
        assert!(is_local_endpoint("http://[::1]:9000"));
        assert!(!is_local_endpoint("https://s3.eu-west-1.amazonaws.com"));
        assert!(!is_local_endpoint("https://minio.internal.example:9000"));
    }
}
