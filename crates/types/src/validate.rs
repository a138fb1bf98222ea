//! Validation errors: every problem found in an input, each naming its field.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// One problem with an input value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Invalid {
    /// Path of the field, e.g. `disks[1].bus`.
    pub field: String,
    pub reason: String,
}

/// All problems found in one input (never empty when returned as an error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<Invalid>);

impl ValidationErrors {
    pub fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Invalid {
            field: field.into(),
            reason: reason.into(),
        });
    }
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Invalid input: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Names of VMs, pools, volumes and bridges: 1–63 characters of `[A-Za-z0-9_.-]`,
/// starting with a letter or digit (so never `.`/`..` and never a path).
pub fn check_name(errs: &mut ValidationErrors, field: &str, name: &str) {
    if name.is_empty() || name.len() > 63 {
        errs.push(field, "must be 1 to 63 characters long");
        return;
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        errs.push(field, "must start with a letter or digit");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        errs.push(
            field,
            format!("contains {c:?}; only letters, digits, '-', '_' and '.' are allowed"),
        );
    }
}

/// Linux interface names: 1–15 bytes, no `/`, whitespace or `:`.
pub fn check_ifname(errs: &mut ValidationErrors, field: &str, name: &str) {
    if name.is_empty() || name.len() > 15 {
        errs.push(field, "interface names are 1 to 15 characters long");
    } else if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        errs.push(field, "not a valid interface name");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_name_rejects_paths_and_dots() {
        for bad in ["", "../etc", "a/b", ".hidden", "..", "x y", &"a".repeat(64)] {
            let mut e = ValidationErrors::default();
            check_name(&mut e, "name", bad);
            assert!(!e.0.is_empty(), "{bad:?} accepted");
        }
        let mut e = ValidationErrors::default();
        check_name(&mut e, "name", "web-1.example_a");
        assert!(e.0.is_empty());
    }
}
