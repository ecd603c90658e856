//! The effective configuration as TOML text for `check-config`: every key with its one-line
//! description, its value and where that value came from. The text loads back to the same
//! values; a secret value is never written, only `"<redacted>"`.

use std::fmt;

use super::keys::{split_name, Builtin, Slot, KEYS};
use super::{Config, FileState, Origin};

pub(super) struct Rendered<'a>(pub(super) &'a Config);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.0;
        writeln!(f, "# Effective batchly-agent configuration.")?;
        match &config.file {
            FileState::Loaded(path) => writeln!(
                f,
                "# Config file: {}",
                printable(&path.display().to_string())
            )?,
            FileState::Absent(path) => writeln!(
                f,
                "# No config file: {} does not exist; defaults and environment apply.",
                printable(&path.display().to_string())
            )?,
            FileState::NotUsed => writeln!(
                f,
                "# No config file was read; defaults and environment apply."
            )?,
        }
        let mut current_section = "";
        for (key, origin) in KEYS.iter().zip(&config.origins) {
            let (section, leaf) = split_name(key.name);
            if section != current_section {
                writeln!(f, "\n[{section}]")?;
                current_section = section;
            }
            writeln!(f, "# {}", key.doc)?;
            let note = match (&key.default, origin) {
                (Builtin::CpuCount, Origin::Builtin) => " (number of CPUs)",
                _ => "",
            };
            match key.slot.render(config) {
                Some(_) if key.secret => writeln!(f, "{leaf} = \"<redacted>\"  # {origin}")?,
                Some(value) => writeln!(f, "{leaf} = {value}  # {origin}{note}")?,
                None if key.name == "queue.url" => {
                    writeln!(f, "# {leaf} is not set; `run` requires it")?
                }
                None => writeln!(f, "# {leaf} is not set")?,
            }
        }
        Ok(())
    }
}

/// Control characters would break a comment line (or a message) in two.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .map(|character| {
            if character.is_control() {
                '?'
            } else {
                character
            }
        })
        .collect()
}

impl Slot {
    /// The value as TOML, or `None` when the setting is not set.
    fn render(&self, config: &Config) -> Option<String> {
        fn quoted(text: &str) -> String {
            toml::Value::String(text.to_string()).to_string()
        }
        match self {
            Slot::QueueUrls(field) => match (field.get)(config).as_slice() {
                [] => None,
                [url] => Some(quoted(url)),
                urls => Some(format!(
                    "[{}]",
                    urls.iter()
                        .map(|url| quoted(url))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
            Slot::OptionalUrl(field) | Slot::OptionalText { field, .. } => {
                (field.get)(config).as_deref().map(quoted)
            }
            Slot::Count { field, .. } => Some((field.get)(config).to_string()),
            Slot::Times(field) => Some((field.get)(config).to_string()),
            Slot::Seconds { field, .. } => Some((field.get)(config).as_secs().to_string()),
            Slot::Size(field) => Some(render_size(*(field.get)(config))),
            Slot::Path(field) => Some(quoted(&(field.get)(config).to_string_lossy())),
            Slot::Paths(field) => Some(format!(
                "[{}]",
                (field.get)(config)
                    .iter()
                    .map(|p| quoted(&p.to_string_lossy()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Slot::Text { field, .. } => Some(quoted((field.get)(config))),
            Slot::LogFormat(field) => Some(quoted((field.get)(config).as_str())),
            Slot::SandboxMode(field) => Some(quoted((field.get)(config).as_str())),
            Slot::UidRange(field) => Some(quoted(&(field.get)(config).to_string())),
            Slot::Flag(field) => Some((field.get)(config).to_string()),
            Slot::Names { field, .. } => Some(format!(
                "[{}]",
                (field.get)(config)
                    .iter()
                    .map(|name| quoted(name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Slot::LoopbackAddr(field) => (field.get)(config)
                .as_ref()
                .map(|addr| quoted(&addr.to_string())),
        }
    }
}

/// The largest binary unit that divides the size exactly, so the text parses back unchanged.
fn render_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes % unit == 0)
        .map(|(unit, name)| format!("\"{}{name}\"", bytes / unit))
        .unwrap_or_else(|| bytes.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cpus, load};

    #[test]
    fn render_shows_where_each_value_came_from() {
        let loaded = load(
            Some("[jobs]\nkill_grace_s = 20\n"),
            &[("BATCHLY_JOBS_MAX_CONCURRENT", "6")],
            &[("jobs.work_dir", "/tmp/dev/work")],
        );
        let path = loaded.path();
        let rendered = loaded.config().render();
        assert!(
            rendered.contains(&format!("# Config file: {path}\n")),
            "{rendered}"
        );
        assert!(
            rendered.contains("max_concurrent = 6  # from BATCHLY_JOBS_MAX_CONCURRENT\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains(&format!("kill_grace_s = 20  # from {path}\n")),
            "{rendered}"
        );
        assert!(
            rendered.contains("work_dir = \"/tmp/dev/work\"  # dev default\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains("log_max_bytes = \"256MiB\"  # default\n"),
            "{rendered}"
        );
        assert!(
            rendered.contains("# url is not set; `run` requires it\n"),
            "{rendered}"
        );
    }

    #[test]
    fn render_marks_the_cpu_count_default() {
        let rendered = load(None, &[], &[]).config().render();
        assert!(
            rendered.contains(&format!(
                "max_concurrent = {}  # default (number of CPUs)\n",
                cpus()
            )),
            "{rendered}"
        );
    }

    #[test]
    fn rendered_config_loads_back_to_the_same_values() {
        let original = load(
            Some("[queue]\nurl = [\"https://sqs.example/a\", \"https://sqs.example/b\"]\n[jobs]\nlog_max_bytes = \"10MB\"\n"),
            &[
                ("BATCHLY_QUEUE_EVENTS_URL", "https://sqs.example/events"),
                ("BATCHLY_AGENT_INSTANCE_ID", "i-0123456789abcdef0"),
                ("BATCHLY_AGENT_LOG_FORMAT", "json"),
                ("BATCHLY_AGENT_LOG_LEVEL", "batchly_agent=debug,info"),
                ("BATCHLY_DRAIN_TIMEOUT_S", "120"),
            ],
            &[("state.dir", "/tmp/dev/state")],
        )
        .config();
        let reloaded = load(Some(&original.render()), &[], &[]).config();
        assert_eq!(reloaded.queue, original.queue);
        assert_eq!(reloaded.jobs, original.jobs);
        assert_eq!(reloaded.signing, original.signing);
        assert_eq!(reloaded.logs, original.logs);
        assert_eq!(reloaded.metrics, original.metrics);
        assert_eq!(reloaded.drain, original.drain);
        assert_eq!(reloaded.admin, original.admin);
        assert_eq!(reloaded.state, original.state);
        assert_eq!(reloaded.agent, original.agent);
    }
}
