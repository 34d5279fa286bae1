//! Truth tables: the expected matrix of a `Probe` (parsed from the scenario, see
//! `../shared/SCENARIOS.md`) and the observed result of running it (compared, printed).
//!
//! Format: the first row starts with `*` and lists the columns (servers, `to`); every following
//! row is a client (`from`) name and one mark per column: `.` connects, `X` does not, `-` not
//! probed. Whitespace is free; only the tokens count; blank lines are ignored.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::json;

use crate::scenario::Family;

/// One cell of a truth table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mark {
    /// `.`: the connection succeeds.
    Allowed,
    /// `X`: the connection does not succeed.
    Denied,
    /// `-`: not probed (always the case for a pod with itself).
    NotProbed,
}

impl Mark {
    /// The token of this mark: `.`, `X` or `-`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Allowed => ".",
            Mark::Denied => "X",
            Mark::NotProbed => "-",
        }
    }

    /// The mark written as `token`, if it is one (`.`, `X` or `-`; case matters).
    pub fn from_token(token: &str) -> Option<Mark> {
        match token {
            "." => Some(Mark::Allowed),
            "X" => Some(Mark::Denied),
            "-" => Some(Mark::NotProbed),
            _ => None,
        }
    }

    /// The mark observed for a cell given what happened per probed family: `.` when every
    /// family connected, `X` when any failed, `None` when no family was probed.
    pub fn from_families(families: &[(Family, bool)]) -> Option<Mark> {
        if families.is_empty() {
            None
        } else if families.iter().all(|&(_, ok)| ok) {
            Some(Mark::Allowed)
        } else {
            Some(Mark::Denied)
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A truth table: columns are servers (`to`), rows are clients (`from`), in the order written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<Mark>)>,
}

