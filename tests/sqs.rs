//! taskgate on SQS against a real SQS API (moto, from the test virtualenv):
//! a stock Celery worker consumes what taskgate sends, a `#`-bound FIFO
//! queue gets every task with a MessageGroupId, a blackholed endpoint
//! never blocks the HTTP side, poison messages are dead-lettered alone, a
//! missing queue is reported, and a backlog goes out in full batches.
//!
//! One moto server per test binary; every test uses its own queue name
//! prefix, so tests run in parallel against it.

mod support;

use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use support::app::{spawn_app, TestApp};
use support::celery::{CeleryWorker, CeleryWorkerOptions};
use support::fault_proxy::{FaultMode, FaultProxy};
use support::moto::{self, MotoServer};
use taskgate::broker::sqs::{sqs_queue_name, BATCH_CALLS_METRIC};
use taskgate::config::Settings;

async fn moto_server() -> &'static MotoServer {
    tokio::task::spawn_blocking(moto::server).await.expect("moto server")
}

struct SqsTest {
    app: TestApp,
    prefix: String,
    client: aws_sdk_sqs::Client,
    _data: tempfile::TempDir,
}

impl SqsTest {
    /// taskgate on SQS at `endpoint_url` (moto, or a proxy in front of it).
    async fn start(endpoint_url: &str, queues: &[(&str, &str)], adjust: impl FnOnce(&mut Settings)) -> SqsTest {
        let moto = moto_server().await;
        let data = tempfile::tempdir().unwrap();
        let mut settings = moto::sqs_settings(data.path(), endpoint_url, &moto::unique_prefix(), queues);
        adjust(&mut settings);
        let prefix = settings.broker.queue_name_prefix.clone().unwrap_or_default();
        SqsTest {
            app: spawn_app(settings).await,
            prefix,
            client: moto::client(&moto.endpoint_url()),
            _data: data,
        }
    }

    fn sqs_name(&self, queue: &str) -> String {
        sqs_queue_name(&self.prefix, queue)
    }

    async fn post_accepted(&self, body: Value) -> String {
        self.app.post_accepted(body).await
    }

