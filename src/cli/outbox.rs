//! `taskgate outbox stats|list|drain|export|import|purge|salvage|pause|resume`.
//!
//! Online, each goes through the admin API; `--offline` opens a stopped
//! server's data directory for stats, list, export and purge. Exports are
//! written to a temporary file renamed into place only when complete, so a
//! failed export never leaves a file that looks whole. Imports are sent in
//! chunks (bounded memory on both sides) and are idempotent by task id, so
//! a failed import can simply be run again. `salvage` (offline only) copies
//! what is readable out of a damaged outbox ([`crate::outbox::salvage`]).

use super::admin_client::{AdminClient, ClientError};
use super::command::{describe_breaker, CommandError, ServerArgs};
use super::offline::OfflineOutbox;
use super::output::{self, print_json};
use crate::config::BrokerKind;
use crate::config::Settings;
use crate::http::admin::{
    import_body_limit, BreakerView, DrainStarted, Purged, RelayPause, TaskPage, DEPTH_HEADER, MAX_PAGE,
};
use crate::http::status_page::duration_text;
use crate::outbox::operations::{DeadLetterEntry, ImportOutcome, OutboxRecord, OutboxReport, PendingCursor};
use crate::outbox::salvage::{self, OutboxSink, SalvageError, SalvageReport, SalvageSink};
use crate::outbox::{DeadLetter, Lane, OutboxSettings};
use crate::relay::holds::OperatorHolds;
use crate::task::routing::TopicRouter;
use crate::task::Task;
use clap::{Args, Subcommand};
use serde_json::json;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Pending tasks read per offline page.
const OFFLINE_PAGE: usize = 512;
/// Import chunks: at most this many lines...
const IMPORT_CHUNK_LINES: usize = 2000;
/// ...and about this many bytes (a single larger line goes alone).
const IMPORT_CHUNK_BYTES: usize = 4 << 20;
/// How often `drain` looks at the outbox, and asks again for a probe while
/// nothing moves.
const DRAIN_POLL: Duration = Duration::from_millis(250);
const DRAIN_REPROBE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
    /// Open the data directory directly instead of asking the server
    /// (server stopped; stats, list, export and purge).
    #[arg(long, global = true)]
    pub offline: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Depth, bytes, oldest age, dead letters, per-queue figures.
    Stats,
    /// Pending tasks, lane by lane in publish order.
    List {
        /// Show at most this many tasks.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Probe the broker now (even with the breaker open) and wait until the
    /// outbox is empty; exits 3 if tasks still wait at --timeout.
    Drain {
        /// Seconds to wait for the outbox to empty.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
    },
    /// Write every pending task as NDJSON (one task per line).
    Export {
        /// Output file [default: standard output].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Accept the tasks of an export into the running server; tasks whose
    /// id it already knows are skipped, so importing twice is harmless.
    Import {
        /// An NDJSON export (`-` for standard input).
        file: PathBuf,
    },
    /// Delete every pending task. Asks first unless --yes.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Copy every readable task out of a damaged outbox (server stopped;
    /// needs --offline) into a new outbox or an NDJSON export. The damaged
    /// store is only read, never written. Exits 0 when everything was
    /// read, 4 when some records could not be.
    Salvage {
        /// A new (or empty) outbox directory to write the tasks into,
        /// through the normal import path; dead letters stay dead letters.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "to_ndjson",
            conflicts_with = "to_ndjson"
        )]
        to_outbox: Option<PathBuf>,
        /// An NDJSON file in the format of `outbox export` (for `outbox
        /// import`); dead letters go to FILE.dead-letters.ndjson.
        #[arg(long, value_name = "FILE")]
        to_ndjson: Option<PathBuf>,
        /// The damaged outbox [default: outbox.path from the configuration].
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Where copies of the damaged store are tried (as big as the store;
        /// removed afterwards) [default: DEST.salvage-work next to the destination].
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Also recover the task records a raw scan of the log finds that
        /// sled did not return although it read the store as a whole
        /// (tasks sled's recovery dropped, or long-published ones: those
        /// are delivered again).
        #[arg(long)]
        include_unmatched: bool,
    },
    /// Stop publishing; tasks keep being accepted and spool.
    Pause,
    /// Publish again after a pause.
    Resume,
}