impl Matrix {
    /// Parses the scenario format. Errors name the line of the matrix text (1-based, blank lines
    /// included) and the row/column at fault. Names are any tokens other than `*`; a name is
    /// listed at most once among the columns and at most once among the rows. At least one
    /// column and one row are required.
    pub fn parse(text: &str) -> Result<Matrix, String> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.split_whitespace().collect::<Vec<_>>()))
            .filter(|(_, tokens)| !tokens.is_empty());

        let Some((header_line, header)) = lines.next() else {
            return Err(
                "empty matrix: expected a header row starting with * and listing the columns"
                    .to_string(),
            );
        };
        if header[0] != "*" {
            return Err(format!(
                "matrix line {header_line}: the header row must start with * (found {:?})",
                header[0]
            ));
        }
        let columns: Vec<String> = header[1..].iter().map(|s| s.to_string()).collect();
        if columns.is_empty() {
            return Err(format!(
                "matrix line {header_line}: the header row lists no columns"
            ));
        }
        let mut seen = HashSet::new();
        for (i, column) in columns.iter().enumerate() {
            if column == "*" {
                return Err(format!(
                    "matrix line {header_line}: column {}: * is not a name",
                    i + 1
                ));
            }
            if !seen.insert(column.as_str()) {
                return Err(format!(
                    "matrix line {header_line}: column {column} is listed twice"
                ));
            }
        }

        let mut rows: Vec<(String, Vec<Mark>)> = Vec::new();
        let mut seen = HashSet::new();
        for (line, tokens) in lines {
            let name = tokens[0];
            if name == "*" {
                return Err(format!(
                    "matrix line {line}: only the first row starts with * (found a second header row)"
                ));
            }
            if !seen.insert(name) {
                return Err(format!("matrix line {line}: row {name} is listed twice"));
            }
            let tokens = &tokens[1..];
            if tokens.len() != columns.len() {
                return Err(format!(
                    "matrix line {line}: row {name} has {} marks, expected {} (one per column)",
                    tokens.len(),
                    columns.len()
                ));
            }
            let marks = tokens
                .iter()
                .zip(&columns)
                .map(|(token, column)| {
                    Mark::from_token(token).ok_or_else(|| {
                        format!(
                            "matrix line {line}: row {name}, column {column}: unknown mark {token:?} (expected ., X or -)"
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            rows.push((name.to_string(), marks));
        }
        if rows.is_empty() {
            return Err("the matrix has no rows (one per client pod)".to_string());
        }
        Ok(Matrix { columns, rows })
    }

    /// The mark for client `from` and server `to`, if both are in the matrix.
    pub fn get(&self, from: &str, to: &str) -> Option<Mark> {
        let column = self.columns.iter().position(|c| c == to)?;
        let (_, marks) = self.rows.iter().find(|(name, _)| name == from)?;
        marks.get(column).copied()
    }

    /// The row names (clients), in order.
    pub fn row_names(&self) -> impl Iterator<Item = &str> {
        self.rows.iter().map(|(name, _)| name.as_str())
    }

    /// Every cell as `(from, to, mark)`, row by row.
    pub fn cells(&self) -> impl Iterator<Item = (&str, &str, Mark)> {
        self.rows.iter().flat_map(move |(from, marks)| {
            self.columns
                .iter()
                .zip(marks)
                .map(move |(to, &mark)| (from.as_str(), to.as_str(), mark))
        })
    }
}

/// The matrix in the scenario format, aligned, one line per row, each line ending in `\n`.
/// `Matrix::parse` of this text gives the matrix back.
impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<(&str, Vec<String>)> = self
            .rows
            .iter()
            .map(|(name, marks)| {
                (
                    name.as_str(),
                    marks.iter().map(|m| m.as_str().to_string()).collect(),
                )
            })
            .collect();
        f.write_str(&render_grid(&self.columns, &rows))
    }
}

/// Lays out a header (`*` and the columns) and rows of tokens, each column padded to its widest
/// token with two spaces between columns, no trailing spaces, each line ending in `\n`.
fn render_grid(columns: &[String], rows: &[(&str, Vec<String>)]) -> String {
    let mut widths = Vec::with_capacity(columns.len() + 1);
    widths.push(rows.iter().map(|(name, _)| name.len()).fold(1, usize::max));
    for (i, column) in columns.iter().enumerate() {
        let widest = rows
            .iter()
            .filter_map(|(_, tokens)| tokens.get(i))
            .map(|t| t.len())
            .fold(column.len(), usize::max);
        widths.push(widest);
    }
    let mut out = String::new();
    let mut line = |tokens: Vec<&str>| {
        let mut text = String::new();
        for (token, width) in tokens.iter().zip(&widths) {
            text.push_str(&format!("{token:<width$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(
        std::iter::once("*")
            .chain(columns.iter().map(String::as_str))
            .collect(),
    );
    for (name, tokens) in rows {
        line(
            std::iter::once(*name)
                .chain(tokens.iter().map(String::as_str))
                .collect(),
        );
    }
    out
}

/// One cell of a probe's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// The client pod (`namespace/name`).
    pub from: String,
    /// The server pod (`namespace/name`).
    pub to: String,
    pub expected: Mark,
    /// `.` if every probed family connected, `X` if any failed; `None` if not probed/skipped.
    pub observed: Option<Mark>,
    /// What happened per family probed, e.g. `[(IPv4, true), (IPv6, false)]`.
    pub families: Vec<(Family, bool)>,
    /// Why, in a few words (e.g. `timeout`, `connection refused`), when there is something to say.
    pub detail: Option<String>,
}

/// How a cell counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Expected `-`: never probed, never counts.
    NotProbed,
    /// The probe was skipped as a whole (see `Report::skipped`).
    Skipped,
    /// Observed as expected.
    Passed,
    /// Observed otherwise, or not observed although the probe ran.
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::NotProbed => "not-probed",
            Outcome::Skipped => "skipped",
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
        }
    }
}

impl Cell {
    /// A cell not observed yet.
    pub fn new(from: &str, to: &str, expected: Mark) -> Cell {
        Cell {
            from: from.to_string(),
            to: to.to_string(),
            expected,
            observed: None,
            families: Vec::new(),
            detail: None,
        }
    }

    /// How this cell counts in a report that was (`skipped`) or was not skipped. A cell expected
    /// `-` never counts; in a probe that ran, a cell expected `.`/`X` passes only if observed so
    /// (a cell left unobserved fails).
    pub fn outcome(&self, skipped: bool) -> Outcome {
        if self.expected == Mark::NotProbed {
            Outcome::NotProbed
        } else if skipped {
            Outcome::Skipped
        } else if self.observed == Some(self.expected) {
            Outcome::Passed
        } else {
            Outcome::Failed
        }
    }

