//! The `dev` directory: where everything of the embedded default lives
//! (keys, socket, events, work and state dirs) and the banner that tells a
//! newcomer what to do next.

use std::path::{Path, PathBuf};

use super::{failed, hostname, process_env, usage, AppError};
use crate::config::{Config, ConfigFile};
use crate::envelope::{Alg, SigningKey};

/// Files of the `dev` directory outside the queue layout.
pub struct DevLayout {
    pub root: PathBuf,
}

impl DevLayout {
    /// `dir` made absolute (config paths must be).
    pub fn new(dir: &Path) -> Result<DevLayout, AppError> {
        let root =
            std::path::absolute(dir).map_err(|e| usage(format!("--dir {}: {e}", dir.display())))?;
        Ok(DevLayout { root })
    }

    pub fn signing_key(&self) -> PathBuf {
        self.root.join("keys/signing.toml")
    }

    pub fn keys_file(&self) -> PathBuf {
        self.root.join("keys/keys.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }

    pub fn events(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }

    /// Defaults of `dev` mode: everything under the directory.
    pub fn mode_defaults(&self) -> Vec<(&'static str, String)> {
        let p = |sub: &str| self.root.join(sub).display().to_string();
        vec![
            ("jobs.work_dir", p("work")),
            ("logs.spool_dir", p("logs")),
            ("signing.keys_file", self.keys_file().display().to_string()),
            ("admin.socket", self.socket().display().to_string()),
            ("state.dir", p("state")),
            ("agent.instance_id", format!("dev-{}", hostname())),
        ]
    }

    /// Creates the development signing key and its verification entry on
    /// first use; later calls reuse them.
    pub fn ensure_keys(&self) -> Result<(), AppError> {
        if self.signing_key().exists() {
            return Ok(());
        }
        let key = SigningKey::generate(Alg::Ed25519, "dev").map_err(failed)?;
        let dir = self.root.join("keys");
        {
            // Only the keys are private: job uids must pass through the
            // directories above to reach their work dirs.
            use std::os::unix::fs::DirBuilderExt;
            let create = |path: &Path, mode: u32, recursive: bool| {
                std::fs::DirBuilder::new()
                    .recursive(recursive)
                    .mode(mode)
                    .create(path)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists if path.is_dir() => Ok(()),
                        _ => Err(e),
                    })
                    .map_err(|e| failed(format!("creating {}: {e}", path.display())))
            };
            create(&self.root, 0o755, true)?;
            create(&dir, 0o700, false)?;
        }
        write_private(&self.keys_file(), &key.verification_entry_toml())?;
        write_private(&self.signing_key(), &key.to_signing_file_toml())?;
        tracing::info!(key = %self.signing_key().display(), "created a development signing key");
        Ok(())
    }
}

/// Writes a new file readable only by its owner (mode 0600 from creation,
/// so no other user can open it in between).
pub fn write_private(path: &Path, text: &str) -> Result<(), AppError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(format!("creating {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| failed(format!("writing {}: {e}", path.display())))
}

/// Loads the configuration of `dev` mode on `dir`.
pub fn load_dev_config(
    dir: &Path,
    explicit: Option<&Path>,
) -> Result<(DevLayout, Config), AppError> {
    let layout = DevLayout::new(dir)?;
    let defaults = layout.mode_defaults();
    let file = match explicit {
        Some(p) => ConfigFile::Explicit(p),
        None => ConfigFile::None,
    };
    let config = Config::load(file, &process_env(), &defaults).map_err(usage)?;
    Ok((layout, config))
}

pub(super) fn print_dev_banner(layout: &DevLayout, config: &Config) {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "batchly-agent".into());
    let d = layout.root.display();
    eprintln!(
        "batchly-agent dev: running on {d} with {} job slots. Ctrl-C drains and stops.\n\n\
         \x20 submit a job    {exe} submit --dir {d} -- echo hello\n\
         \x20 submit 50       {exe} submit --dir {d} --count 50 -- sh -c 'sleep 1; echo done'\n\
         \x20 agent status    {exe} status --dir {d}\n\
         \x20 job events      tail -f {}\n\
         \x20 job output      {}/<job-id>.<message-id>.<run>\n\
         \x20 dead letters    {d}/dead/ (each with a .reason.json)\n",
        config.jobs.max_concurrent,
        layout.events().display(),
        config.logs.spool_dir.display(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    /// Found by trying `dev --dir /tmp/new/dev` as root: the missing
    /// parents were made 0700 with the keys dir, so no job uid could reach
    /// its work dir below them and every job was requeued.
    #[test]
    fn only_the_keys_dir_is_private_the_dirs_above_it_stay_passable() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let root = tmp.path().join("new/dev");
        let layout = DevLayout::new(&root).expect("layout");
        layout.ensure_keys().expect("keys");
        assert_eq!(mode(&root.join("keys")), 0o700);
        for dir in [root.as_path(), root.parent().expect("parent")] {
            assert_eq!(
                mode(dir) & 0o011,
                0o011,
                "{} must let other users through",
                dir.display()
            );
        }
    }
}
