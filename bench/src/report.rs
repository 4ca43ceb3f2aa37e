//! What a scenario reports: notes (lines of prose) and tables, printed as Markdown as they
//! become known, or collected and printed at the end as one JSON document (`--json`):
//!
//! ```json
//! {"scenario": "coupons", "notes": ["scenario coupons: …"],
//!  "tables": [{"title": "coupon flow", "columns": [{"key": "measure", "header": "measure"}, …],
//!              "rows": [{"measure": "accepted requests/s …", "value": 10234.5, "goal": "≥ 10,000"}]}]}
//! ```
//!
//! Each [`Cell`] holds its Markdown text and its JSON value: a number where the cell is a
//! number, an object where the cell joins several (`65.9 ms / 107.5 ms` is
//! `{"p50_ms": 65.9, "p99_ms": 107.5}`).

use serde_json::{Map, Value, json};

/// The notes and tables of one scenario.
pub struct Report {
    scenario: &'static str,
    json: bool,
    notes: Vec<String>,
    tables: Vec<Table>,
    /// Whether the last thing printed as Markdown was a table (the next note is set apart
    /// by an empty line).
    after_table: bool,
}

impl Report {
    /// The report of `scenario`; JSON at the end when `json`, else Markdown as it goes.
    pub fn new(scenario: &'static str, json: bool) -> Self {
        Self {
            scenario,
            json,
            notes: Vec::new(),
            tables: Vec::new(),
            after_table: false,
        }
    }

    /// Whether the report ends as one JSON document.
    pub fn json(&self) -> bool {
        self.json
    }

    /// A line of prose; printed at once in Markdown.
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.json {
            if self.after_table {
                println!();
                self.after_table = false;
            }
            println!("{note}");
        }
        self.notes.push(note);
    }

    /// A table; printed at once in Markdown, after an empty line.
    pub fn table(&mut self, table: Table) {
        if !self.json {
            println!();
            print!("{}", table.markdown());
            self.after_table = true;
        }
        self.tables.push(table);
    }

    /// Prints the JSON document, when the report is one.
    pub fn finish(self) {
        if self.json {
            println!("{}", self.to_json());
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "notes": self.notes,
            "tables": self.tables.iter().map(Table::to_json).collect::<Vec<_>>(),
        })
    }
}

/// How a column's cells align in Markdown.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// A column: its Markdown header, its key in the JSON rows, its alignment.
pub struct Column {
    header: &'static str,
    key: &'static str,
    align: Align,
}

impl Column {
    /// A left-aligned column (prose, compound cells).
    pub fn left(header: &'static str, key: &'static str) -> Self {
        Self {
            header,
            key,
            align: Align::Left,
        }
    }

    /// A right-aligned column (numbers).
    pub fn right(header: &'static str, key: &'static str) -> Self {
        Self {
            header,
            key,
            align: Align::Right,
        }
    }
}

/// A table of measures: a title (in JSON only), columns and rows of cells.
pub struct Table {
    title: &'static str,
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(title: &'static str, columns: Vec<Column>) -> Self {
        Self {
            title,
            columns,
            rows: Vec::new(),
        }
    }

    /// Adds a row, one cell per column.
    pub fn row(&mut self, cells: Vec<Cell>) {
        assert_eq!(
            cells.len(),
            self.columns.len(),
            "a row of table {:?} has one cell per column",
            self.title
        );
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        // `| a | b |`, an empty cell as `| |`.
        let line = |cells: Vec<&str>| {
            let mut line = String::from("|");
            for cell in cells {
                if !cell.is_empty() {
                    line.push(' ');
                    line.push_str(cell);
                }
                line.push_str(" |");
            }
            line.push('\n');
            line
        };
        let mut markdown = line(self.columns.iter().map(|column| column.header).collect());
        let rule: Vec<&str> = self
            .columns
            .iter()
            .map(|column| match column.align {
                Align::Left => "---",
                Align::Right => "---:",
            })
            .collect();
        markdown.push_str(&format!("|{}|\n", rule.join("|")));
        for row in &self.rows {
            markdown.push_str(&line(
                row.iter().map(|cell| cell.markdown.as_str()).collect(),
            ));
        }
        markdown
    }

    fn to_json(&self) -> Value {
        let columns: Vec<Value> = self
            .columns
            .iter()
            .map(|column| json!({"key": column.key, "header": column.header}))
            .collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let cells: Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(row)
                    .map(|(column, cell)| (column.key.to_string(), cell.json.clone()))
                    .collect();
                Value::Object(cells)
            })
            .collect();
        json!({"title": self.title, "columns": columns, "rows": rows})
    }
}

/// One cell: its Markdown text and its JSON value.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    markdown: String,
    json: Value,
}

impl Cell {
    /// A cell with `markdown` as its text and `json` as its value.
    pub fn new(markdown: impl Into<String>, json: impl Into<Value>) -> Self {
        Self {
            markdown: markdown.into(),
            json: json.into(),
        }
    }

    /// Prose, a JSON string.
    pub fn text(text: impl Into<String>) -> Self {
        let text = text.into();
        Self::new(text.clone(), text)
    }

    /// Nothing: empty in Markdown, `null` in JSON.
    pub fn empty() -> Self {
        Self::new("", Value::Null)
    }

    /// A number shown with `decimals` decimals; the JSON number is unrounded (`null` when
    /// not finite).
    pub fn number(value: f64, decimals: usize) -> Self {
        Self::new(format!("{value:.decimals$}"), number(value))
    }

    /// A count.
    pub fn count(value: impl Into<Value> + std::fmt::Display) -> Self {
        Self::new(value.to_string(), value)
    }
}

/// `value` as a JSON number, `null` when not finite.
pub fn number(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut table = Table::new(
            "coupon flow",
            vec![
                Column::left("measure", "measure"),
                Column::right("value", "value"),
                Column::left("goal", "goal"),
            ],
        );
        table.row(vec![
            Cell::text("accepted requests/s"),
            Cell::number(10234.56, 0),
            Cell::text("≥ 10,000"),
        ]);
        table.row(vec![
            Cell::text("latency p50 / p99"),
            Cell::new("1.5 ms / 9.0 ms", json!({"p50_ms": 1.5, "p99_ms": 9.0})),
            Cell::empty(),
        ]);
        table
    }

    #[test]
    fn markdown_has_the_header_the_alignment_and_the_cells_text() {
        assert_eq!(
            table().markdown(),
            "| measure | value | goal |\n\
             |---|---:|---|\n\
             | accepted requests/s | 10235 | ≥ 10,000 |\n\
             | latency p50 / p99 | 1.5 ms / 9.0 ms | |\n"
        );
    }

    #[test]
    fn json_rows_are_keyed_by_column_with_numbers_and_objects() {
        let json = table().to_json();
        assert_eq!(json["title"], "coupon flow");
        assert_eq!(
            json["columns"][1],
            json!({"key": "value", "header": "value"})
        );
        assert_eq!(json["rows"][0]["value"], json!(10234.56));
        assert_eq!(json["rows"][1]["value"]["p99_ms"], json!(9.0));
        assert_eq!(json["rows"][1]["goal"], Value::Null);
    }

    #[test]
    fn a_number_that_is_not_finite_is_null() {
        assert_eq!(Cell::number(f64::NAN, 1), Cell::new("NaN", Value::Null));
    }
}