    /// `from -> to: expected ., observed X (IPv6 failed: timeout)`.
    fn mismatch_line(&self) -> String {
        let observed = match self.observed {
            Some(mark) => format!("observed {mark}"),
            None => "not observed".to_string(),
        };
        let wanted = self.observed != Some(Mark::Allowed);
        let families: Vec<String> = self
            .families
            .iter()
            .filter(|&&(_, ok)| ok != wanted)
            .map(|(family, ok)| format!("{family} {}", if *ok { "connected" } else { "failed" }))
            .collect();
        let mut note = families.join(", ");
        if let Some(detail) = self.detail.as_deref().filter(|d| !d.is_empty()) {
            if note.is_empty() {
                note = detail.to_string();
            } else {
                note = format!("{note}: {detail}");
            }
        }
        let note = if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        };
        format!(
            "{} -> {}: expected {}, {observed}{note}",
            self.from, self.to, self.expected
        )
    }
}

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// E.g. `document 14: TCP/80`.
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<String>,
    pub cells: Vec<Cell>,
    /// The probe as a whole was not run (e.g. SCTP without kernel support, `via: service` in the lab).
    pub skipped: bool,
    pub skip_reason: Option<String>,
}

impl Report {
    /// A report with the rows, columns and expected marks of `expect`, nothing observed yet.
    pub fn from_expected(title: impl Into<String>, expect: &Matrix) -> Report {
        Report {
            title: title.into(),
            columns: expect.columns.clone(),
            rows: expect.row_names().map(str::to_string).collect(),
            cells: expect
                .cells()
                .map(|(from, to, mark)| Cell::new(from, to, mark))
                .collect(),
            skipped: false,
            skip_reason: None,
        }
    }

    /// Marks the whole probe skipped, for `reason`.
    pub fn skip(&mut self, reason: impl Into<String>) {
        self.skipped = true;
        self.skip_reason = Some(reason.into());
    }

    /// Records what happened for one cell: the observed mark follows from `families`
    /// (see `Mark::from_families`). Returns false if the report has no such cell.
    pub fn observe(
        &mut self,
        from: &str,
        to: &str,
        families: Vec<(Family, bool)>,
        detail: Option<String>,
    ) -> bool {
        match self.cells.iter_mut().find(|c| c.from == from && c.to == to) {
            Some(cell) => {
                cell.observed = Mark::from_families(&families);
                cell.families = families;
                cell.detail = detail;
                true
            }
            None => false,
        }
    }

    /// Cells that count and were observed as expected (0 for a skipped probe).
    pub fn passed(&self) -> usize {
        self.count(Outcome::Passed)
    }

    /// Cells that count and were not observed as expected (0 for a skipped probe).
    pub fn failed(&self) -> usize {
        self.count(Outcome::Failed)
    }

    /// Cells that would have counted had the probe not been skipped (0 if it ran).
    pub fn skipped_cells(&self) -> usize {
        self.count(Outcome::Skipped)
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.cells
            .iter()
            .filter(|c| c.outcome(self.skipped) == outcome)
            .count()
    }

