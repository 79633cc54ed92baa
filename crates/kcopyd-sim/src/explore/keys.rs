//! The scenario as a tree of TOML values, before it becomes typed: units by key suffix, and
//! edits by dotted path (what `sweep --vary` and `run --set` change).
//!
//! ```text
//!  "client.subjob_size_bytes" = "64K"
//!     │      └ the key ends in _bytes: "64K" → 65536 (a size)
//!     └ a table: created if absent
//!  "jobs.0.len_sectors" = "1G"      an array index; _sectors: 1 GiB / 512 → 2097152
//!  "disks.hdd.latency.read.cost_us" = "8ms"   _us: a duration → 8000
//! ```
//!
//! A string value under a key ending in `_bytes`, `_bytes_per_s`, `_sectors` (or `_sector`) or
//! `_us` is read as a size, a rate, a sector count (the size over 512) or a duration ([`units`](crate::units)); numbers stay as they are. Keys
//! that do not exist are not refused here: the typed scenario refuses them when it is read,
//! naming the key (`deny_unknown_fields`).

use std::path::Path;

use toml::Value;

use crate::units::{self, SECTOR_BYTES, SizeError};

use super::ScenarioError;

/// Keys renamed since scenario files were first written, old name first: a file or an edit
/// may still use the old spelling, read as the new one (one concept, one name: `subjob`).
pub const RENAMED_KEYS: [(&str, &str); 1] = [("sub_job_size_bytes", "subjob_size_bytes")];

/// The current name of `key` (itself unless it is an old name in [`RENAMED_KEYS`]).
fn current_key(key: &str) -> &str {
    RENAMED_KEYS.iter().find(|(old, _)| *old == key).map_or(key, |(_, new)| new)
}

