//! "Did you mean": the known key, section or environment variable closest to an unknown one,
//! so that a typo's error message points at the fix. Suggestions only; nothing here decides
//! whether a name is accepted.

use super::keys::{sections, split_name, KEYS};

/// Keys that were renamed: an old config gets the new name.
const RENAMED: &[(&str, &str)] = &[("jobs.log_dir", "logs.spool_dir")];

pub(super) fn suggest_key(name: &str) -> String {
    if let Some((_, new)) = RENAMED.iter().find(|(old, _)| *old == name) {
        return format!("; it is now {new}");
    }
    let close = closest(name, KEYS.iter().map(|key| key.name));
    // A known key written in the wrong section: `[jobs] skew_s` means signing.skew_s.
    let moved = || {
        let (_, leaf) = split_name(name);
        KEYS.iter()
            .map(|key| key.name)
            .find(|known| split_name(known).1 == leaf)
    };
    did_you_mean(close.or_else(moved))
}

pub(super) fn suggest_section(section: &str) -> String {
    let close = closest(section, sections().into_iter());
    // A key written at the top level, outside its section: `url = ...` means queue.url.
    let moved = || {
        KEYS.iter()
            .map(|key| key.name)
            .find(|known| split_name(known).1 == section)
    };
    did_you_mean(close.or_else(moved))
}

pub(super) fn did_you_mean(candidate: Option<&str>) -> String {
    candidate
        .map(|candidate| format!("; did you mean {candidate}?"))
        .unwrap_or_default()
}

/// The candidate nearest to `unknown`, if it is near enough to be a likely typo.
pub(super) fn closest<'a>(
    unknown: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|candidate| (edit_distance(unknown, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= 3 && distance * 3 <= candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance in characters, with a single reused row.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, b_char) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(a_char != *b_char);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::super::tests::load;
    use super::*;

    #[test]
    fn misspelt_file_key_suggests_the_known_key() {
        let loaded = load(Some("[jobs]\nmax_concurent = 4\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.max_concurent: unknown key (from {}); did you mean jobs.max_concurrent?",
                loaded.path()
            )
        );
    }

    #[test]
    fn key_in_the_wrong_section_suggests_its_section() {
        let loaded = load(Some("[jobs]\nskew_s = 30\n"), &[], &[]);
        assert!(
            loaded.error().ends_with("; did you mean signing.skew_s?"),
            "{}",
            loaded.error()
        );
    }

    #[test]
    fn a_renamed_key_names_its_new_name() {
        let loaded = load(Some("[jobs]\nlog_dir = \"/srv/logs\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "jobs.log_dir: unknown key (from {}); it is now logs.spool_dir",
                loaded.path()
            )
        );
    }

    #[test]
    fn unrelated_unknown_key_gets_no_suggestion() {
        let loaded = load(Some("[jobs]\ncolour = \"blue\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!("jobs.colour: unknown key (from {})", loaded.path())
        );
    }

    #[test]
    fn misspelt_section_is_an_unknown_section_with_a_suggestion() {
        let loaded = load(Some("[queu]\nurl = \"https://sqs.example/q\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "queu: unknown section (from {}); did you mean queue?",
                loaded.path()
            )
        );
    }

    #[test]
    fn top_level_key_outside_its_section_points_to_the_section() {
        let loaded = load(Some("url = \"https://sqs.example/q\"\n"), &[], &[]);
        assert_eq!(
            loaded.error(),
            format!(
                "url: unknown section (from {}); did you mean queue.url?",
                loaded.path()
            )
        );
    }

    #[test]
    fn misspelt_environment_variable_is_an_unknown_setting_with_a_suggestion() {
        let loaded = load(None, &[("BATCHLY_JOBS_MAX_CONCURENT", "4")], &[]);
        assert_eq!(
            loaded.error(),
            "BATCHLY_JOBS_MAX_CONCURENT: unknown setting (from the environment); \
             did you mean BATCHLY_JOBS_MAX_CONCURRENT?"
        );
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("max_concurent", "max_concurrent"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