    fn cell(&self, from: &str, to: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.from == from && c.to == to)
    }

    /// The tokens of the matrix as printed: for a probe that ran, the observed mark of each cell
    /// (`-` where expected `-`), followed by `!` when it fails (`?!` when not observed); for a
    /// skipped probe, the expected marks. A cell missing from `cells` prints as `-`.
    fn grid(&self) -> Vec<(&str, Vec<String>)> {
        let index: HashMap<(&str, &str), &Cell> = self
            .cells
            .iter()
            .map(|c| ((c.from.as_str(), c.to.as_str()), c))
            .collect();
        self.rows
            .iter()
            .map(|row| {
                let tokens = self
                    .columns
                    .iter()
                    .map(|column| match index.get(&(row.as_str(), column.as_str())) {
                        None => Mark::NotProbed.as_str().to_string(),
                        Some(cell) => match cell.outcome(self.skipped) {
                            Outcome::NotProbed | Outcome::Skipped => cell.expected.to_string(),
                            Outcome::Passed => cell.expected.to_string(),
                            Outcome::Failed => match cell.observed {
                                Some(mark) => format!("{mark}!"),
                                None => "?!".to_string(),
                            },
                        },
                    })
                    .collect();
                (row.as_str(), tokens)
            })
            .collect()
    }

    /// The failing cells, in row/column order.
    fn failures(&self) -> Vec<&Cell> {
        let mut out = Vec::new();
        for row in &self.rows {
            for column in &self.columns {
                if let Some(cell) = self.cell(row, column) {
                    if cell.outcome(self.skipped) == Outcome::Failed {
                        out.push(cell);
                    }
                }
            }
        }
        // Failing cells outside the rows/columns still count: list them too.
        for cell in &self.cells {
            if cell.outcome(self.skipped) == Outcome::Failed
                && !(self.rows.contains(&cell.from) && self.columns.contains(&cell.to))
            {
                out.push(cell);
            }
        }
        out
    }

    /// The title line, then the observed matrix in the scenario format, aligned; a mismatching
    /// cell is printed as its observed mark followed by `!` (`X!`, `.!`; `?!` if it was not
    /// observed) and listed under the matrix as
    /// `x/b -> x/a: expected ., observed X (IPv6 failed: timeout)`. A skipped probe prints the
    /// expected matrix followed by `skipped: <reason>`. Every line ends in `\n`.
    pub fn render_text(&self) -> String {
        let mut out = format!("{}\n", self.title);
        out.push_str(&render_grid(&self.columns, &self.grid()));
        if self.skipped {
            match self.skip_reason.as_deref().filter(|r| !r.is_empty()) {
                Some(reason) => out.push_str(&format!("skipped: {reason}\n")),
                None => out.push_str("skipped\n"),
            }
        } else {
            for cell in self.failures() {
                out.push_str(&cell.mismatch_line());
                out.push('\n');
            }
        }
        out
    }

    /// The report for machines:
    /// `{title, skipped, skip_reason, passed, failed, skipped_cells, columns, rows, matrix,
    ///   cells: [{from, to, expected, observed, families: {"IPv4": true, ...}, detail, outcome}],
    ///   mismatches: [text]}` where `matrix` is the matrix as `render_text` prints it, marks are
    /// `.`/`X`/`-` strings (`observed` null when not observed) and `outcome` is one of
    /// `passed`, `failed`, `skipped`, `not-probed`.
    pub fn to_json(&self) -> serde_json::Value {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .map(|c| {
                let families: serde_json::Map<String, serde_json::Value> = c
                    .families
                    .iter()
                    .map(|(family, ok)| (family.to_string(), serde_json::Value::Bool(*ok)))
                    .collect();
                json!({
                    "from": c.from,
                    "to": c.to,
                    "expected": c.expected.as_str(),
                    "observed": c.observed.map(Mark::as_str),
                    "families": families,
                    "detail": c.detail,
                    "outcome": c.outcome(self.skipped).as_str(),
                })
            })
            .collect();
        let mismatches: Vec<String> = if self.skipped {
            Vec::new()
        } else {
            self.failures().iter().map(|c| c.mismatch_line()).collect()
        };
        json!({
            "title": self.title,
            "skipped": self.skipped,
            "skip_reason": self.skip_reason,
            "passed": self.passed(),
            "failed": self.failed(),
            "skipped_cells": self.skipped_cells(),
            "columns": self.columns,
            "rows": self.rows,
            "matrix": render_grid(&self.columns, &self.grid()),
            "cells": cells,
            "mismatches": mismatches,
        })
    }
}