    async fn post_batch(&self, tasks: Vec<Value>) -> Vec<String> {
        let response = self
            .app
            .client
            .post(self.app.url("/v1/tasks/batch"))
            .json(&json!({ "tasks": tasks }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{answer:#}");
        answer["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn task_status(&self, id: &str) -> Value {
        self.app
            .client
            .get(self.app.url(&format!("/v1/tasks/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait_for_empty_outbox(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.app.outbox_depth().await;
            if depth == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox still holds {depth} task(s) after {timeout:?}; health: {:#}",
                self.app.health().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `SendMessageBatch` calls made for one of this test's queues so far
    /// (the counter is labelled by SQS queue, so parallel tests do not mix).
    async fn batch_calls(&self, queue: &str) -> u64 {
        let text = self.app.metrics().await;
        let label = format!("queue=\"{}\"", self.sqs_name(queue));
        text.lines()
            .find(|line| line.starts_with(BATCH_CALLS_METRIC) && line.contains(&label))
            .and_then(|line| line.rsplit(' ').next())
            .map(|value| value.parse::<f64>().expect("a counter value") as u64)
            .unwrap_or(0)
    }
}

fn ids(messages: &[moto::SqsMessage]) -> BTreeSet<String> {
    messages.iter().map(moto::SqsMessage::task_id).collect()
}

/// Posts two tasks routed to `queue` (arguments, keyword arguments,
/// non-ASCII text), lets taskgate send them, then runs a stock Celery worker
/// on kombu's SQS transport with `transport_options`, consuming `queue`,
/// and checks what it executed.
async fn assert_celery_executes(test: &SqsTest, queue: &str, transport_options: Value) {
    let add_id = test
        .post_accepted(json!({"task": "rawa.add", "args": [2, 3], "kwargs": {"scale": 10}}))
        .await;
    let text = "héllo ✓ — 日本語 🚀 \"quoted\" \\ back\nslash";
    let echo_id = test
        .post_accepted(json!({"task": "rawa.echo", "kwargs": {"text": text}}))
        .await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;
    assert_eq!(test.task_status(&add_id).await["state"], "published");

    let mut options = transport_options;
    options["wait_time_seconds"] = json!(1);
    options["polling_interval"] = json!(0.2);
    let worker = CeleryWorker::start_async(
        CeleryWorkerOptions::new(moto_server().await.celery_broker_url())
            .queue(queue, "rawa")
            .exchange(&test.app.settings.routing.exchange)
            .transport_options(options),
    )
    .await;
    let records = worker.wait_for_records_async(2, Duration::from_secs(60)).await;
    let by_id: BTreeMap<String, &Value> = records
        .iter()
        .map(|record| (record["id"].as_str().unwrap().to_owned(), record))
        .collect();
    let add = by_id
        .get(&add_id)
        .unwrap_or_else(|| panic!("rawa.add not executed: {records:#?}"));
    assert_eq!(add["task"], "rawa.add");
    assert_eq!(add["args"], json!([2, 3]));
    assert_eq!(add["kwargs"], json!({"scale": 10}));
    assert_eq!(add["delivery_info"]["routing_key"], "rawa");
    assert_eq!(add["request"]["root_id"], add_id.as_str());
    let echo = by_id
        .get(&echo_id)
        .unwrap_or_else(|| panic!("rawa.echo not executed: {records:#?}"));
    assert_eq!(echo["args"], json!([]));
    assert_eq!(echo["kwargs"], json!({"text": text}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_celery_worker_on_sqs_executes_what_taskgate_publishes() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("rawa", "rawa")], |_| {}).await;
    let options = json!({"region": moto::REGION, "queue_name_prefix": test.prefix});
    assert_celery_executes(&test, "rawa", options).await;
}

/// The README's setup for workers that may not list or create queues:
/// `predefined_queues` keyed by the full SQS names. kombu picks the client
/// for acknowledging by prefix + routing key, so that must be a key too
/// (here the queue's own name, as with a `rawa` queue bound `rawa`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_worker_with_predefined_queues_executes_what_taskgate_publishes() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("rawa", "rawa")], |_| {}).await;
    let sqs_name = test.sqs_name("rawa");
    // The queue must exist before a worker with predefined queues starts:
    // taskgate creates it in the background at start-up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = loop {
        match test.client.get_queue_url().queue_name(&sqs_name).send().await {
            Ok(output) => break output.queue_url.unwrap(),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => panic!("taskgate did not create {sqs_name}: {error:?}"),
        }
    };
    let options = json!({
        "region": moto::REGION,
        "queue_name_prefix": test.prefix,
        "predefined_queues": {sqs_name.as_str(): {"url": url}},
    });
    assert_celery_executes(&test, "rawa", options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_also_lands_in_the_fifo_queue_with_a_message_group() {
    let moto = moto_server().await;
    let test = SqsTest::start(
        &moto.endpoint_url(),
        &[("rawa", "rawa"), ("platform.fifo", "#")],
        |_| {},
    )
    .await;
    let first = test.post_accepted(json!({"task": "rawa.add", "args": [1, 2]})).await;
    let grouped = test
        .post_accepted(json!({"task": "rawa.echo", "args": ["x"], "properties": {"message_group_id": "org-7"}}))
        .await;
    let other = test.post_accepted(json!({"task": "other.thing", "args": []})).await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;

    let fifo = test.sqs_name("platform.fifo");
    assert_eq!(fifo, format!("{}platform.fifo", test.prefix));
    let messages = moto::receive(&test.client, &fifo, 3, Duration::from_secs(20)).await;
    assert_eq!(
        ids(&messages),
        BTreeSet::from([first.clone(), grouped.clone(), other.clone()])
    );
    for message in &messages {
        let id = message.task_id();
        let expected_group = if id == grouped { "org-7" } else { "taskgate" };
        assert_eq!(message.message_group_id.as_deref(), Some(expected_group), "{id}");
        assert_eq!(
            message.deduplication_id.as_deref(),
            Some(format!("{id}:{fifo}").as_str())
        );
        assert_eq!(message.envelope["properties"]["body_encoding"], "base64");
    }
    // Acceptance order within a message group.
    let default_group: Vec<String> = messages
        .iter()
        .filter(|m| m.message_group_id.as_deref() == Some("taskgate"))
        .map(|m| m.task_id())
        .collect();
    assert_eq!(default_group, vec![first.clone(), other.clone()]);

    let standard = moto::receive(&test.client, &test.sqs_name("rawa"), 2, Duration::from_secs(20)).await;
    assert_eq!(ids(&standard), BTreeSet::from([first.clone(), grouped.clone()]));
    assert!(standard.iter().all(|m| m.message_group_id.is_none()));

    let attribute = |name| moto::queue_attribute(&test.client, &fifo, name);
    assert_eq!(attribute(QueueAttributeName::FifoQueue).await.as_deref(), Some("true"));
    assert_eq!(
        attribute(QueueAttributeName::ContentBasedDeduplication)
            .await
            .as_deref(),
        Some("false")
    );
    for id in [&first, &grouped, &other] {
        assert_eq!(test.task_status(id).await["state"], "published", "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_endpoint_never_blocks_and_everything_is_delivered_after_recovery() {
    let moto = moto_server().await;
    let proxy = FaultProxy::start(moto.address()).unwrap();
    proxy.set_mode(FaultMode::Blackhole);
    let started = Instant::now();
    let test = SqsTest::start(&format!("http://{}", proxy.addr()), &[("rawa", "rawa")], |_| {}).await;
    let health = test.app.health().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "start-up took {:?}",
        started.elapsed()
    );
    assert_eq!(health["async_available"], false, "{health:#}");

    let mut posted = BTreeSet::new();
    for index in 0..5 {
        let sent = Instant::now();
        posted.insert(
            test.post_accepted(json!({"task": "rawa.add", "args": [index, 1]}))
                .await,
        );
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "POST took {:?}",
            sent.elapsed()
        );
    }
    // Long enough for several timed-out calls: still spooling, still answering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = Instant::now();
    let health = test.app.health().await;
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(health["async_available"], false, "{health:#}");
    assert_eq!(
        health["checks"]["broker:connection"][0]["observedValue"], false,
        "{health:#}"
    );
    assert_eq!(test.app.outbox_depth().await, 5);

    proxy.set_mode(FaultMode::Pass);
    test.wait_for_empty_outbox(Duration::from_secs(30)).await;
    test.app
        .wait_for_health(Duration::from_secs(10), |h| h["async_available"] == true)
        .await;
    let messages = moto::receive(&test.client, &test.sqs_name("rawa"), 5, Duration::from_secs(20)).await;
    assert!(
        ids(&messages).is_superset(&posted),
        "delivered {:?}, posted {posted:?}",
        ids(&messages)
    );
}

/// A task whose SQS message would pass SQS's 1 MiB limit is refused at
/// the door (413, naming the task and the limit) and nothing of its batch
/// is accepted; one just under the limit is accepted and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_too_large_for_sqs_is_refused_with_413_and_its_batch_with_it() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("rawb", "rawb")], |_| {}).await;
    let chosen: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    // ~800 kB of arguments: over 1 MiB once kombu base64s them twice.
    let response = test
        .app
        .client
        .post(test.app.url("/v1/tasks/batch"))
        .json(&json!({"tasks": [
            {"task": "rawb.echo", "id": chosen[0], "args": ["one"]},
            {"task": "rawb.echo", "id": chosen[1], "args": ["x".repeat(800_000)]},
            {"task": "rawb.echo", "id": chosen[2], "args": ["three"]},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 413, "{problem:#}");
    assert_eq!(problem["field"], "tasks[1]", "{problem:#}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("1048576") && detail.contains(&test.sqs_name("rawb")),
        "{problem:#}"
    );
    for id in &chosen {
        let status = test
            .app
            .client
            .get(test.app.url(&format!("/v1/tasks/{id}")))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "nothing of the refused batch was accepted: {id}");
    }
    assert_eq!(test.app.outbox_depth().await, 0);

    // 500 kB of arguments: about 900 kB as kombu sends it, within the limit.
    let big = test
        .post_accepted(json!({"task": "rawb.echo", "args": ["y".repeat(500_000)]}))
        .await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;
    assert_eq!(test.task_status(&big).await["state"], "published");
    let messages = moto::receive(&test.client, &test.sqs_name("rawb"), 1, Duration::from_secs(20)).await;
    assert_eq!(ids(&messages), BTreeSet::from([big]));
}

/// What intake lets through can still be too large for SQS when it is
/// published (spooled by an older taskgate, or imported): only that
/// message of its window is dead-lettered, unsent; the rest go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_oversized_message_of_a_batch_is_dead_lettered() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("rawa", "rawa")], |_| {}).await;
    // ~800 kB of arguments: over 1 MiB once kombu base64s them twice.
    // Written into the outbox directly: intake would refuse it (above).
    let huge = "x".repeat(800_000);
    let ids_posted = accept_past_intake(
        &test,
        vec![
            json!({"task": "rawa.echo", "args": ["one"]}),
            json!({"task": "rawa.echo", "args": ["two"]}),
            json!({"task": "rawa.echo", "args": [huge]}),
            json!({"task": "rawa.echo", "args": ["four"]}),
        ],
    )
    .await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;

    let dead = test.task_status(&ids_posted[2]).await;
    assert_eq!(dead["state"], "dead_letter", "{dead:#}");
    assert!(dead["last_error"].as_str().unwrap().contains("exceeds"), "{dead:#}");
    let delivered: BTreeSet<String> = [0, 1, 3].iter().map(|&i| ids_posted[i].clone()).collect();
    for id in &delivered {
        assert_eq!(test.task_status(id).await["state"], "published", "{id}");
    }
    let messages = moto::receive(&test.client, &test.sqs_name("rawa"), 3, Duration::from_secs(20)).await;
    assert_eq!(ids(&messages), delivered);
    // The three went out together; the oversized one was never sent.
    assert_eq!(test.batch_calls("rawa").await, 1);
}

/// Accepts `requests` into the running gateway's outbox as one batch,
/// past the HTTP intake's broker checks (as an older taskgate spooled them).
async fn accept_past_intake(test: &SqsTest, requests: Vec<Value>) -> Vec<String> {
    let state = &test.app.state;
    let now = chrono::Utc::now();
    let tasks = requests
        .into_iter()
        .map(|request| {
            let request: taskgate::task::TaskRequest = serde_json::from_value(request).unwrap();
            let task = taskgate::task::intake::accept(request, &state.registry, &state.router, now).unwrap();
            let lanes = state.publisher.lanes_for(&task);
            (task, lanes)
        })
        .collect();
    match state.outbox.accept(tasks, None).await.unwrap() {
        taskgate::outbox::AcceptOutcome::Accepted(acceptances) => {
            acceptances.iter().map(|acceptance| acceptance.id.to_string()).collect()
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sqs_refuses_is_dead_lettered_alone() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("small", "#")], |_| {}).await;
    // A queue that takes at most 2 KiB per message: SQS refuses the whole
    // batch that holds a bigger one, and taskgate must find the culprit.
    // taskgate may already have created the queue: set the limit either way.
    let client = &test.client;
    let name = test.sqs_name("small");
    let url = match client.create_queue().queue_name(&name).send().await {
        Ok(output) => output.queue_url.unwrap(),
        Err(_) => moto::queue_url(client, &name).await,
    };
    client
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(QueueAttributeName::MaximumMessageSize, "2048")
        .send()
        .await
        .unwrap();

    let ids_posted = test
        .post_batch(vec![
            json!({"task": "rawa.echo", "args": ["one"]}),
            json!({"task": "rawa.echo", "args": ["y".repeat(3000)]}),
            json!({"task": "rawa.echo", "args": ["three"]}),
        ])
        .await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;
    let refused = test.task_status(&ids_posted[1]).await;
    assert_eq!(refused["state"], "dead_letter", "{refused:#}");
    assert!(
        refused["last_error"].as_str().unwrap().contains("refused the message"),
        "{refused:#}"
    );
    let messages = moto::receive(&test.client, &name, 2, Duration::from_secs(20)).await;
    assert_eq!(
        ids(&messages),
        BTreeSet::from([ids_posted[0].clone(), ids_posted[2].clone()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_reported_in_health_when_queues_may_not_be_created() {
    let moto = moto_server().await;
    let test = SqsTest::start(&moto.endpoint_url(), &[("absent", "#")], |settings| {
        settings.broker.create_queues = Some(false);
    })
    .await;
    let name = test.sqs_name("absent");
    let health = test
        .app
        .wait_for_health(Duration::from_secs(10), |h| {
            h["checks"]["broker:connection"][0]["output"]
                .as_str()
                .is_some_and(|o| o.contains("create_queues"))
        })
        .await;
    assert_eq!(health["async_available"], false, "{health:#}");
    assert!(
        health["checks"]["broker:connection"][0]["output"]
            .as_str()
            .unwrap()
            .contains(&name),
        "{health:#}"
    );

    // Permanent: dead-lettered with the reason rather than retried forever.
    let lost = test.post_accepted(json!({"task": "rawa.echo", "args": ["lost"]})).await;
    test.wait_for_empty_outbox(Duration::from_secs(20)).await;
    let status = test.task_status(&lost).await;
    assert_eq!(status["state"], "dead_letter", "{status:#}");
    assert!(
        status["last_error"].as_str().unwrap().contains("does not exist"),
        "{status:#}"
    );

    // Once an operator creates it, the background resolver finds it.
    test.client.create_queue().queue_name(&name).send().await.unwrap();
    test.app
        .wait_for_health(Duration::from_secs(20), |h| h["async_available"] == true)
        .await;
    let delivered = test
        .post_accepted(json!({"task": "rawa.echo", "args": ["delivered"]}))
        .await;
    let messages = moto::receive(&test.client, &name, 1, Duration::from_secs(20)).await;
    assert_eq!(ids(&messages), BTreeSet::from([delivered]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_1000_tasks_goes_out_in_about_100_send_message_batch_calls() {
    let moto = moto_server().await;
    let proxy = FaultProxy::start(moto.address()).unwrap();
    // Refused: nothing is sent (not even GetQueueUrl gets through), so the
    // backlog builds up in the outbox.
    proxy.set_mode(FaultMode::Refuse);
    // moto answers one request at a time (about 0.1-0.2 s per batch here):
    // with several batches in flight each waits for the others, so give
    // the calls room; the count of calls is what is measured.
    let test = SqsTest::start(&format!("http://{}", proxy.addr()), &[("bulk", "#")], |settings| {
        settings.broker.publish_timeout_ms = 10_000;
    })
    .await;
    let tasks: Vec<Value> = (0..1000).map(|i| json!({"task": "bulk.item", "args": [i]})).collect();
    let posted = test.post_batch(tasks).await;
    assert_eq!(posted.len(), 1000);
    assert_eq!(test.app.outbox_depth().await, 1000);
    let before = test.batch_calls("bulk").await;

    proxy.set_mode(FaultMode::Pass);
    test.wait_for_empty_outbox(Duration::from_secs(60)).await;
    let calls = test.batch_calls("bulk").await - before;
    // A batch that timed out while moto served the other tests' calls is
    // sent again: each re-sent or failed task may cost a call of its own.
    let republished = test.app.counter("taskgate_republished_total").await;
    let failed = test.app.counter("taskgate_publish_failures_total").await;
    eprintln!("SendMessageBatch calls for a backlog of 1000 tasks: {calls} ({republished} re-sent, {failed} failed)");
    assert!(
        calls >= 100 && calls <= 110 + republished.div_ceil(10) + failed.div_ceil(10),
        "{calls} SendMessageBatch calls for 1000 tasks ({republished} re-sent, {failed} failed)"
    );
    let count = moto::queue_attribute(
        &test.client,
        &test.sqs_name("bulk"),
        QueueAttributeName::ApproximateNumberOfMessages,
    )
    .await;
    let count: u64 = count.expect("the queue's message count").parse().unwrap();
    assert!(
        (1000..=1000 + republished).contains(&count),
        "{count} messages for 1000 tasks, {republished} re-sent"
    );
}
