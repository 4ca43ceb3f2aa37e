//! Settings that name nothing are refused: a key of the settings file or an `APP_…`
//! variable that is no setting of the tree stops the start, naming it and the closest
//! setting (`APP_HTTP__PROT: no such setting; did you mean http.port?`), instead of being
//! silently ignored. What is known comes from the tree itself ([`super::paths`]); the keys
//! of a map setting (`kafka.producer.extra`, `external.routes`, …) are the operator's own.
//!
//! `APP_CONFIG_FILE` names the file; variables another tool owns under the same prefix are
//! left alone when `APP_CONFIG_IGNORE` lists them (comma-separated names).

use std::collections::HashMap;

use config::{Map, Value, ValueKind};

use super::paths::SettingPath;

/// The variable that lists the `APP_…` variables that are not settings.
pub const IGNORE_VARIABLE: &str = "APP_CONFIG_IGNORE";

/// A key that names no setting, as the operator wrote it, and the closest setting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{written}: no such setting{}", .closest.as_ref().map(|closest| format!("; did you mean {closest}?")).unwrap_or_default())]
pub struct UnknownSetting {
    /// `APP_HTTP__PROT`, or `commerce-events.toml: http.prot`.
    pub written: String,
    pub closest: Option<String>,
}

/// What the tree knows.
pub struct KnownSettings {
    settings: Vec<SettingPath>,
}

impl KnownSettings {
    pub fn new(settings: Vec<SettingPath>) -> Self {
        Self { settings }
    }

    /// Whether `path` (dotted) names a setting, a section of them, or a key inside a map
    /// setting.
    fn knows(&self, path: &str) -> bool {
        self.settings.iter().any(|setting| {
            setting.path == path
                || setting.path.starts_with(&format!("{path}."))
                || (setting.is_map && path.starts_with(&format!("{}.", setting.path)))
        })
    }

    /// The setting or section whose path is closest to `path` (by edit distance), when one
    /// is close enough to be a likely typo.
    fn closest(&self, path: &str) -> Option<String> {
        let mut candidates: Vec<&str> = Vec::new();
        for setting in &self.settings {
            let known = setting.path.as_str();
            candidates.extend(
                known
                    .match_indices('.')
                    .map(|(end, _)| &known[..end])
                    .chain([known]),
            );
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .map(|known| (edit_distance(path, known), known))
            .filter(|(distance, known)| *distance <= (known.len() / 3).max(2))
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, known)| known.to_string())
    }

    fn refuse(&self, written: String, path: &str) -> UnknownSetting {
        UnknownSetting {
            written,
            closest: self.closest(path),
        }
    }

    /// Checks the `APP_…` variables of `environment`: each must name a setting (sections
    /// and keys joined by `__`, as the configuration reads them), unless it is the file's,
    /// the ignore list's, or on it.
    pub fn check_environment(
        &self,
        environment: &HashMap<String, String>,
    ) -> Result<(), UnknownSetting> {
        let ignored: Vec<&str> = environment
            .get(IGNORE_VARIABLE)
            .map(|list| list.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let mut names: Vec<&String> = environment
            .keys()
            .filter(|name| name.starts_with("APP_"))
            .filter(|name| {
                let name = name.as_str();
                name != super::CONFIG_FILE_VARIABLE
                    && name != IGNORE_VARIABLE
                    && !ignored.contains(&name)
            })
            .collect();
        names.sort();
        for name in names {
            let path = name["APP_".len()..].to_lowercase().replace("__", ".");
            if !self.knows(&path) {
                return Err(self.refuse(name.clone(), &path));
            }
        }
        Ok(())
    }

    /// Checks the keys of the settings file (`file` names it in the error), walking its
    /// tables.
    pub fn check_file(&self, file: &str, table: &Map<String, Value>) -> Result<(), UnknownSetting> {
        self.check_table(file, "", table)
    }

    fn check_table(
        &self,
        file: &str,
        prefix: &str,
        table: &Map<String, Value>,
    ) -> Result<(), UnknownSetting> {
        let mut keys: Vec<&String> = table.keys().collect();
        keys.sort();
        for key in keys {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if !self.knows(&path) {
                return Err(self.refuse(format!("{file}: {path}"), &path));
            }
            let is_section = !self.is_setting(&path);
            if let (true, ValueKind::Table(inner)) = (is_section, &table[key].kind) {
                self.check_table(file, &path, inner)?;
            }
        }
        Ok(())
    }

    /// Whether `path` is a setting itself (or inside a map setting), not a section.
    fn is_setting(&self, path: &str) -> bool {
        self.settings.iter().any(|setting| {
            setting.path == path
                || (setting.is_map && path.starts_with(&format!("{}.", setting.path)))
        })
    }
}

/// The Levenshtein distance between `a` and `b`, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, left) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, right) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(left != *right);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("http.port", "http.port"), 0);
        assert_eq!(edit_distance("http.prot", "http.port"), 2);
        assert_eq!(edit_distance("linger", "lingerms"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
