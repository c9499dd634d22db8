//! A problem found while loading a policy: where it is and what is wrong.

use std::fmt;

/// One thing wrong with a policy directory. Loading reports every problem at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// File name inside the policy directory (`policy.csv`, `taxonomy.toml`, ...).
    pub file: String,
    /// 1-based line, when the problem sits on one.
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    /// Where it is: `file:line`, or the file alone.
    pub fn location(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", self.file),
            None => self.file.clone(),
        }
    }

    pub fn at(file: &str, line: usize, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line: Some(line),
            message: message.into(),
        }
    }

    pub fn in_file(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem of a policy that could not be loaded, in file and line order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} problem{}", if n == 1 { "" } else { "s" })?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Turns a byte offset into a 1-based line number.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The 1-based line a YAML parser's error names, kept inside `text`: at the end of the input
/// serde_yaml names the line after the last one (or further), which no editor can show.
pub fn yaml_error_line(text: &str, line: usize) -> usize {
    let last = text.lines().count().max(1);
    line.clamp(1, last)
}