/// Renames every old key of [`RENAMED_KEYS`] in `value`'s tables to its current name.
///
/// # Errors
/// A table with a key under both its old and its current name.
pub(crate) fn rename_old_keys(value: &mut Value, path: &str) -> Result<(), ScenarioError> {
    let child_path = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match value {
        Value::Table(table) => {
            for (old, new) in RENAMED_KEYS {
                let Some(moved) = table.remove(old) else { continue };
                if table.contains_key(new) {
                    let problem = format!("given twice, also under its old name '{old}'");
                    return Err(ScenarioError::Key { key: child_path(new), problem });
                }
                table.insert(new.to_owned(), moved);
            }
            for (key, child) in table.iter_mut() {
                rename_old_keys(child, &child_path(key))?;
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                rename_old_keys(child, &child_path(&i.to_string()))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// What a string under a key means, from the key's unit suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    BytesPerSecond,
    Sectors,
    Microseconds,
}

fn unit_of(key: &str) -> Option<Unit> {
    if key.ends_with("_bytes_per_s") {
        Some(Unit::BytesPerSecond)
    } else if key.ends_with("_bytes") {
        Some(Unit::Bytes)
    } else if key.ends_with("_sectors") || key.ends_with("_sector") {
        Some(Unit::Sectors)
    } else if key.ends_with("_us") {
        Some(Unit::Microseconds)
    } else {
        None
    }
}

/// Reads `text` in the unit of `key`.
fn convert(path: &str, unit: Unit, text: &str) -> Result<i64, ScenarioError> {
    let unit_error = |source: SizeError| ScenarioError::Unit { key: path.to_owned(), source };
    let value = match unit {
        Unit::Bytes => units::parse_size(text).map_err(unit_error)?,
        Unit::BytesPerSecond => units::parse_rate(text).map_err(unit_error)?,
        Unit::Microseconds => units::parse_duration_us(text).map_err(unit_error)?,
        Unit::Sectors => {
            let bytes = units::parse_size(text).map_err(unit_error)?;
            if bytes % SECTOR_BYTES != 0 {
                return Err(ScenarioError::Key {
                    key: path.to_owned(),
                    problem: format!("'{text}' is not a whole number of 512-byte sectors"),
                });
            }
            bytes / SECTOR_BYTES
        }
    };
    i64::try_from(value)
        .map_err(|_| ScenarioError::Key { key: path.to_owned(), problem: format!("'{text}' is too large") })
}

/// Replaces every string under a unit-suffixed key by its number, in place.
pub(crate) fn normalize_units(value: &mut Value) -> Result<(), ScenarioError> {
    normalize_at(value, "", None)
}

fn normalize_at(value: &mut Value, path: &str, unit: Option<Unit>) -> Result<(), ScenarioError> {
    match value {
        Value::String(text) => {
            if let Some(unit) = unit {
                *value = Value::Integer(convert(path, unit, text)?);
            }
        }
        Value::Table(table) => {
            for (key, child) in table.iter_mut() {
                let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                normalize_at(child, &child_path, unit_of(key))?;
            }
        }
        Value::Array(items) => {
            // An array under a unit key (e.g. a list of sizes) takes the key's unit.
            for (i, child) in items.iter_mut().enumerate() {
                normalize_at(child, &format!("{path}.{i}"), unit)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replaces each disk's `model = "FILE.toml"` (relative to `base`) by the model's timing:
/// the model's `latency` table with the disk's own `latency` keys over it, and, for a model
/// measured as `one_device`, `medium = "FILE.toml"` unless the disk names one.
pub(crate) fn inline_models(tree: &mut Value, base: &Path) -> Result<(), ScenarioError> {
    let Some(Value::Table(disks)) = tree.get_mut("disks") else { return Ok(()) };
    for (name, disk) in disks.iter_mut() {
        let Value::Table(disk) = disk else { continue };
        let Some(model) = disk.remove("model") else { continue };
        let Value::String(path) = model else {
            return Err(ScenarioError::Key { key: format!("disks.{name}.model"), problem: "not a file name".into() });
        };
        let model_error = |problem: String| ScenarioError::Model { disk: name.clone(), path: path.clone(), problem };
        let text = std::fs::read_to_string(base.join(&path)).map_err(|e| model_error(e.to_string()))?;
        // Read as the simulator's own type first: unknown keys and wrong types are refused.
        let typed: crate::DiskModel = toml::from_str(&text).map_err(|e| model_error(e.to_string()))?;
        let mut latency = text
            .parse::<toml::Table>()
            .map_err(|e| model_error(e.to_string()))?
            .remove("latency")
            .unwrap_or_else(|| Value::Table(toml::Table::new()));
        if let Some(own) = disk.remove("latency") {
            merge(&mut latency, own);
        }
        disk.insert("latency".into(), latency);
        if typed.one_device {
            disk.entry("medium").or_insert_with(|| Value::String(path.clone()));
        }
    }
    Ok(())
}

/// Puts every key of `over` into `under`, tables merged key by key.
fn merge(under: &mut Value, over: Value) {
    match (under, over) {
        (Value::Table(under), Value::Table(over)) => {
            for (key, value) in over {
                match under.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        under.insert(key, value);
                    }
                }
            }
        }
        (under, over) => *under = over,
    }
}

/// A value typed on the command line: anything TOML reads as a value (`true`, `12`, `0.5`,
/// `["a", "b"]`, `{ cost_us = 10 }`, `"text"`), or else the text as a string (which the
/// scenario reads by the unit of its key, e.g. `64K` under `_bytes`: see the module notes).
pub fn parse_value(text: &str) -> Value {
    let text = text.trim();
    match format!("value = {text}").parse::<toml::Table>() {
        Ok(mut table) => table.remove("value").unwrap_or_else(|| Value::String(text.to_owned())),
        Err(_) => Value::String(text.to_owned()),
    }
}

/// Sets the value at dotted `path` (tables by key, arrays by index), creating missing tables.
/// A key's old name ([`RENAMED_KEYS`]) sets the key under its current name.
///
/// # Errors
/// An empty path or segment, a path through a value that is not a table or array, or an array
/// index past the end.
pub fn set_path(root: &mut Value, path: &str, new: Value) -> Result<(), ScenarioError> {
    let key_error = |problem: String| ScenarioError::Key { key: path.to_owned(), problem };
    let segments: Vec<&str> = path.split('.').map(current_key).collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        return Err(key_error("empty key segment".into()));
    }
    let (last, parents) = segments.split_last().expect("split gives at least one segment");
    let mut node = root;
    for (depth, segment) in parents.iter().enumerate() {
        let walked = segments[..=depth].join(".");
        node = match node {
            Value::Table(table) => table.entry(segment.to_string()).or_insert_with(|| Value::Table(toml::Table::new())),
            Value::Array(items) => {
                let index = array_index(segment, items.len()).map_err(|p| key_error(format!("{walked}: {p}")))?;
                &mut items[index]
            }
            other => return Err(key_error(format!("'{walked}' is a {}, not a table", other.type_str()))),
        };
    }
    match node {
        Value::Table(table) => {
            table.insert(last.to_string(), new);
        }
        Value::Array(items) => {
            let index = array_index(last, items.len()).map_err(|bad| key_error(bad.to_string()))?;
            items[index] = new;
        }
        other => return Err(key_error(format!("its parent is a {}, not a table", other.type_str()))),
    }
    Ok(())
}

fn array_index(segment: &str, len: usize) -> Result<usize, BadIndex> {
    match segment.parse::<usize>() {
        Ok(index) if index < len => Ok(index),
        Ok(index) => Err(BadIndex::PastTheEnd { index, len }),
        Err(_) => Err(BadIndex::NotAnIndex(segment.to_owned())),
    }
}

/// Why a key segment does not pick an item of a list.
#[derive(Debug, thiserror::Error)]
enum BadIndex {
    #[error("index {index} past the end of a list of {len}")]
    PastTheEnd { index: usize, len: usize },
    #[error("'{0}' is not an index into a list")]
    NotAnIndex(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(text: &str) -> Value {
        Value::Table(text.parse::<toml::Table>().expect("valid toml"))
    }

    #[test]
    fn strings_under_unit_keys_become_numbers() {
        let mut value = tree(
            "[client]\nsubjob_size_bytes = \"64K\"\n[d.x]\nlen_sectors = \"1M\"\ncost_us = \"8ms\"\n\
             bandwidth_bytes_per_s = \"100M/s\"\nname = \"64K\"\nsizes_bytes = [\"4K\", 8192]\n",
        );
        normalize_units(&mut value).unwrap();
        assert_eq!(value["client"]["subjob_size_bytes"].as_integer(), Some(65536));
        assert_eq!(value["d"]["x"]["len_sectors"].as_integer(), Some(2048));
        assert_eq!(value["d"]["x"]["cost_us"].as_integer(), Some(8000));
        assert_eq!(value["d"]["x"]["bandwidth_bytes_per_s"].as_integer(), Some(100 << 20));
        assert_eq!(value["d"]["x"]["name"].as_str(), Some("64K"), "no unit suffix: left alone");
        assert_eq!(value["d"]["x"]["sizes_bytes"].as_array().unwrap()[0].as_integer(), Some(4096));
    }

    #[test]
    fn bad_units_name_the_key() {
        let mut value = tree("[x]\nlen_sectors = \"100\"\n");
        let error = normalize_units(&mut value).unwrap_err().to_string();
        assert!(error.contains("x.len_sectors") && error.contains("512-byte"), "{error}");
        let mut value = tree("[x]\ncost_us = \"8\"\n");
        assert!(normalize_units(&mut value).unwrap_err().to_string().contains("x.cost_us"));
    }

    #[test]
    fn paths_edit_tables_and_lists() {
        let mut value = tree("seed = 1\n[[jobs]]\nlen_sectors = 8\n");
        set_path(&mut value, "client.subjobs_in_flight", parse_value("4")).unwrap();
        set_path(&mut value, "jobs.0.len_sectors", parse_value("1M")).unwrap();
        normalize_units(&mut value).unwrap();
        assert_eq!(value["client"]["subjobs_in_flight"].as_integer(), Some(4));
        assert_eq!(value["jobs"][0]["len_sectors"].as_integer(), Some(2048));
        assert!(
            set_path(&mut value, "jobs.3.len_sectors", parse_value("1"))
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
        assert!(set_path(&mut value, "seed.x", parse_value("1")).unwrap_err().to_string().contains("integer"));
        assert!(set_path(&mut value, "client..x", parse_value("1")).is_err());
    }

    #[test]
    fn tables_merge_key_by_key() {
        let mut under = tree("[read]\ncost_us = 60\nqueue_depth = 32\n[write]\ncost_us = 60\n");
        merge(&mut under, tree("[read]\ncost_us = 10\n[path]\nshared = true\n"));
        assert_eq!(under["read"]["cost_us"].as_integer(), Some(10));
        assert_eq!(under["read"]["queue_depth"].as_integer(), Some(32));
        assert_eq!(under["write"]["cost_us"].as_integer(), Some(60));
        assert_eq!(under["path"]["shared"].as_bool(), Some(true));
    }

    #[test]
    fn command_line_values_take_their_type() {
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("12"), Value::Integer(12));
        assert_eq!(parse_value("0.5"), Value::Float(0.5));
        assert_eq!(parse_value("512K"), Value::String("512K".into()));
        assert_eq!(parse_value("8ms"), Value::String("8ms".into()));
        assert_eq!(parse_value("nvme"), Value::String("nvme".into()));
        let list = parse_value(r#"["nvme", "ssd"]"#);
        assert_eq!(list.as_array().map(Vec::len), Some(2));
        assert_eq!(parse_value("{ cost_us = 10 }")["cost_us"].as_integer(), Some(10));
    }
}
