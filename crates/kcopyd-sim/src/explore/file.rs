//! A scenario file as a command reads it: the text, `KEY=VALUE` edits on its value tree, and
//! the folder its relative paths (disk images, models) are resolved from.
//!
//! ```text
//!  path ─► read ─► parse_tree ─► set_path per "KEY=VALUE" ─► Value ─► Scenario::from_value_in
//!                                                                      (folder_of(path))
//! ```

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use toml::Value;

use crate::explore::{ScenarioError, parse_tree, parse_value, set_path};

/// Why a scenario file could not be read or edited.
#[derive(Debug, Error)]
pub enum ScenarioFileError {
    /// The file could not be read.
    #[error("scenario '{}': {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An edit is not `KEY=VALUE`.
    #[error("edit '{edit}': not KEY=VALUE")]
    Edit {
        /// The edit as given.
        edit: String,
    },
    /// The text or an edit does not fit the scenario.
    #[error("scenario '{}': {source}", path.display())]
    Scenario {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ScenarioError,
    },
}

/// The folder a scenario file's relative paths are resolved from: its own (`.` for a bare
/// file name).
pub fn folder_of(scenario: &Path) -> PathBuf {
    match scenario.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The scenario file at `path` as a value tree, with the `KEY=VALUE` `edits` applied in order.
///
/// # Errors
/// The file cannot be read, does not parse, or an edit is malformed or does not fit.
pub fn read_tree(path: &Path, edits: &[String]) -> Result<Value, ScenarioFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioFileError::Read { path: path.into(), source })?;
    let scenario_error = |source| ScenarioFileError::Scenario { path: path.into(), source };
    let mut tree = parse_tree(&text).map_err(scenario_error)?;
    for edit in edits {
        let (key, value) = edit.split_once('=').ok_or_else(|| ScenarioFileError::Edit { edit: edit.clone() })?;
        set_path(&mut tree, key.trim(), parse_value(value)).map_err(scenario_error)?;
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_name_resolves_from_here_and_a_bad_edit_is_named() {
        assert_eq!(folder_of(Path::new("s.toml")), PathBuf::from("."));
        assert_eq!(folder_of(Path::new("/x/s.toml")), PathBuf::from("/x"));
        let path = std::env::temp_dir().join(format!("kcopyd-sim-file-{}.toml", std::process::id()));
        std::fs::write(&path, "[client]\n").unwrap();
        let refused = read_tree(&path, &["client.subjobs_in_flight".into()]);
        assert!(matches!(refused, Err(ScenarioFileError::Edit { .. })), "{refused:?}");
        let tree = read_tree(&path, &["client.subjobs_in_flight = 3".into()]).unwrap();
        assert_eq!(tree["client"]["subjobs_in_flight"].as_integer(), Some(3));
        std::fs::remove_file(&path).unwrap();
        let missing = read_tree(&path, &[]);
        assert!(matches!(missing, Err(ScenarioFileError::Read { .. })), "{missing:?}");
    }
}