/// The summary line exactly: `N passed, N failed` (cells), plus `, N skipped` when `skipped > 0`.
pub fn summary_line(passed: usize, failed: usize, skipped: usize) -> String {
    if skipped > 0 {
        format!("{passed} passed, {failed} failed, {skipped} skipped")
    } else {
        format!("{passed} passed, {failed} failed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Family::{V4 as IPv4, V6 as IPv6};

    /// Case 1 of the examples (default deny ingress in x).
    const DENY_INGRESS: &str = "
    *    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c
    x/a  -    X    X    .    .    .    .    .    .
    x/b  X    -    X    .    .    .    .    .    .
    x/c  X    X    -    .    .    .    .    .    .
    y/a  X    X    X    -    .    .    .    .    .
    y/b  X    X    X    .    -    .    .    .    .
    y/c  X    X    X    .    .    -    .    .    .
    z/a  X    X    X    .    .    .    -    .    .
    z/b  X    X    X    .    .    .    .    -    .
    z/c  X    X    X    .    .    .    .    .    -
";

    /// Case 21 of the examples, after y is relabelled.
    const UPDATED_NS: &str = "*    x/a  x/b  x/c  y/a  y/b  y/c  z/a  z/b  z/c
x/a  -    .    .    .    .    .    .    .    .
x/b  X    -    .    .    .    .    .    .    .
x/c  X    .    -    .    .    .    .    .    .
y/a  .    .    .    -    .    .    .    .    .
y/b  .    .    .    .    -    .    .    .    .
y/c  .    .    .    .    .    -    .    .    .
z/a  X    .    .    .    .    .    -    .    .
z/b  X    .    .    .    .    .    .    -    .
z/c  X    .    .    .    .    .    .    .    -
";

    fn small() -> Matrix {
        Matrix::parse("* x/a y/b\nx/a - .\nx/b X .\n").unwrap()
    }

    #[test]
    fn parses_the_examples() {
        let m = Matrix::parse(DENY_INGRESS).unwrap();
        assert_eq!(m.columns.len(), 9);
        assert_eq!(m.rows.len(), 9);
        assert_eq!(m.columns[0], "x/a");
        assert_eq!(m.rows[8].0, "z/c");
        assert_eq!(m.get("x/a", "x/a"), Some(Mark::NotProbed));
        assert_eq!(m.get("y/a", "x/b"), Some(Mark::Denied));
        assert_eq!(m.get("x/a", "y/a"), Some(Mark::Allowed));
        assert_eq!(m.get("x/a", "q/q"), None);
        assert_eq!(m.get("q/q", "x/a"), None);
        assert_eq!(m.cells().count(), 81);
        assert_eq!(
            m.cells()
                .filter(|&(_, _, mark)| mark == Mark::Denied)
                .count(),
            24
        );

        let m = Matrix::parse(UPDATED_NS).unwrap();
        assert_eq!(m.get("y/b", "x/a"), Some(Mark::Allowed));
        assert_eq!(m.get("z/b", "x/a"), Some(Mark::Denied));
        assert_eq!(m.get("x/c", "x/b"), Some(Mark::Allowed));
    }

    #[test]
    fn whitespace_is_free() {
        let m = Matrix::parse("\n\n  *\tx/a   y/b  \n\n x/a -  .\r\nx/b\tX\t.\n\n").unwrap();
        assert_eq!(m, small());
    }

    #[test]
    fn display_is_aligned_and_round_trips() {
        let m = small();
        assert_eq!(m.to_string(), "*    x/a  y/b\nx/a  -    .\nx/b  X    .\n");
        for text in [DENY_INGRESS, UPDATED_NS] {
            let m = Matrix::parse(text).unwrap();
            assert_eq!(Matrix::parse(&m.to_string()).unwrap(), m);
        }
        // Case 21 is written exactly as Display writes it.
        assert_eq!(Matrix::parse(UPDATED_NS).unwrap().to_string(), UPDATED_NS);
        // Long names widen their column.
        let m = Matrix::parse("* n/a-long-name n/b\nn/b . -\nn/other-long X .").unwrap();
        assert_eq!(
            m.to_string(),
            "*             n/a-long-name  n/b\nn/b           .              -\nn/other-long  X              .\n"
        );
    }

    #[test]
    fn parse_errors_name_row_and_column() {
        let err = |text: &str| Matrix::parse(text).unwrap_err();
        assert!(err("").starts_with("empty matrix"));
        assert!(err("  \n \n").starts_with("empty matrix"));
        assert_eq!(
            err("x/a x/b\nx/a - ."),
            "matrix line 1: the header row must start with * (found \"x/a\")"
        );
        assert_eq!(
            err("*\nx/a"),
            "matrix line 1: the header row lists no columns"
        );
        assert_eq!(
            err("* x/a x/a\nx/a - -"),
            "matrix line 1: column x/a is listed twice"
        );
        assert_eq!(
            err("* x/a *\nx/a - -"),
            "matrix line 1: column 2: * is not a name"
        );
        assert_eq!(
            err("* x/a y/b\nx/a - .\n\nx/b X"),
            "matrix line 4: row x/b has 1 marks, expected 2 (one per column)"
        );
        assert_eq!(
            err("* x/a y/b\nx/a - . .\n"),
            "matrix line 2: row x/a has 3 marks, expected 2 (one per column)"
        );
        assert_eq!(
            err("* x/a y/b\nx/a - .\nx/b x ."),
            "matrix line 3: row x/b, column x/a: unknown mark \"x\" (expected ., X or -)"
        );
        assert_eq!(
            err("* x/a y/b\nx/a - .\nx/a X ."),
            "matrix line 3: row x/a is listed twice"
        );
        assert_eq!(
            err("* x/a y/b\n* x/a y/b\nx/a - ."),
            "matrix line 2: only the first row starts with * (found a second header row)"
        );
        assert_eq!(
            err("* x/a y/b\n"),
            "the matrix has no rows (one per client pod)"
        );
    }

    #[test]
    fn mark_from_families() {
        assert_eq!(Mark::from_families(&[]), None);
        assert_eq!(Mark::from_families(&[(IPv4, true)]), Some(Mark::Allowed));
        assert_eq!(
            Mark::from_families(&[(IPv4, true), (IPv6, true)]),
            Some(Mark::Allowed)
        );
        assert_eq!(
            Mark::from_families(&[(IPv4, true), (IPv6, false)]),
            Some(Mark::Denied)
        );
        assert_eq!(Mark::from_families(&[(IPv4, false)]), Some(Mark::Denied));
    }

    /// Observes every probed cell of `report` as expected, over both families.
    fn observe_all(report: &mut Report, expect: &Matrix) {
        for (from, to, mark) in expect.cells() {
            if mark != Mark::NotProbed {
                let ok = mark == Mark::Allowed;
                assert!(report.observe(from, to, vec![(IPv4, ok), (IPv6, ok)], None));
            }
        }
    }

    #[test]
    fn all_match() {
        let expect = Matrix::parse(DENY_INGRESS).unwrap();
        let mut report = Report::from_expected("document 14: TCP/80", &expect);
        observe_all(&mut report, &expect);
        assert_eq!(report.passed(), 72);
        assert_eq!(report.failed(), 0);
        assert_eq!(report.skipped_cells(), 0);
        let text = report.render_text();
        let (title, matrix) = text.split_once('\n').unwrap();
        assert_eq!(title, "document 14: TCP/80");
        // The observed matrix is a valid expectation and equals the expected one.
        assert_eq!(Matrix::parse(matrix).unwrap(), expect);
        assert_eq!(matrix, expect.to_string());
    }

    #[test]
    fn mismatches_are_marked_and_listed() {
        let expect = small();
        let mut report = Report::from_expected("document 7: TCP/80", &expect);
        assert!(report.observe(
            "x/a",
            "y/b",
            vec![(IPv4, true), (IPv6, false)],
            Some("timeout".into())
        ));
        assert!(report.observe("x/b", "x/a", vec![(IPv4, true)], None));
        assert!(report.observe("x/b", "y/b", vec![(IPv4, true), (IPv6, true)], None));
        assert!(!report.observe("q/q", "x/a", vec![(IPv4, true)], None));
        assert_eq!(report.passed(), 1);
        assert_eq!(report.failed(), 2);
        assert_eq!(
            report.render_text(),
            "document 7: TCP/80\n\
             *    x/a  y/b\n\
             x/a  -    X!\n\
             x/b  .!   .\n\
             x/a -> y/b: expected ., observed X (IPv6 failed: timeout)\n\
             x/b -> x/a: expected X, observed . (IPv4 connected)\n"
        );
    }

    #[test]
    fn unobserved_cells_fail_when_the_probe_ran() {
        let expect = small();
        let mut report = Report::from_expected("document 7: UDP/53", &expect);
        report.observe("x/b", "x/a", vec![(IPv4, false)], Some("no answer".into()));
        report.observe("x/b", "y/b", vec![(IPv4, true)], None);
        report.cells[1].detail = Some("pod has no IPv4 address".into());
        assert_eq!(report.passed(), 2);
        assert_eq!(report.failed(), 1);
        let text = report.render_text();
        assert!(text.contains("x/a  -    ?!\n"), "{text}");
        assert!(text.ends_with("x/a -> y/b: expected ., not observed (pod has no IPv4 address)\n"));
    }

    #[test]
    fn failure_notes() {
        let mut cell = Cell::new("x/b", "x/a", Mark::Allowed);
        cell.observed = Some(Mark::Denied);
        assert_eq!(cell.mismatch_line(), "x/b -> x/a: expected ., observed X");
        cell.detail = Some("timeout".into());
        assert_eq!(
            cell.mismatch_line(),
            "x/b -> x/a: expected ., observed X (timeout)"
        );
        cell.families = vec![(IPv4, false), (IPv6, false)];
        assert_eq!(
            cell.mismatch_line(),
            "x/b -> x/a: expected ., observed X (IPv4 failed, IPv6 failed: timeout)"
        );
        let mut cell = Cell::new("x/b", "x/a", Mark::Denied);
        cell.observed = Some(Mark::Allowed);
        cell.families = vec![(IPv4, true), (IPv6, true)];
        assert_eq!(
            cell.mismatch_line(),
            "x/b -> x/a: expected X, observed . (IPv4 connected, IPv6 connected)"
        );
    }

    #[test]
    fn not_probed_cells_never_count() {
        let expect = small();
        let mut report = Report::from_expected("t", &expect);
        observe_all(&mut report, &expect);
        // Even if something was recorded for a `-` cell, it neither passes nor fails.
        report.observe("x/a", "x/a", vec![(IPv4, true)], None);
        assert_eq!(report.cells[0].observed, Some(Mark::Allowed));
        assert_eq!(report.passed(), 3);
        assert_eq!(report.failed(), 0);
        assert!(report.render_text().contains("x/a  -    .\n"));
    }

    #[test]
    fn skipped_probe_prints_expected_matrix_and_why() {
        let expect = small();
        let mut report = Report::from_expected("document 9: SCTP/80", &expect);
        report.skip("this kernel has no SCTP sockets");
        assert_eq!(report.passed(), 0);
        assert_eq!(report.failed(), 0);
        assert_eq!(report.skipped_cells(), 3);
        assert_eq!(
            report.render_text(),
            "document 9: SCTP/80\n*    x/a  y/b\nx/a  -    .\nx/b  X    .\nskipped: this kernel has no SCTP sockets\n"
        );
        report.skip_reason = None;
        assert!(report.render_text().ends_with("x/b  X    .\nskipped\n"));
        let json = report.to_json();
        assert_eq!(json["skipped"], true);
        assert_eq!(json["skipped_cells"], 3);
        assert_eq!(json["cells"][1]["outcome"], "skipped");
        assert_eq!(json["cells"][0]["outcome"], "not-probed");
    }

    #[test]
    fn json_report() {
        let expect = small();
        let mut report = Report::from_expected("document 7: TCP/80", &expect);
        report.observe(
            "x/a",
            "y/b",
            vec![(IPv4, true), (IPv6, false)],
            Some("timeout".into()),
        );
        report.observe("x/b", "x/a", vec![(IPv4, false)], None);
        let json = report.to_json();
        assert_eq!(json["title"], "document 7: TCP/80");
        assert_eq!(json["passed"], 1);
        assert_eq!(json["failed"], 2);
        assert_eq!(json["skipped"], false);
        assert_eq!(json["skip_reason"], serde_json::Value::Null);
        assert_eq!(json["columns"], json!(["x/a", "y/b"]));
        assert_eq!(json["rows"], json!(["x/a", "x/b"]));
        assert_eq!(
            json["matrix"],
            "*    x/a  y/b\nx/a  -    X!\nx/b  X    ?!\n"
        );
        assert_eq!(
            json["cells"][1],
            json!({
                "from": "x/a", "to": "y/b", "expected": ".", "observed": "X",
                "families": {"IPv4": true, "IPv6": false}, "detail": "timeout",
                "outcome": "failed",
            })
        );
        assert_eq!(json["cells"][3]["observed"], serde_json::Value::Null);
        assert_eq!(
            json["mismatches"],
            json!([
                "x/a -> y/b: expected ., observed X (IPv6 failed: timeout)",
                "x/b -> y/b: expected ., not observed",
            ])
        );
    }

    #[test]
    fn summary() {
        assert_eq!(summary_line(81, 0, 0), "81 passed, 0 failed");
        assert_eq!(summary_line(3, 2, 0), "3 passed, 2 failed");
        assert_eq!(summary_line(3, 0, 72), "3 passed, 0 failed, 72 skipped");
    }
}