impl OutboxCommand {
    fn name(&self) -> &'static str {
        match self {
            Self::Stats => "outbox stats",
            Self::List { .. } => "outbox list",
            Self::Drain { .. } => "outbox drain",
            Self::Export { .. } => "outbox export",
            Self::Import { .. } => "outbox import",
            Self::Purge { .. } => "outbox purge",
            Self::Salvage { .. } => "outbox salvage",
            Self::Pause => "outbox pause",
            Self::Resume => "outbox resume",
        }
    }
}

pub fn run(settings: &Settings, json: bool, args: OutboxArgs) -> Result<(), CommandError> {
    if let OutboxCommand::Salvage {
        to_outbox,
        to_ndjson,
        from,
        work_dir,
        include_unmatched,
    } = args.command
    {
        if !args.offline {
            return Err(CommandError::Invalid(
                "`outbox salvage` reads a stopped server's outbox directory: run it with --offline".into(),
            ));
        }
        let target = SalvageTarget {
            to_outbox,
            to_ndjson,
            from,
            work_dir,
            include_unmatched,
        };
        return salvage(settings, json, target);
    }
    if args.offline {
        let offline = match &args.command {
            OutboxCommand::Stats
            | OutboxCommand::List { .. }
            | OutboxCommand::Export { .. }
            | OutboxCommand::Purge { .. } => OfflineOutbox::open(settings)?,
            other => return Err(CommandError::NeedsServer(other.name())),
        };
        return match args.command {
            OutboxCommand::Stats => {
                // A pause is saved with the outbox: a stopped server starts
                // paused if it was paused when it stopped.
                let outbox = offline.outbox();
                let report = OperatorHolds::load(outbox)
                    .and_then(|holds| outbox.report(holds.relay_paused))
                    .map_err(super::offline::OfflineError::from)?;
                print_stats(&report, json, true);
                Ok(())
            }
            OutboxCommand::List { limit } => {
                let records = collect_records(limit, |cursor, page| {
                    let page = offline
                        .outbox()
                        .list_pending(cursor.as_ref(), page)
                        .map_err(super::offline::OfflineError::from)?;
                    Ok((page.records, page.next))
                })?;
                print_records(&records, limit, json);
                Ok(())
            }
            OutboxCommand::Export { out } => export_offline(&offline, out.as_deref(), json),
            OutboxCommand::Purge { yes } => {
                let depth = offline.outbox().depth();
                let question = format!(
                    "Delete all {depth} pending tasks from the outbox at {}? They will never be published.",
                    settings.outbox.path.display()
                );
                // Nothing to lose, nothing to ask.
                if depth > 0 && !output::confirm(&question, yes) {
                    return Err(CommandError::Aborted("purged"));
                }
                let purged = offline
                    .outbox()
                    .purge_pending()
                    .map_err(super::offline::OfflineError::from)?;
                offline.flush()?;
                print_purged(purged, json);
                Ok(())
            }
            _ => unreachable!("refused above"),
        };
    }
    let client = args.server.client(settings)?;
    match args.command {
        OutboxCommand::Stats => {
            let report: OutboxReport = client.get("/v1/outbox")?;
            print_stats(&report, json, false);
            Ok(())
        }
        OutboxCommand::List { limit } => {
            let records = collect_records(limit, |cursor, page| {
                let mut path = format!("/v1/outbox/tasks?limit={page}");
                if let Some(cursor) = cursor {
                    path.push_str(&format!("&cursor={}", cursor.encode()));
                }
                let page: TaskPage = client.get(&path)?;
                let next = page
                    .next_cursor
                    .as_deref()
                    .map(PendingCursor::decode)
                    .transpose()
                    .map_err(|error| CommandError::Invalid(error.to_string()))?;
                Ok((page.tasks, next))
            })?;
            print_records(&records, limit, json);
            Ok(())
        }
        OutboxCommand::Drain { timeout } => drain(&client, Duration::from_secs(timeout), json),
        OutboxCommand::Export { out } => export_online(&client, out.as_deref(), json),
        OutboxCommand::Import { file } => import(&client, settings, &file, json),
        OutboxCommand::Purge { yes } => {
            let report: OutboxReport = client.get("/v1/outbox")?;
            let question = format!(
                "Delete all {} pending tasks from the outbox of {}? They will never be published.",
                report.depth,
                client.base_url()
            );
            if report.depth > 0 && !output::confirm(&question, yes) {
                return Err(CommandError::Aborted("purged"));
            }
            let purged: Purged = client.delete("/v1/outbox/tasks")?;
            print_purged(purged.purged, json);
            Ok(())
        }
        OutboxCommand::Salvage { .. } => unreachable!("salvage is handled above"),
        OutboxCommand::Pause => pause_or_resume(&client, "/v1/outbox/pause", json),
        OutboxCommand::Resume => pause_or_resume(&client, "/v1/outbox/resume", json),
    }
}

