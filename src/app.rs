//! Building and running the server, and the shutdown order.
//!
//! [`Application::build`] opens the outbox, binds the listener and starts
//! the background pieces (publisher connection manager, relay, health
//! monitor, outbox maintenance). Nothing here waits on the broker.
//!
//! Shutdown, on one signal (SIGTERM, SIGINT, or the future given to
//! [`Application::run_until_stopped`]):
//! 1. stop accepting: the HTTP server stops taking connections and lets
//!    requests in flight finish (within `http.shutdown_grace_ms`; what is
//!    still open then, such as event streams, is closed);
//! 2. finish in-flight publishes: the relay completes its current round
//!    (bounded by `http.shutdown_grace_ms`) and stops;
//! 3. stop tracking: the journal writer and the tracking-queue consumer
//!    finish the batch they are writing (bounded by the grace period);
//!    unrecorded journal entries stay in the outbox, unacknowledged
//!    messages go back to their queue; then its database pool closes;
//! 4. flush the outbox;
//! 5. close the broker connection.

use crate::broker::amqp::AmqpPublisher;
use crate::broker::sqs::SqsPublisher;
use crate::broker::Publisher;
use crate::config::{BrokerKind, Environment, Settings};
use crate::health::HealthMonitor;
use crate::http::{self, AppState, Services};
use crate::outbox::Outbox;
use crate::relay::breaker::Breaker;
use crate::relay::Relay;
use crate::systemd;
use crate::task::registry::Registry;
use crate::task::routing::TopicRouter;
use crate::tracking::Tracking;
use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The process-wide Prometheus recorder (metrics' recorder is global).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then our
            // handle simply renders nothing new, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    background: CancellationToken,
    relay_task: tokio::task::JoinHandle<()>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // The recorder goes in before anything that counts starts: the
        // relay's first round (re-sends after a crash, its first
        // publishes) runs as soon as it is spawned, and a count made
        // before the recorder is installed is lost without a trace.
        let metrics = metrics_handle();
        let settings = Arc::new(settings);
        if settings.environment == Environment::Production && !settings.registry.strict {
            tracing::warn!(
                "registry.strict is off in production: any task name is accepted and published, \
                 so a typo or a forged name reaches the workers; list the tasks and set registry.strict = true"
            );
        }
        let router = Arc::new(TopicRouter::from_settings(&settings.routing).context("routing settings")?);
        let registry = Arc::new(Registry::from_settings(&settings.registry).context("registry settings")?);
        let outbox_settings = settings.outbox.clone();
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(&outbox_settings))
            .await?
            .with_context(|| format!("opening the outbox at {}", settings.outbox.path.display()))?;
        let listener = TcpListener::bind(settings.http.listen)
            .await
            .with_context(|| format!("binding {}", settings.http.listen))?;
        let publisher: Arc<dyn Publisher> = match settings.broker.kind {
            BrokerKind::Amqp => AmqpPublisher::start(settings.broker.clone(), (*router).clone()),
            BrokerKind::Sqs => {
                let create_queues = settings.broker.creates_queues(settings.environment);
                SqsPublisher::start(settings.broker.clone(), (*router).clone(), create_queues)
            }
        };
        let breaker = Arc::new(Breaker::new(&settings.breaker));
        let relay = Relay::new(
            outbox.clone(),
            publisher.clone(),
            breaker.clone(),
            settings.relay.clone(),
        )
        .context("reading the operator's holds from the outbox")?;
        let background = CancellationToken::new();
        let relay_task = tokio::spawn(relay.clone().run(background.clone()));
        // In the background: migrations, journal writer, tracking consumer.
        let tracking = Tracking::start(&settings, outbox.clone()).context("tracking settings")?;
        let health = HealthMonitor::start(
            outbox.clone(),
            publisher.status(),
            breaker.subscribe(),
            settings.http.warn_backlog_age_seconds,
            tracking.clone(),
            background.clone(),
        );
        spawn_maintenance(outbox.clone(), background.clone());
        let state = AppState::new(Services {
            settings,
            registry,
            router,
            outbox,
            publisher,
            breaker,
            relay,
            health,
            metrics,
            tracking,
        });
        Ok(Self {
            listener,
            state,
            background,
            relay_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `stop` resolves, then shuts down in order.
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            background,
            relay_task,
        } = self;
        let grace = Duration::from_millis(state.settings.http.shutdown_grace_ms);
        let stop_accepting = CancellationToken::new();
        let stopping = stop_accepting.clone();
        let app = http::router(state.clone());
        let address = listener.local_addr()?;
        tracing::info!(%address, "taskgate listening");
        // systemd: ready once serving; watchdog pings until this returns.
        let notifier = systemd::Notifier::from_env();
        let _watchdog = notifier.start_watchdog();
        notifier.ready(&format!("listening on {address}"));
        let stopping_notifier = notifier.clone();
        // Our own accept loop (src/http/server.rs): connection cap, header,
        // idle and request timeouts, the peer address for the admin API.
        let limits = http::server::Limits::from_settings(&state.settings.http);
        let server = http::server::serve(listener, app, limits, async move {
            stop.await;
            stopping.cancel();
        });
        // Streams (SSE) would keep graceful shutdown waiting forever: give
        // requests in flight the grace period, then move on.
        let server = async move {
            let mut serve = tokio::spawn(server);
            stop_accepting.cancelled().await;
            stopping_notifier.stopping("shutting down: finishing in-flight publishes");
            tracing::info!("shutting down: no longer accepting tasks");
            match tokio::time::timeout(grace, &mut serve).await {
                Ok(joined) => joined.map_err(anyhow::Error::from)?.map_err(anyhow::Error::from),
                Err(_) => {
                    tracing::warn!("requests still open after the grace period; closing them");
                    // Dropping the server closes its remaining connections.
                    serve.abort();
                    Ok(())
                }
            }
        };
        let served = server.await;
        background.cancel();
        match tokio::time::timeout(grace, relay_task).await {
            Ok(_) => tracing::info!("in-flight publishes finished"),
            Err(_) => {
                tracing::warn!("in-flight publishes did not finish within the grace period; they stay in the outbox")
            }
        }
        state.tracking.shutdown(grace).await;
        if let Err(error) = state.outbox.flush().await {
            tracing::error!(%error, "final outbox flush failed");
        }
        state.publisher.shutdown().await;
        tracing::info!(depth = state.outbox.depth(), "taskgate stopped");
        served
    }
}

fn spawn_maintenance(outbox: Arc<Outbox>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.cancelled() => return,
            }
            let outbox = outbox.clone();
            match tokio::task::spawn_blocking(move || outbox.prune()).await {
                Ok(Ok(removed)) if removed > 0 => tracing::debug!(removed, "pruned outbox statuses"),
                Ok(Err(error)) => tracing::warn!(%error, "outbox maintenance failed"),
                _ => {}
            }
        }
    });
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
