//! A PostgreSQL database of its own for one test (the local server,
//! 127.0.0.1:5432, trust auth; scripts/test starts it and turns on TLS with
//! the test certificates in `$TASKGATE_TLS_DIR`).

use crate::support::fault_proxy::FaultProxy;
use sqlx::postgres::PgPool;
use sqlx::Connection as _;

pub const POSTGRES_HOST: &str = "127.0.0.1:5432";

pub fn postgres_url(host: &str, database: &str) -> String {
    format!("postgres://postgres@{host}/{database}")
}

/// A database of its own for one test: `CREATE DATABASE tg_<random>`,
/// dropped (connections and all) when the test ends. A PostgreSQL that is
/// not there fails the test: scripts/test starts it.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let name = format!("tg_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&postgres_url(POSTGRES_HOST, "postgres"))
            .await
            .unwrap_or_else(|error| {
                panic!("PostgreSQL must run on {POSTGRES_HOST} with trust auth (scripts/test starts it): {error}")
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("CREATE DATABASE");
        let _ = admin.close().await;
        TestDatabase { name }
    }

    pub fn url(&self) -> String {
        postgres_url(POSTGRES_HOST, &self.name)
    }

    pub fn url_via(&self, proxy: &FaultProxy) -> String {
        postgres_url(&proxy.addr().to_string(), &self.name)
    }

    /// Celery's SQLAlchemy URL for the same database (SQLAlchemy 2.1 picks
    /// psycopg 3 for a bare `postgresql://`; the venv has psycopg2).
    pub fn celery_result_backend(&self) -> String {
        format!("db+postgresql+psycopg2://postgres@{POSTGRES_HOST}/{}", self.name)
    }

    /// A direct pool (never through a proxy), to look at the rows.
    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url())
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&postgres_url(POSTGRES_HOST, "postgres")).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// The test certificates scripts/test makes (`$TASKGATE_TLS_DIR`, default
/// `/var/tmp/taskgate-tls`): `ca.pem`, `server.pem` for `localhost` only,
/// `client.pem` / `client.key`.
pub fn tls_dir() -> std::path::PathBuf {
    std::env::var_os("TASKGATE_TLS_DIR")
        .filter(|value| !value.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp/taskgate-tls"))
}
