//! `taskgate dead-letters list|requeue|purge`, through the admin API or
//! `--offline` on a stopped server's data directory.
//!
//! A dead letter's id is the number `list` shows. Requeueing puts the task
//! back at the tail of its lane; purging deletes for good and asks first
//! unless `--yes`.

use super::admin_client::AdminClient;
use super::command::{CommandError, ServerArgs};
use super::offline::{OfflineError, OfflineOutbox};
use super::output::{self, print_json};
use crate::config::Settings;
use crate::http::admin::{DeadLetterPage, Purged, MAX_PAGE};
use crate::outbox::operations::{DeadLetterEntry, DeadLetterError, RequeueOutcome};
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    #[command(subcommand)]
    pub command: DeadLetterCommand,
    /// Open the data directory directly instead of asking the server
    /// (server stopped).
    #[arg(long, global = true)]
    pub offline: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Every dead letter with its reason (--json: a JSON array).
    List,
    /// Put dead letters back at the tail of their lane.
    Requeue {
        /// Dead-letter ids, as `list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<u64>,
        /// Requeue every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good: the given ids, or all of them.
    Purge {
        /// Dead-letter ids; none means all.
        ids: Vec<u64>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// The two ways to reach dead letters, behind one interface.
enum Store {
    Server(AdminClient),
    Offline(OfflineOutbox),
}

impl Store {
    fn list(&self) -> Result<Vec<DeadLetterEntry>, CommandError> {
        let mut letters = Vec::new();
        let mut after: Option<u64> = None;
        loop {
            let (mut page, next) = match self {
                Self::Server(client) => {
                    let mut path = format!("/v1/dead-letters?limit={MAX_PAGE}");
                    if let Some(after) = after {
                        path.push_str(&format!("&after={after}"));
                    }
                    let page: DeadLetterPage = client.get(&path)?;
                    (page.dead_letters, page.next_after)
                }
                Self::Offline(offline) => {
                    let page = offline
                        .outbox()
                        .dead_letters(after, MAX_PAGE)
                        .map_err(OfflineError::from)?;
                    let next = (page.len() == MAX_PAGE)
                        .then(|| page.last().map(|l| l.sequence))
                        .flatten();
                    (page.into_iter().map(DeadLetterEntry::from).collect(), next)
                }
            };
            letters.append(&mut page);
            match next {
                Some(next) => after = Some(next),
                None => return Ok(letters),
            }
        }
    }

    fn requeue(&self, id: u64) -> Result<DeadLetterEntry, CommandError> {
        match self {
            Self::Server(client) => Ok(client.post(&format!("/v1/dead-letters/{id}/requeue"))?),
            Self::Offline(offline) => match offline.outbox().requeue_dead_letter(id) {
                Ok(entry) => Ok(entry),
                Err(DeadLetterError::Outbox(error)) => Err(OfflineError::from(error).into()),
                Err(other) => Err(CommandError::Invalid(other.to_string())),
            },
        }
    }

    fn requeue_all(&self) -> Result<RequeueOutcome, CommandError> {
        match self {
            Self::Server(client) => Ok(client.post("/v1/dead-letters/requeue")?),
            Self::Offline(offline) => Ok(offline
                .outbox()
                .requeue_all_dead_letters()
                .map_err(OfflineError::from)?),
        }
    }

    fn delete(&self, id: u64) -> Result<DeadLetterEntry, CommandError> {
        match self {
            Self::Server(client) => Ok(client.delete(&format!("/v1/dead-letters/{id}"))?),
            Self::Offline(offline) => offline
                .outbox()
                .delete_dead_letter(id)
                .map_err(OfflineError::from)?
                .ok_or_else(|| CommandError::Invalid(format!("there is no dead letter {id}"))),
        }
    }

    fn purge_all(&self) -> Result<u64, CommandError> {
        match self {
            Self::Server(client) => Ok(client.delete::<Purged>("/v1/dead-letters")?.purged),
            Self::Offline(offline) => Ok(offline.outbox().purge_dead_letters().map_err(OfflineError::from)?),
        }
    }

    /// Offline changes must reach the disk before we say they happened.
    fn flush(&self) -> Result<(), CommandError> {
        match self {
            Self::Server(_) => Ok(()),
            Self::Offline(offline) => Ok(offline.flush()?),
        }
    }

    fn describe(&self, settings: &Settings) -> String {
        match self {
            Self::Server(client) => format!("the server at {}", client.base_url()),
            Self::Offline(_) => format!("the outbox at {}", settings.outbox.path.display()),
        }
    }
}

pub fn run(settings: &Settings, json: bool, args: DeadLetterArgs) -> Result<(), CommandError> {
    let store = if args.offline {
        Store::Offline(OfflineOutbox::open(settings)?)
    } else {
        Store::Server(args.server.client(settings)?)
    };
    match args.command {
        DeadLetterCommand::List => {
            let letters = store.list()?;
            print_letters(&letters, json);
            Ok(())
        }
        DeadLetterCommand::Requeue { all: true, .. } => {
            let outcome = store.requeue_all()?;
            store.flush()?;
            if json {
                print_json(&outcome);
            } else {
                println!("requeued {} dead letters", outcome.requeued);
                if outcome.undecodable > 0 {
                    println!(
                        "{} could not be decoded and stay; inspect them with `dead-letters list`, delete them with `dead-letters purge ID`",
                        outcome.undecodable
                    );
                }
            }
            Ok(())
        }
        DeadLetterCommand::Requeue { ids, .. } => {
            let mut requeued = Vec::with_capacity(ids.len());
            let result = ids.iter().try_for_each(|id| {
                requeued.push(store.requeue(*id)?);
                Ok::<_, CommandError>(())
            });
            store.flush()?;
            if json {
                print_json(&requeued);
            } else {
                for entry in &requeued {
                    println!("requeued dead letter {} ({})", entry.id, describe_task(entry));
                }
            }
            result
        }
        DeadLetterCommand::Purge { ids, yes } => {
            let question = if ids.is_empty() {
                format!(
                    "Delete ALL dead letters of {}? Their tasks will never run.",
                    store.describe(settings)
                )
            } else {
                format!(
                    "Delete {} dead letter(s) of {}? Their tasks will never run.",
                    ids.len(),
                    store.describe(settings)
                )
            };
            if !output::confirm(&question, yes) {
                return Err(CommandError::Aborted("purged"));
            }
            let mut purged = 0;
            let result = if ids.is_empty() {
                store.purge_all().map(|count| purged = count)
            } else {
                ids.iter().try_for_each(|id| {
                    store.delete(*id)?;
                    purged += 1;
                    Ok(())
                })
            };
            // What was deleted before a failure stays deleted: make it durable.
            store.flush()?;
            result?;
            if json {
                print_json(&json!({"purged": purged}));
            } else {
                println!("purged {purged} dead letters");
            }
            Ok(())
        }
    }
}

fn describe_task(entry: &DeadLetterEntry) -> String {
    match (&entry.task_id, &entry.task_name) {
        (Some(id), Some(name)) => format!("{name} {id}"),
        _ => "undecodable record".to_owned(),
    }
}

fn print_letters(letters: &[DeadLetterEntry], json: bool) {
    if json {
        print_json(&letters);
        return;
    }
    if letters.is_empty() {
        println!("no dead letters");
        return;
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|letter| {
            vec![
                letter.id.to_string(),
                letter.task_id.map(|id| id.to_string()).unwrap_or_else(|| "-".into()),
                letter
                    .task_name
                    .as_ref()
                    .map(|name| name.to_string())
                    .unwrap_or_else(|| "(undecodable)".into()),
                letter.lane.to_string(),
                letter.attempts.to_string(),
                letter.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                output::truncate(&letter.reason, 60),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["ID", "TASK ID", "TASK", "LANE", "ATTEMPTS", "DEAD AT", "REASON"],
            &rows
        )
    );
}
