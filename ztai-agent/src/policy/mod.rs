//! Segment policy: YAML file → checked [`Policy`] → kernel map entries.
//!
//! [`load_policy`] / [`parse_policy_str`] read and validate a policy file and
//! report every problem as a positioned [`Diagnostic`]; [`compile`] turns a
//! valid policy into the entries of the rule and cidr maps.

pub mod compile;
mod model;
mod overlap;
mod parse;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

pub use compile::{CompiledPolicy, compile, describe_ports};
pub use model::{CgroupSelector, Mode, Policy, PortSpec, Rule, Segment};
pub use ztai_common::SegmentId;

/// `apiVersion` every policy file must declare.
pub const API_VERSION: &str = "ztai.dev/v1alpha1";
/// `kind` every policy file must declare.
pub const KIND: &str = "SegmentPolicy";

/// A position in a policy file; both fields are 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub line: usize,
    pub column: usize,
}

impl Span {
    /// Start of the file: where problems without a better position are reported.
    pub const START: Span = Span { line: 1, column: 1 };
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// One problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// The name the file was given to the parser (usually its path).
    pub file: String,
    pub span: Span,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.file, self.span.line, self.span.column, self.severity, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `diagnostics` holds the warnings too, sorted by position.
    #[error("policy {path} is invalid ({} error(s))", error_count(.diagnostics))]
    Invalid { path: PathBuf, diagnostics: Vec<Diagnostic> },
}

fn error_count(diagnostics: &[Diagnostic]) -> usize {
    diagnostics.iter().filter(|d| d.is_error()).count()
}

/// A policy that passed every check, with the warnings found on the way.
#[derive(Clone, Debug)]
pub struct Checked {
    pub policy: Policy,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and checks the policy file at `path`.
pub fn load_policy(path: &Path) -> Result<Checked, PolicyError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.to_path_buf(), source })?;
    parse_policy_str(&path.display().to_string(), &text)
        .map_err(|diagnostics| PolicyError::Invalid { path: path.to_path_buf(), diagnostics })
}

/// Checks a policy given as text. `file` is the name used in diagnostics.
///
/// On failure every diagnostic (errors and warnings) is returned, sorted by
/// position.
pub fn parse_policy_str(file: &str, text: &str) -> Result<Checked, Vec<Diagnostic>> {
    parse::parse(file, text)
}
