//! Pieces of the command-line tool that are worth testing without a process: the exit-code
//! convention and reading a run's settings from a TOML file.

use crate::train::Settings;
use std::path::Path;

/// An error with the exit code it deserves: 2 for bad input (flags, data files, checkpoints
/// given), 1 for a failure during a run.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn input(message: impl std::fmt::Display) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }
    pub fn run(message: impl std::fmt::Display) -> Self {
        Self {
            code: 1,
            message: message.to_string(),
        }
    }
}

pub use crate::train::settings::limits;

/// Reads a run's settings from a TOML file (`train --config FILE`): the same names as the
/// flags, in snake_case. Errors name the file (and the line, for syntax errors); values the
/// flags bound are checked against the same bounds.
///
/// ```toml
/// recipe = "fast"
/// epochs = 30
/// stem = "seed3x3"
/// val_split = 5000
/// ```
pub fn read_settings_file(path: &Path) -> Result<Settings, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let file: Settings = toml::from_str(&text).map_err(|e| {
        let msg = e
            .to_string()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        CliError::input(format!("{}: {msg}", path.display()))
    })?;
    if let Some((key, what)) = file.bad_value() {
        return Err(CliError::input(format!("{}: {key} {what}", path.display())));
    }
    for (key, value, (min, max)) in file.bounded() {
        if let Some(v) = value.filter(|v| !(min..=max).contains(v)) {
            let allowed = match max {
                u64::MAX => format!("at least {min}"),
                _ => format!("{min} to {max}"),
            };
            return Err(CliError::input(format!(
                "{}: {key} must be {allowed}, got {v}",
                path.display()
            )));
        }
    }
    Ok(file)
}
