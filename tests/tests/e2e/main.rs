//! The end-to-end suite: each module drives the real `batchly-agent` binary
//! against real local services (moto, a fault-injecting proxy, real
//! processes). They are one test binary so the AWS SDK is linked once, not
//! once per file.

mod cli;
mod cloudwatch_metrics;
mod dev_bad_input;
// Its probes need root and namespaces, like dev_sandbox.
#[cfg(target_arch = "x86_64")]
mod dev_egress;
mod dev_launch;
mod dev_lifecycle;
// Its attacks call system calls by their x86_64 numbers.
#[cfg(target_arch = "x86_64")]
mod dev_sandbox;
mod dev_unprivileged;
mod dev_watch;
mod imds_fake;
mod sqs_autoscaling;
mod sqs_custody;
mod sqs_drain;
mod sqs_envelopes;
mod sqs_faults;
mod sqs_lifecycle;
mod sqs_logs;
mod sqs_metrics;
mod sqs_notices;
mod sqs_recovery;
mod sqs_s3;
mod sqs_setup;
// Its tests need systemd as PID 1: the VM tier runs them.
mod systemd_unit;
