//! batchly-agent: the host agent of a batch platform. It pulls signed jobs
//! from a queue, runs each one isolated in a child process, and keeps the
//! queue's at-least-once promise through failures, crashes and drains.
//!
//! The modules follow a job's path: `config` → `envelope` (verify) →
//! `queue` (where jobs come from) → `supervisor` (slots, attempts, ack last)
//! → `sandbox` (launch) → `events` (what happened); with `state` (crash
//! ledger), `drain` (stop triggers), `admin` (status socket) and `app`
//! (wiring) around them.

// `unsafe` lives in `sandbox/` only, each block with a SAFETY comment.
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod admin;
pub mod app;
pub mod aws_errors;
pub mod bench;
pub mod config;
pub mod drain;
pub mod envelope;
pub mod events;
pub mod imds;
pub mod lifecycle;
pub mod liveness;
pub mod queue;
pub mod retry;
#[allow(unsafe_code)]
pub mod sandbox;
pub mod state;
pub mod submit;
pub mod supervisor;
pub mod telemetry;
pub mod transfer;
