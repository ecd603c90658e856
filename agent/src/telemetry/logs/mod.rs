//! Job output and the agent's own log, to CloudWatch Logs through a
//! bounded disk spool ([`spool`]) shipped by [`ship`]; in `dev`, the same
//! stream files are kept as the jobs' logs.

pub mod agent_log;
pub mod line;
pub mod ship;
pub mod spool;

pub use line::Source;
pub use spool::{Backlog, Spool, SpoolError, SpoolSettings, StreamWriter, Written};
