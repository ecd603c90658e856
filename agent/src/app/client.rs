//! The one-shot commands that talk to a config or a running agent:
//! `check-config`, `keygen`, `status` and `drain`.

use std::path::{Path, PathBuf};

use super::{failed, load_config, load_dev_config, usage, write_private, AppError};
use crate::admin;
use crate::envelope::{Alg, Keyring, SigningKey};

/// `batchly-agent check-config`.
pub fn check_config(explicit: Option<&Path>, dev_dir: Option<&Path>) -> Result<String, AppError> {
    let config = match dev_dir {
        Some(dir) => load_dev_config(dir, explicit)?.1,
        None => load_config(explicit)?,
    };
    let mut out = config.render();
    let keys = Keyring::load(&config.signing.keys_file).map_err(usage)?;
    out.push_str(&format!(
        "\n# keys file {}: {} key(s), permissions ok\n",
        config.signing.keys_file.display(),
        keys.len()
    ));
    for k in keys.summaries() {
        out.push_str(&format!(
            "#   kid {:<24} {:<12} {}\n",
            k.kid,
            k.alg.as_str(),
            k.fingerprint
        ));
    }
    out.push_str(&format!(
        "\n# sandbox.mode = {:?} on this host:\n",
        config.sandbox.mode.as_str()
    ));
    for (what, support) in crate::sandbox::host_support(Path::new("/proc/self/exe")) {
        match support {
            Ok(how) => out.push_str(&format!("#   {what:<34} ok: {how}\n")),
            Err(why) => out.push_str(&format!("#   {what:<34} NO: {why}\n")),
        }
    }
    Ok(out)
}

/// `batchly-agent keygen`: writes the signing key file (0600, never
/// overwritten) and returns the verification entry for the keys file.
pub fn keygen(alg: Alg, kid: &str, out: &Path) -> Result<String, AppError> {
    if out.exists() {
        return Err(usage(format!(
            "{} already exists; refusing to overwrite a key (choose another --out)",
            out.display()
        )));
    }
    let key = SigningKey::generate(alg, kid).map_err(usage)?;
    write_private(out, &key.to_signing_file_toml())?;
    Ok(key.verification_entry_toml())
}

/// Where `status` and `drain` find the agent.
pub fn admin_socket(
    socket: Option<&Path>,
    dev_dir: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, AppError> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(dir) = dev_dir {
        return Ok(load_dev_config(dir, config)?.1.admin.socket);
    }
    Ok(load_config(config)?.admin.socket)
}

/// `batchly-agent status`.
pub async fn status(socket: &Path, json: bool) -> Result<String, AppError> {
    match admin::request(socket, &admin::Request::Status)
        .await
        .map_err(failed)?
    {
        admin::Response::Status { status } if json => {
            serde_json::to_string_pretty(&status).map_err(failed)
        }
        admin::Response::Status { status } => Ok(status.render_text()),
        other => Err(failed(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

/// `batchly-agent drain`.
/// `batchly-agent cancel`: kills every running attempt of `job_id`.
pub async fn request_cancel(
    socket: &Path,
    job_id: &str,
    requeue: bool,
) -> Result<String, AppError> {
    let req = admin::Request::Cancel {
        job_id: job_id.to_string(),
        requeue,
    };
    match admin::request(socket, &req).await.map_err(failed)? {
        admin::Response::Cancelled { message_ids } => Ok(format!(
            "cancelled {job_id} (message {}): killed; its message is {}",
            message_ids.join(", "),
            if requeue {
                "released to run again"
            } else {
                "deleted, with a final job.failed event, reason cancelled"
            }
        )),
        admin::Response::Error { error } => Err(usage(error)),
        other => Err(failed(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

pub async fn request_drain(socket: &Path) -> Result<String, AppError> {
    match admin::request(socket, &admin::Request::Drain).await.map_err(failed)? {
        admin::Response::Draining { reason, deadline_in_s } => Ok(format!(
            "draining ({reason}): no new jobs; running jobs finish or are released within {deadline_in_s}s, then the agent exits"
        )),
        other => Err(failed(format!("unexpected answer from the agent: {other:?}"))),
    }
}