fn print_stats(report: &OutboxReport, json: bool, offline: bool) {
    if json {
        print_json(report);
        return;
    }
    let oldest = report.oldest_age_seconds.map_or_else(|| "-".to_owned(), duration_text);
    println!(
        "outbox: {} tasks, {} of {} bytes, oldest {oldest}",
        report.depth, report.bytes, report.max_bytes
    );
    if offline && report.paused {
        println!("relay: not running (offline); paused by an operator, a server starts paused");
    } else if offline {
        println!("relay: not running (offline)");
    } else {
        println!("relay: {}", if report.paused { "paused" } else { "running" });
    }
    println!("dead letters: {}", report.dead_letters);
    if !report.queues.is_empty() {
        let rows: Vec<Vec<String>> = report
            .queues
            .iter()
            .map(|(name, queue)| {
                vec![
                    name.clone(),
                    queue.depth.to_string(),
                    queue.oldest_age_seconds.map_or_else(|| "-".to_owned(), duration_text),
                ]
            })
            .collect();
        print!("{}", output::table(&["QUEUE", "WAITING", "OLDEST"], &rows));
    }
}

/// Pages through records until `limit` or the end.
fn collect_records(
    limit: usize,
    mut fetch: impl FnMut(Option<PendingCursor>, usize) -> Result<(Vec<OutboxRecord>, Option<PendingCursor>), CommandError>,
) -> Result<Vec<OutboxRecord>, CommandError> {
    let mut records = Vec::new();
    let mut cursor = None;
    while records.len() < limit {
        let page = (limit - records.len()).min(MAX_PAGE);
        let (mut batch, next) = fetch(cursor, page)?;
        batch.truncate(limit - records.len());
        records.append(&mut batch);
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(records)
}

fn print_records(records: &[OutboxRecord], limit: usize, json: bool) {
    if json {
        print_json(&records);
        return;
    }
    if records.is_empty() {
        println!("the outbox is empty");
        return;
    }
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| {
            let task = &record.task;
            vec![
                task.id.to_string(),
                task.task.to_string(),
                task.queues.iter().map(|q| q.as_str()).collect::<Vec<_>>().join(","),
                duration_text((now - task.accepted_at).num_milliseconds() as f64 / 1000.0),
                record.attempts.to_string(),
                output::truncate(record.last_error.as_deref().unwrap_or(""), 60),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["ID", "TASK", "QUEUES", "AGE", "ATTEMPTS", "LAST ERROR"], &rows)
    );
    if records.len() == limit {
        println!("(the first {limit} shown; `--limit N` shows more, `outbox stats` counts them all)");
    }
}

fn print_purged(purged: u64, json: bool) {
    if json {
        print_json(&json!({"purged": purged}));
    } else {
        println!("purged {purged} pending tasks");
    }
}

fn pause_or_resume(client: &AdminClient, path: &str, json: bool) -> Result<(), CommandError> {
    let state: RelayPause = client.post(path)?;
    if json {
        print_json(&state);
    } else if state.paused {
        println!("relay paused: tasks are accepted and spool until `taskgate outbox resume`");
    } else {
        println!("relay running");
    }
    Ok(())
}

fn drain(client: &AdminClient, timeout: Duration, json: bool) -> Result<(), CommandError> {
    let started = Instant::now();
    let first: DrainStarted = client.post("/v1/outbox/drain")?;
    let bar = output::progress_bar(first.depth, "tasks", json);
    bar.set_message(format!("breaker {}", first.breaker.as_str()));
    let mut highest = first.depth;
    let mut last_depth = first.depth;
    let mut last_progress = Instant::now();
    let mut drained = 0u64;
    let report = loop {
        let report: OutboxReport = client.get("/v1/outbox")?;
        if report.depth < last_depth {
            drained += last_depth - report.depth;
            last_progress = Instant::now();
        }
        last_depth = report.depth;
        // New tasks may arrive while draining: the goal moves with them.
        highest = highest.max(drained + report.depth);
        bar.set_length(highest);
        bar.set_position(drained);
        if report.depth == 0 {
            break report;
        }
        if started.elapsed() >= timeout {
            bar.abandon();
            let breaker: Result<BreakerView, ClientError> = client.get("/v1/breaker");
            let why = breaker.map_or_else(|_| "breaker state unknown".to_owned(), |view| describe_breaker(&view));
            if json {
                print_json(&json!({
                    "drained": false, "depth": report.depth, "published": drained,
                    "elapsed_seconds": started.elapsed().as_secs_f64(),
                }));
            }
            return Err(CommandError::DrainTimedOut {
                message: format!(
                    "drain timed out after {} s with {} tasks still waiting ({why})",
                    timeout.as_secs(),
                    report.depth
                ),
            });
        }
        if last_progress.elapsed() >= DRAIN_REPROBE {
            // Nothing moved: the probe failed and the breaker reopened.
            // Ask again rather than wait out the open interval.
            let again: DrainStarted = client.post("/v1/outbox/drain")?;
            bar.set_message(format!("breaker {}, probing again", again.breaker.as_str()));
            last_progress = Instant::now();
        }
        std::thread::sleep(DRAIN_POLL);
    };
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    if json {
        print_json(&json!({
            "drained": true, "depth": report.depth, "published": drained, "elapsed_seconds": elapsed,
        }));
    } else {
        println!("outbox drained: {drained} tasks published in {elapsed:.1} s");
    }
    Ok(())
}

/// Where an export goes: a file (written aside, renamed when complete) or
/// standard output.
enum ExportSink {
    File {
        partial: PathBuf,
        target: PathBuf,
        writer: BufWriter<File>,
    },
    Stdout(std::io::StdoutLock<'static>),
}

impl ExportSink {
    fn open(out: Option<&Path>) -> Result<Self, CommandError> {
        let Some(target) = out else {
            return Ok(Self::Stdout(std::io::stdout().lock()));
        };
        let mut name = target.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = target.with_file_name(name);
        let file = File::create(&partial)
            .map_err(|error| CommandError::io(format!("cannot create {}", partial.display()), error))?;
        Ok(Self::File {
            partial,
            target: target.to_owned(),
            writer: BufWriter::new(file),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Self::File { writer, .. } => writer,
            Self::Stdout(stdout) => stdout,
        }
    }

    fn write_line(&mut self, line: &[u8]) -> Result<(), CommandError> {
        let writer = self.writer();
        writer
            .write_all(line)
            .and_then(|_| {
                if line.ends_with(b"\n") {
                    Ok(())
                } else {
                    writer.write_all(b"\n")
                }
            })
            .map_err(|error| CommandError::io("cannot write the export", error))
    }

    /// Makes the export durable and visible under its name.
    fn finish(self) -> Result<Option<PathBuf>, CommandError> {
        match self {
            Self::File {
                partial,
                target,
                writer,
            } => {
                let file = writer
                    .into_inner()
                    .map_err(|error| CommandError::io("cannot write the export", error.into_error()))?;
                file.sync_all()
                    .map_err(|error| CommandError::io("cannot sync the export", error))?;
                std::fs::rename(&partial, &target)
                    .map_err(|error| CommandError::io(format!("cannot rename to {}", target.display()), error))?;
                Ok(Some(target))
            }
            Self::Stdout(mut stdout) => {
                stdout
                    .flush()
                    .map_err(|error| CommandError::io("cannot write the export", error))?;
                Ok(None)
            }
        }
    }

    fn abandon(self) {
        if let Self::File { partial, .. } = self {
            let _ = std::fs::remove_file(partial);
        }
    }
}

fn report_export(count: u64, path: Option<PathBuf>, json: bool) {
    match (&path, json) {
        (_, true) => print_json(&json!({"exported": count, "path": path})),
        (Some(path), false) => println!("exported {count} tasks to {}", path.display()),
        // The NDJSON went to stdout: keep the summary out of it.
        (None, false) => eprintln!("exported {count} tasks"),
    }
}

fn export_online(client: &AdminClient, out: Option<&Path>, json: bool) -> Result<(), CommandError> {
    const PATH: &str = "/v1/outbox/export";
    let response = client.get_stream(PATH)?;
    let total = response
        .headers()
        .get(DEPTH_HEADER)
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    let mut sink = ExportSink::open(out)?;
    let bar = output::progress_bar(total, "tasks", json || out.is_none());
    let mut reader = BufReader::new(response);
    let mut line = Vec::new();
    let mut count = 0u64;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                bar.abandon();
                sink.abandon();
                return Err(client.stream_error(PATH, error).into());
            }
        }
        if !line.ends_with(b"\n") {
            // Every line the server sends ends with a newline: this one was cut.
            sink.abandon();
            return Err(CommandError::Client(ClientError::Decode {
                url: format!("{}{PATH}", client.base_url()),
                reason: "the export ended in the middle of a line".into(),
            }));
        }
        if let Err(error) = sink.write_line(&line) {
            sink.abandon();
            return Err(error);
        }
        count += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let path = sink.finish()?;
    report_export(count, path, json);
    Ok(())
}

fn export_offline(offline: &OfflineOutbox, out: Option<&Path>, json: bool) -> Result<(), CommandError> {
    let outbox = offline.outbox();
    let mut sink = ExportSink::open(out)?;
    let bar = output::progress_bar(outbox.depth(), "tasks", json || out.is_none());
    let mut cursor = None;
    let mut count = 0u64;
    let result = (|| loop {
        let page = outbox
            .export_page(cursor.as_ref(), OFFLINE_PAGE)
            .map_err(super::offline::OfflineError::from)?;
        for record in &page.records {
            let line = serde_json::to_vec(record).expect("records serialize");
            sink.write_line(&line)?;
            count += 1;
            bar.inc(1);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok::<_, CommandError>(()),
        }
    })();
    if let Err(error) = result {
        bar.abandon();
        sink.abandon();
        return Err(error);
    }
    bar.finish_and_clear();
    let path = sink.finish()?;
    report_export(count, path, json);
    Ok(())
}

fn import(client: &AdminClient, settings: &Settings, file: &Path, json: bool) -> Result<(), CommandError> {
    let (reader, size): (Box<dyn BufRead>, u64) = if file == Path::new("-") {
        (Box::new(BufReader::new(std::io::stdin())), 0)
    } else {
        let opened =
            File::open(file).map_err(|error| CommandError::io(format!("cannot read {}", file.display()), error))?;
        let size = opened.metadata().map(|meta| meta.len()).unwrap_or(0);
        (Box::new(BufReader::new(opened)), size)
    };
    // Chunks stay well inside what the server takes in one request.
    let chunk_bytes = IMPORT_CHUNK_BYTES.min(import_body_limit(settings.http.max_body_bytes) / 2);
    let bar = output::byte_progress_bar(size, json);
    let mut total = ImportOutcome::default();
    let mut chunk = Vec::new();
    let mut chunk_lines = 0usize;
    let mut chunk_first_line = 1usize;
    let mut line_number = 0usize;
    let send = |chunk: &mut Vec<u8>, first_line: usize, total: &mut ImportOutcome| -> Result<(), CommandError> {
        let outcome: ImportOutcome = client
            .post_ndjson("/v1/outbox/import", std::mem::take(chunk))
            .map_err(|error| locate_import_error(error, file, first_line))?;
        total.imported += outcome.imported;
        total.skipped += outcome.skipped;
        Ok(())
    };
    for line in reader.split(b'\n') {
        let mut line = line.map_err(|error| CommandError::io(format!("cannot read {}", file.display()), error))?;
        line_number += 1;
        bar.inc(line.len() as u64 + 1);
        if line.iter().all(u8::is_ascii_whitespace) {
            // Blank lines still count, so line numbers match the file.
            chunk.push(b'\n');
            chunk_lines += 1;
            continue;
        }
        if chunk_lines > 0 && (chunk_lines >= IMPORT_CHUNK_LINES || chunk.len() + line.len() >= chunk_bytes) {
            if let Err(error) = send(&mut chunk, chunk_first_line, &mut total) {
                bar.abandon();
                return Err(with_progress(error, &total));
            }
            chunk_lines = 0;
            chunk_first_line = line_number;
        }
        line.push(b'\n');
        chunk.extend_from_slice(&line);
        chunk_lines += 1;
    }
    if chunk.iter().any(|byte| !byte.is_ascii_whitespace()) {
        if let Err(error) = send(&mut chunk, chunk_first_line, &mut total) {
            bar.abandon();
            return Err(with_progress(error, &total));
        }
    }
    bar.finish_and_clear();
    if json {
        print_json(&total);
    } else {
        println!(
            "imported {} tasks into {} ({} skipped: already known there)",
            total.imported,
            client.base_url(),
            total.skipped
        );
    }
    Ok(())
}

/// The server numbers lines within one chunk; say where in the file.
fn locate_import_error(error: ClientError, file: &Path, first_line: usize) -> CommandError {
    let ClientError::Problem(answer) = error else {
        return CommandError::Client(error);
    };
    let Some(in_chunk) = answer
        .field
        .as_deref()
        .and_then(|field| field.strip_prefix("line "))
        .and_then(|number| number.parse::<usize>().ok())
    else {
        return CommandError::Client(ClientError::Problem(answer));
    };
    let line = first_line + in_chunk.max(1) - 1;
    let prefix = format!("line {in_chunk}: ");
    let detail = answer.detail.strip_prefix(&prefix).unwrap_or(&answer.detail);
    CommandError::Invalid(format!(
        "{}:{line}: {detail} (HTTP {}; nothing from this chunk was imported)",
        file.display(),
        answer.status
    ))
}

fn with_progress(error: CommandError, total: &ImportOutcome) -> CommandError {
    if total.imported + total.skipped == 0 {
        return error;
    }
    CommandError::Invalid(format!(
        "{error}\n{} tasks were imported before this ({} skipped); import is idempotent by task id, \
         so run it again once the problem is fixed",
        total.imported, total.skipped
    ))
}

/// An NDJSON salvage: pending tasks as `outbox export` lines, dead letters
/// as `dead-letters list --json` entries in a second file. Both are written
/// aside and renamed when complete.
struct NdjsonSink {
    tasks: Option<ExportSink>,
    letters: Option<ExportSink>,
    letters_path: PathBuf,
}

impl NdjsonSink {
    fn write(sink: &mut Option<ExportSink>, value: &impl serde::Serialize) -> Result<(), SalvageError> {
        let line = serde_json::to_vec(value).expect("records serialize");
        sink.as_mut()
            .expect("an open sink")
            .write_line(&line)
            .map_err(|error| SalvageError::Sink(error.to_string()))
    }

    fn finish(mut self) -> Result<Option<PathBuf>, CommandError> {
        self.tasks.take().expect("an open sink").finish()?;
        match self.letters.take() {
            Some(letters) => letters.finish(),
            None => Ok(None),
        }
    }

    fn abandon(mut self) {
        if let Some(tasks) = self.tasks.take() {
            tasks.abandon();
        }
        if let Some(letters) = self.letters.take() {
            letters.abandon();
        }
    }
}

impl SalvageSink for NdjsonSink {
    fn pending(&mut self, record: OutboxRecord, _lanes: Vec<Lane>) -> Result<(), SalvageError> {
        Self::write(&mut self.tasks, &record)
    }

    fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SalvageError> {
        if self.letters.is_none() {
            self.letters = Some(
                ExportSink::open(Some(&self.letters_path)).map_err(|error| SalvageError::Sink(error.to_string()))?,
            );
        }
        Self::write(&mut self.letters, &DeadLetterEntry::from(letter))
    }
}

/// `FILE` -> `FILE.suffix`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The arguments of `outbox salvage`.
struct SalvageTarget {
    to_outbox: Option<PathBuf>,
    to_ndjson: Option<PathBuf>,
    from: Option<PathBuf>,
    work_dir: Option<PathBuf>,
    include_unmatched: bool,
}

/// `outbox salvage --offline`.
fn salvage(settings: &Settings, json: bool, target: SalvageTarget) -> Result<(), CommandError> {
    let SalvageTarget {
        to_outbox,
        to_ndjson,
        from,
        work_dir,
        include_unmatched,
    } = target;
    let source = from.unwrap_or_else(|| settings.outbox.path.clone());
    if !source.join("db").is_file() {
        return Err(super::offline::OfflineError::Missing { path: source }.into());
    }
    let destination = to_outbox.clone().or(to_ndjson.clone()).expect("clap requires one");
    if destination == source {
        return Err(CommandError::Invalid(
            "salvage writes into a new destination, never into the damaged outbox".into(),
        ));
    }
    let work = work_dir.unwrap_or_else(|| with_suffix(&destination, ".salvage-work"));
    // A task found only by the raw scan goes where this configuration
    // would send it.
    let router =
        TopicRouter::from_settings(&settings.routing).map_err(|error| CommandError::Invalid(error.to_string()))?;
    let exchange = Lane::new(router.exchange());
    let kind = settings.broker.kind;
    let lanes_for = move |task: &Task| -> Vec<Lane> {
        match kind {
            BrokerKind::Amqp => vec![exchange.clone()],
            BrokerKind::Sqs => task.queues.iter().map(|queue| Lane::new(queue.as_str())).collect(),
        }
    };
    let failed =
        |error: SalvageError| CommandError::Invalid(format!("salvage of {} failed: {error}", source.display()));
    let (report, skipped) = if let Some(directory) = &to_outbox {
        let mut sink = OutboxSink::create(&OutboxSettings {
            path: directory.clone(),
            ..settings.outbox.clone()
        })
        .map_err(failed)?;
        let report = salvage::salvage(&source, &work, &lanes_for, include_unmatched, &mut sink).map_err(failed)?;
        let skipped = sink.finish().map_err(failed)?;
        (report, skipped)
    } else {
        let file = to_ndjson.as_deref().expect("clap requires one");
        let mut sink = NdjsonSink {
            tasks: Some(ExportSink::open(Some(file))?),
            letters: None,
            letters_path: with_suffix(file, ".dead-letters.ndjson"),
        };
        match salvage::salvage(&source, &work, &lanes_for, include_unmatched, &mut sink) {
            Ok(report) => {
                sink.finish()?;
                (report, 0)
            }
            Err(error) => {
                sink.abandon();
                return Err(failed(error));
            }
        }
    };
    print_salvage(&report, &destination, to_outbox.is_some(), skipped, json);
    if report.complete {
        Ok(())
    } else {
        let what = if let Some(gap) = report.acknowledged_past_store {
            format!(
                "{} had acknowledged tasks up to sequence {}, but what could be read of it ends below {}, so \
                 tasks accepted after that are missing unless the raw scan found them",
                source.display(),
                gap.accepted_below,
                gap.store_ends_below
            )
        } else if report.unreadable > 0 {
            format!(
                "{} records of {} could not be read",
                report.unreadable,
                source.display()
            )
        } else if report.damaged_regions > 0 {
            format!(
                "{} damaged regions of {} were skipped (the raw scan may not have found all they held)",
                report.damaged_regions,
                source.display()
            )
        } else {
            format!(
                "{} could not be read as a whole ({}), so the salvage cannot show that it found everything",
                source.display(),
                report.method
            )
        };
        Err(CommandError::SalvageIncomplete {
            message: format!(
                "the salvage is incomplete: {what}; what was readable is in {}",
                destination.display()
            ),
        })
    }
}

fn print_salvage(report: &SalvageReport, destination: &Path, into_outbox: bool, skipped: u64, json: bool) {
    // Carried over as it was; an undecodable record is kept, not read as a pause.
    let relay_paused = report
        .operator_holds
        .as_deref()
        .and_then(|record| OperatorHolds::decode(record).ok())
        .is_some_and(|holds| holds.relay_paused);
    if json {
        let mut value = serde_json::to_value(report).expect("the report serializes");
        value["relay_paused"] = json!(relay_paused);
        value["destination"] = json!(destination);
        value["skipped_duplicates"] = json!(skipped);
        print_json(&value);
        return;
    }
    println!(
        "salvaged {} pending tasks ({} entries) and {} dead letters from {} into {} {}",
        report.pending_tasks,
        report.pending_entries,
        report.dead_letters,
        report.source.display(),
        if into_outbox {
            "the new outbox"
        } else {
            "the NDJSON file"
        },
        destination.display()
    );
    println!("read with: {}", report.method);
    if report.raw_scan_tasks > 0 || report.raw_scan_published_skipped > 0 {
        println!(
            "raw scan of the log: {} tasks recovered, {} published ones left out",
            report.raw_scan_tasks, report.raw_scan_published_skipped
        );
    }
    if report.raw_scan_unmatched > 0 {
        println!(
            "raw scan of the log: {} more task records sled did not return (not written; see the note)",
            report.raw_scan_unmatched
        );
    }
    match (report.expected_pending_entries, report.expected_dead_letters) {
        (Some(entries), Some(dead)) => println!("the store's counters record: {entries} entries, {dead} dead letters"),
        _ => println!("the store's counters record: not readable"),
    }
    println!(
        "could not read: {} records{}",
        report.unreadable,
        if report.damaged_regions > 0 {
            format!(" ({} damaged regions skipped)", report.damaged_regions)
        } else {
            String::new()
        }
    );
    if relay_paused {
        println!("the relay was paused by an operator: the new outbox keeps the pause");
    }
    if skipped > 0 {
        println!("{skipped} tasks were found twice and written once");
    }
    for attempt in &report.attempts {
        println!("  tried {}: {}", attempt.copy, attempt.outcome);
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}
