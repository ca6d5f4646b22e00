//! A damaged outbox, against the real binary: tasks spooled by a real
//! server (broker unreachable), the server stopped, then copies of its
//! store truncated at several offsets, with bytes flipped in the log, in
//! `conf` and in the snapshot. For each: `taskgate serve` and an `--offline`
//! command either exit 65 with a message naming the path and `outbox
//! salvage`, or (damage sled does not notice) run; never "panicked".
//! `taskgate outbox salvage` never writes to the damaged copy, recovers
//! only tasks that were accepted, each once, and at least every task whose
//! record is still intact in the file (the test reads the bytes itself);
//! the new outbox opens and `outbox stats --offline` counts them.
//!
//! Where sled opens a damaged log at an earlier state (it does, for some
//! cuts and flips), `serve` still exits 65: the outbox's accepted-sequence
//! watermark knows more was acknowledged. Salvage reads the whole store as
//! sled gives it and reports the intact task records sled did not return
//! (`raw_scan_unmatched`); `--include-unmatched` recovers them. The test
//! asserts exactly that, case by case; such a salvage is never complete
//! (exit 4), and its report says how far the watermark and the store
//! disagree (`acknowledged_past_store`).
//!
//! The second life also spools a few large tasks, which sled writes as
//! blob files; every blob cut short, or with bytes flipped, must make serve
//! refuse the store and salvage report itself incomplete.

mod support;

use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::app::{binary_path, test_settings, unique, write_config, GatewayProcess};
use support::operator::refused_amqp_url;

const SEGMENT: u64 = 512 * 1024;
const SINGLE_POSTS: usize = 600;
const BATCHES: usize = 12;
const BATCH: usize = 50;
/// Large tasks posted in the second life: sled stores each page holding
/// one as a file of its own in `blobs/` (a page above a quarter of its
/// 512 KiB segment), so blobs can be damaged too.
const LARGE_POSTS: usize = 8;
const LARGE_PADDING: usize = 160 * 1024;

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `taskgate --config CONFIG ARGS` with the outbox at `outbox`; a run
/// still going after `deadline` is killed (`code: None`): `serve` on a
/// store sled opened.
fn taskgate(config: &Path, outbox: &Path, args: &[&str], deadline: Duration) -> Run {
    let mut child = Command::new(binary_path())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TASKGATE_OUTBOX__PATH", outbox)
        .env("RUST_LOG", "info")
        .env_remove("TASKGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskgate");
    let started = Instant::now();
    let mut code = None;
    while started.elapsed() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            code = Some(status.code().expect("exited, not killed by a signal"));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if code.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    Run {
        code,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every file of a store, by name, with its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files.extend(contents(&entry.path()));
        } else {
            files.push((entry.path(), std::fs::read(entry.path()).unwrap()));
        }
    }
    files.sort();
    files
}

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with("snap."))
        .collect()
}

fn truncate(path: &Path, length: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(length)
        .unwrap();
}

fn flip(path: &Path, offset: u64, count: usize) {
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut bytes = vec![0u8; count];
    file.seek(SeekFrom::Start(offset)).unwrap();
    let read = file.read(&mut bytes).unwrap();
    for byte in &mut bytes[..read] {
        *byte ^= 0xff;
    }
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&bytes[..read]).unwrap();
}

