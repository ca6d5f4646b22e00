//! How operator commands print: JSON documents on stdout for `--json`,
//! aligned tables and sentences for people, progress bars on stderr only
//! when stderr is a terminal (and never with `--json`), and confirmation
//! prompts for destructive commands.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

/// Prints `value` as one pretty JSON document on stdout.
pub fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("output serializes"));
}

/// A left-aligned table: column widths fit the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Cuts `text` to `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    let single_line = text.replace(['\n', '\r'], " ");
    if single_line.chars().count() <= max {
        single_line
    } else {
        let kept: String = single_line.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

/// A bar counting items towards `total`, with rate and ETA; hidden unless
/// stderr is a terminal and output is for people.
pub fn progress_bar(total: u64, unit: &str, json: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(json));
    let template = format!(
        "{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, ETA {{eta}}) {{msg}}"
    );
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A bar counting bytes (for reading files of unknown line count).
pub fn byte_progress_bar(total: u64, json: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), draw_target(json));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta}) {msg}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn draw_target(json: bool) -> ProgressDrawTarget {
    if json || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// Asks `question` on stderr and reads the answer from stdin; only `y` or
/// `yes` confirm. `assume_yes` (`--yes`) skips the question. End of input
/// (no terminal, nothing piped) is a no.
pub fn confirm(question: &str, assume_yes: bool) -> bool {
    if assume_yes {
        return true;
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    match std::io::stdin().lock().read_line(&mut answer) {
        Ok(0) | Err(_) => {
            eprintln!();
            false
        }
        Ok(_) => matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["ID", "TASK"],
            &[
                vec!["1".into(), "export.project".into()],
                vec!["1234".into(), "x".into()],
            ],
        );
        assert_eq!(text, "ID    TASK\n1     export.project\n1234  x\n");
        assert_eq!(truncate("line one\nline two", 12), "line one li…");
        assert_eq!(truncate("short", 12), "short");
    }
}