/// The accepted tasks whose stored record is still whole in the store's
/// files: a JSON object starting `{"id":"…"` with an `args` field that
/// parses to the end.
fn intact_tasks(store: &Path, accepted: &HashSet<String>) -> HashSet<String> {
    let mut intact = HashSet::new();
    for (_, bytes) in contents(store) {
        let needle = b"{\"id\":\"";
        for at in 0..bytes.len().saturating_sub(needle.len()) {
            if &bytes[at..at + needle.len()] != needle {
                continue;
            }
            let mut stream = serde_json::Deserializer::from_slice(&bytes[at..]).into_iter::<Value>();
            if let Some(Ok(value)) = stream.next() {
                if let Some(id) = value["id"].as_str() {
                    if value.get("args").is_some() && accepted.contains(id) {
                        intact.insert(id.to_owned());
                    }
                }
            }
        }
    }
    intact
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Serve {
    /// sled cannot open it: exit 65 with the message.
    Refuses,
    /// Depends on where the damage falls: exit 65, or sled opens it.
    Either,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Recovers {
    /// Every accepted task.
    All,
    /// At least every task whose record is intact in the damaged file.
    Intact,
}

struct Case {
    name: String,
    damage: Box<dyn Fn(&Path)>,
    serve: Serve,
    recovers: Recovers,
    /// The damage destroys accepted tasks for certain: salvage must say
    /// it is incomplete (exit 4).
    loses_tasks: bool,
}

fn case(name: impl Into<String>, serve: Serve, recovers: Recovers, damage: impl Fn(&Path) + 'static) -> Case {
    Case {
        name: name.into(),
        damage: Box::new(damage),
        serve,
        recovers,
        loses_tasks: false,
    }
}

impl Case {
    fn loses_tasks(mut self) -> Self {
        self.loses_tasks = true;
        self
    }
}

fn blobs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Checks a run on a damaged store that must refuse it.
fn assert_refused(run: &Run, store: &Path, what: &str) {
    assert_eq!(run.code, Some(65), "{what}: exit 65 on a damaged outbox: {run:#?}");
    let path = store.display().to_string();
    assert!(
        run.stderr.contains(&format!("the outbox at {path} is damaged")),
        "{what}: the message names the path: {run:#?}"
    );
    assert!(
        run.stderr.contains("taskgate outbox salvage --offline"),
        "{what}: the message says what to do: {run:#?}"
    );
    assert!(!run.stderr.contains("panicked"), "{what}: no panic text: {run:#?}");
}

/// The ids of the tasks in the outbox at `outbox`, through the CLI.
fn exported_ids(config: &Path, outbox: &Path, scratch: &Path) -> Vec<String> {
    let file = scratch.join("export.ndjson");
    let run = taskgate(
        config,
        outbox,
        &["outbox", "export", "--offline", "--out", file.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "export of the salvaged outbox: {run:#?}");
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Salvages `store` into a new outbox under `scratch`; returns the report
/// and the ids of the tasks in the new outbox (checked against its stats).
fn salvage(config: &Path, store: &Path, scratch: &Path, extra: &[&str]) -> (Value, Vec<String>) {
    let target = scratch.join(unique("salvaged"));
    let mut args = vec![
        "outbox",
        "salvage",
        "--offline",
        "--json",
        "--to-outbox",
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = taskgate(config, store, &args, Duration::from_secs(180));
    assert!(!run.stderr.contains("panicked"), "salvage: no panic text: {run:#?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|error| panic!("{error}: {run:#?}"));
    let complete = report["complete"].as_bool().unwrap();
    assert_eq!(
        run.code,
        Some(if complete { 0 } else { 4 }),
        "salvage exit status: {run:#?}"
    );
    if !complete {
        assert!(run.stderr.contains("the salvage is incomplete"), "{run:#?}");
    }
    let stats = taskgate(
        config,
        &target,
        &["outbox", "stats", "--offline", "--json"],
        Duration::from_secs(60),
    );
    assert_eq!(stats.code, Some(0), "the salvaged outbox opens: {stats:#?}");
    let stats: Value = serde_json::from_str(&stats.stdout).unwrap();
    let ids = exported_ids(config, &target, scratch);
    assert_eq!(
        stats["depth"].as_u64().unwrap(),
        ids.len() as u64,
        "stats count the salvaged tasks"
    );
    assert_eq!(
        report["pending_entries"].as_u64().unwrap(),
        ids.len() as u64,
        "{report:#}"
    );
    (report, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_outbox_never_panics_and_salvage_recovers_its_intact_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("damaged");
    let settings = test_settings(dir.path(), &refused_amqp_url(), &[(&queue, "#")]);
    let config = dir.path().join("taskgate.toml");
    write_config(&settings, &config);
    let store = settings.outbox.path.clone();

    // Two lives, so that sled has written its snapshot, each spooling
    // single posts from eight clients and batches.
    let client = reqwest::Client::new();
    let mut accepted: Vec<String> = Vec::new();
    // Each producer's tasks, in the order it had them accepted.
    let mut sequences: Vec<Vec<String>> = Vec::new();
    for life in 0..2 {
        let mut gateway = GatewayProcess::start(&config, &dir.path().join(format!("life-{life}.log")));
        let mut producers = Vec::new();
        for producer in 0..8 {
            let client = client.clone();
            let url = gateway.url("/v1/tasks");
            producers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..SINGLE_POSTS / 8 {
                    let body = json!({"task": "export.project", "args": [life, producer, n], "kwargs": {"output_type": "xls"}});
                    let response = client.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(response.status(), 202);
                    let accepted: Value = response.json().await.unwrap();
                    ids.push(accepted["id"].as_str().unwrap().to_owned());
                }
                ids
            }));
        }
        for producer in producers {
            let ids = producer.await.unwrap();
            accepted.extend(ids.iter().cloned());
            sequences.push(ids);
        }
        let mut batched = Vec::new();
        for batch in 0..BATCHES {
            let tasks: Vec<Value> = (0..BATCH)
                .map(|n| json!({"task": "export.batch", "args": [life, batch, n]}))
                .collect();
            batched.extend(gateway.post_batch(&client, tasks).await);
        }
        accepted.extend(batched.iter().cloned());
        sequences.push(batched);
        if life == 1 {
            let mut large = Vec::new();
            for n in 0..LARGE_POSTS {
                let body =
                    json!({"task": "export.large", "args": [n], "kwargs": {"padding": "x".repeat(LARGE_PADDING)}});
                let response = client.post(gateway.url("/v1/tasks")).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 202);
                let answer: Value = response.json().await.unwrap();
                large.push(answer["id"].as_str().unwrap().to_owned());
            }
            accepted.extend(large.iter().cloned());
            sequences.push(large);
        }
        gateway.signal("TERM");
        assert_eq!(gateway.wait(Duration::from_secs(30)), Some(0), "a clean stop");
    }
    let accepted_set: HashSet<String> = accepted.iter().cloned().collect();
    assert_eq!(accepted_set.len(), 2 * (SINGLE_POSTS + BATCHES * BATCH) + LARGE_POSTS);
    assert!(!blobs(&store).is_empty(), "the large tasks made blob files");
    let log_bytes = std::fs::metadata(store.join("db")).unwrap().len();
    assert!(log_bytes > 6 * SEGMENT, "a log of several segments: {log_bytes} bytes");
    assert!(!snapshots(&store).is_empty(), "sled wrote a snapshot at the restart");

    // The intact store: all of it, complete.
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let (report, ids) = salvage(&config, &store, &scratch, &[]);
    assert_eq!(report["complete"], true, "{report:#}");
    assert_eq!(ids.iter().cloned().collect::<HashSet<_>>(), accepted_set);
    assert_in_acceptance_order(&ids, &sequences);

    let middle_boundary = log_bytes / 2 / SEGMENT * SEGMENT;
    let cases = vec![
        case("log cut to 0 bytes", Serve::Refuses, Recovers::Intact, |s| {
            truncate(&s.join("db"), 0)
        }),
        case("log cut to 1.5 MB", Serve::Refuses, Recovers::Intact, |s| {
            truncate(&s.join("db"), 1_500_000)
        }),
        case("log cut to half", Serve::Refuses, Recovers::Intact, move |s| {
            truncate(&s.join("db"), log_bytes / 2)
        }),
        case(
            format!("log cut at the segment boundary {middle_boundary}"),
            Serve::Refuses,
            Recovers::Intact,
            move |s| truncate(&s.join("db"), middle_boundary),
        ),
        case(
            "log cut to 1.5 MB, snapshot removed",
            Serve::Refuses,
            Recovers::Intact,
            |s| {
                truncate(&s.join("db"), 1_500_000);
                for snapshot in snapshots(s) {
                    std::fs::remove_file(snapshot).unwrap();
                }
            },
        ),
        case(
            "last 100 bytes of the log cut",
            Serve::Either,
            Recovers::All,
            move |s| truncate(&s.join("db"), log_bytes - 100),
        ),
        case(
            "16 bytes flipped at 1/3 of the log",
            Serve::Either,
            Recovers::Intact,
            move |s| flip(&s.join("db"), log_bytes / 3, 16),
        ),
        case(
            "16 bytes flipped at 1/2 of the log",
            Serve::Either,
            Recovers::Intact,
            move |s| flip(&s.join("db"), log_bytes / 2, 16),
        ),
        case(
            "16 bytes flipped at 4/5 of the log",
            Serve::Either,
            Recovers::Intact,
            move |s| flip(&s.join("db"), log_bytes * 4 / 5, 16),
        ),
        case(
            "the header of the last segment flipped",
            Serve::Either,
            Recovers::Intact,
            move |s| flip(&s.join("db"), (log_bytes - 1) / SEGMENT * SEGMENT, 8),
        ),
        case("a byte of conf flipped", Serve::Refuses, Recovers::All, |s| {
            flip(&s.join("conf"), 5, 1)
        }),
        case("snapshot bytes flipped", Serve::Refuses, Recovers::All, |s| {
            for snapshot in snapshots(s) {
                flip(&snapshot, 40, 4);
            }
        }),
        case("snapshot emptied", Serve::Refuses, Recovers::All, |s| {
            for snapshot in snapshots(s) {
                truncate(&snapshot, 0);
            }
        }),
        case("every blob cut to 1000 bytes", Serve::Refuses, Recovers::Intact, |s| {
            for blob in blobs(s) {
                truncate(&blob, 1000);
            }
        })
        .loses_tasks(),
        case(
            "8 bytes flipped in the middle of every blob",
            Serve::Refuses,
            Recovers::Intact,
            |s| {
                for blob in blobs(s) {
                    let length = std::fs::metadata(&blob).unwrap().len();
                    flip(&blob, length / 2, 8);
                }
            },
        )
        .loses_tasks(),
    ];

    for (number, case) in cases.iter().enumerate() {
        let damaged = dir.path().join(format!("case-{number}"));
        copy_dir(&store, &damaged);
        (case.damage)(&damaged);
        let before = contents(&damaged);
        let intact = intact_tasks(&damaged, &accepted_set);

        // serve and an --offline command, each on its own copy (sled's
        // recovery writes to what it opens, even when it then fails).
        let serve_copy = dir.path().join(format!("case-{number}-serve"));
        copy_dir(&damaged, &serve_copy);
        let served = taskgate(&config, &serve_copy, &["serve"], Duration::from_secs(8));
        assert!(
            !served.stderr.contains("panicked"),
            "{}: serve prints no panic: {served:#?}",
            case.name
        );
        let serve_outcome = match served.code {
            Some(65) => {
                assert_refused(&served, &serve_copy, &format!("{}: serve", case.name));
                "exit 65"
            }
            None => {
                assert!(
                    served.stderr.contains("taskgate listening"),
                    "{}: sled opened it and serve runs: {served:#?}",
                    case.name
                );
                assert_eq!(
                    case.serve,
                    Serve::Either,
                    "{}: serve must refuse it: {served:#?}",
                    case.name
                );
                "serves"
            }
            Some(_) => panic!("{}: serve exits 65 or runs: {served:#?}", case.name),
        };
        let stats_copy = dir.path().join(format!("case-{number}-stats"));
        copy_dir(&damaged, &stats_copy);
        let stats = taskgate(
            &config,
            &stats_copy,
            &["outbox", "stats", "--offline"],
            Duration::from_secs(60),
        );
        assert!(
            !stats.stderr.contains("panicked"),
            "{}: stats prints no panic: {stats:#?}",
            case.name
        );
        if serve_outcome == "exit 65" {
            assert_refused(&stats, &stats_copy, &format!("{}: outbox stats --offline", case.name));
        }

        let (report, ids) = salvage(&config, &damaged, &scratch, &[]);
        assert_eq!(
            contents(&damaged),
            before,
            "{}: salvage never writes to the damaged store",
            case.name
        );
        let recovered: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(recovered.len(), ids.len(), "{}: each task once", case.name);
        assert!(
            recovered.is_subset(&accepted_set),
            "{}: only tasks that were accepted: {report:#}",
            case.name
        );
        let missing: Vec<&String> = intact.difference(&recovered).collect();
        let mut unmatched_note = String::new();
        let mut with_everything = recovered.clone();
        if !missing.is_empty() {
            // Only where sled read the store as a whole and gave an earlier
            // state: salvage says how many records it did not return.
            assert!(
                report["method"].as_str().unwrap().starts_with("sled"),
                "{}: {} intact tasks not recovered: {report:#}",
                case.name,
                missing.len()
            );
            assert!(
                report["raw_scan_unmatched"].as_u64().unwrap() >= missing.len() as u64,
                "{}: the unmatched records are reported: {report:#}",
                case.name
            );
            // The store's watermark knew more had been accepted: serve
            // refused it rather than run with those tasks gone.
            assert_eq!(
                serve_outcome,
                "exit 65",
                "{}: a store that lost {} accepted tasks is not served: {served:#?}",
                case.name,
                missing.len()
            );
            let (_, with_unmatched) = salvage(&config, &damaged, &scratch, &["--include-unmatched"]);
            let with_unmatched: HashSet<String> = with_unmatched.into_iter().collect();
            assert!(
                intact.is_subset(&with_unmatched) && with_unmatched.is_subset(&accepted_set),
                "{}: --include-unmatched recovers every intact task, and only accepted ones",
                case.name
            );
            with_everything = with_unmatched;
            unmatched_note = format!(
                ", sled silently dropped {} (reported; all back with --include-unmatched)",
                missing.len()
            );
        }
        // The watermark knew: a store sled opened at an earlier state than
        // it had acknowledged is refused by serve and is never a complete
        // salvage (whether or not the lost tasks' records are intact).
        if served.stderr.contains("earlier state than it had acknowledged") {
            assert!(
                report["acknowledged_past_store"].is_object() && report["complete"] == false,
                "{}: serve saw acknowledged tasks missing; salvage must say so: {report:#}",
                case.name
            );
        }
        if case.loses_tasks {
            assert_eq!(
                report["complete"], false,
                "{}: accepted tasks were destroyed; salvage must not call itself complete: {report:#}",
                case.name
            );
            assert_eq!(serve_outcome, "exit 65", "{}: {served:#?}", case.name);
        }
        if case.recovers == Recovers::All {
            let lost = accepted_set.difference(&with_everything).count();
            assert_eq!(lost, 0, "{}: every accepted task: {report:#}", case.name);
        }
        eprintln!(
            "{:45} serve: {serve_outcome:8} salvage: {:5} of {} accepted ({} intact in the file), {} by raw scan, \
             unreadable {}, complete {}, via {}{unmatched_note}",
            case.name,
            recovered.len(),
            accepted_set.len(),
            intact.len(),
            report["raw_scan_tasks"],
            report["unreadable"],
            report["complete"],
            report["method"].as_str().unwrap(),
        );
        for path in [damaged, serve_copy, stats_copy] {
            let _ = std::fs::remove_dir_all(path);
        }
    }

    // The NDJSON form reads back as an export.
    let damaged = dir.path().join("ndjson-case");
    copy_dir(&store, &damaged);
    truncate(&damaged.join("db"), log_bytes / 2);
    let file = scratch.join("salvaged.ndjson");
    let run = taskgate(
        &config,
        &damaged,
        &["outbox", "salvage", "--offline", "--to-ndjson", file.to_str().unwrap()],
        Duration::from_secs(180),
    );
    assert_eq!(run.code, Some(4), "a cut log is an incomplete salvage: {run:#?}");
    assert!(run.stdout.starts_with("salvaged "), "{run:#?}");
    assert!(run.stdout.contains("could not read: "), "{run:#?}");
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(accepted_set.contains(line["id"].as_str().unwrap()), "{line}");
        assert!(line["args"].is_array() && line["queues"] == json!([queue]), "{line}");
    }
    // Without --offline it refuses, and it never writes into the source.
    let run = taskgate(
        &config,
        &damaged,
        &["outbox", "salvage", "--to-ndjson", file.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stderr.contains("--offline"), "{run:#?}");
}

/// Each producer's tasks appear in `ids` in the order they were accepted
/// (the lane's FIFO order survives the salvage).
fn assert_in_acceptance_order(ids: &[String], sequences: &[Vec<String>]) {
    let position: std::collections::HashMap<&String, usize> = ids.iter().enumerate().map(|(at, id)| (id, at)).collect();
    for sequence in sequences {
        let positions: Vec<usize> = sequence.iter().filter_map(|id| position.get(id).copied()).collect();
        assert!(
            positions.windows(2).all(|pair| pair[0] < pair[1]),
            "a producer's tasks keep their order"
        );
    }
}
