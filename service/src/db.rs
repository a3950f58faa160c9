//! The database and the repository trait the service is written against.
//!
//! SQLite through `sqlx`, in a file in the temporary directory. SQLite runs
//! in process, where a query costs microseconds; the database a service puts
//! Redis in front of is across a network. `Db` can add that distance: every
//! query first waits `latency` (0 for SQLite as it is). The figure is
//! printed with the results.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};

/// A row of `users`. `version` goes up by one on every write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The primary key.
    pub id: i64,
    /// Changed by renames.
    pub name: String,
    /// Unique.
    pub email: String,
    /// Up by one on every write.
    pub version: i64,
}

/// Reads a `User` from a `SELECT id, name, email, version` row.
pub fn user_from_row(row: &SqliteRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        version: row.try_get("version")?,
    })
}

/// A failed query.
#[derive(Debug)]
pub struct RepoError(pub sqlx::Error);

impl From<sqlx::Error> for RepoError {
    fn from(error: sqlx::Error) -> Self {
        RepoError(error)
    }
}

impl std::fmt::Display for RepoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database error: {}", self.0)
    }
}

impl std::error::Error for RepoError {}

/// The data access the HTTP handlers use, as services write it: a trait,
/// so that handlers take `Arc<dyn UserRepo>` and tests can swap it.
#[async_trait]
pub trait UserRepo: Send + Sync {
    /// One user, or `None` if there is no such id.
    async fn user(&self, id: i64) -> Result<Option<User>, RepoError>;
    /// The users among `ids` that exist, by id.
    async fn users(&self, ids: &[i64]) -> Result<HashMap<i64, User>, RepoError>;
    /// Renames a user; the row as written, or `None` if there is no such id.
    async fn rename(&self, id: i64, name: &str) -> Result<Option<User>, RepoError>;
}

/// The connection pool, with a count of the queries sent through it.
pub struct Db {
    pool: SqlitePool,
    /// SQLite takes one writer at a time; writers queued on this
    /// one-connection pool wait in order instead of in SQLite's busy handler,
    /// which sleeps.
    writer: SqlitePool,
    path: PathBuf,
    queries: AtomicU64,
    latency: Duration,
}

impl Db {
    /// Creates a fresh database file with `users` rows, ids `1..=users`.
    pub async fn create(path: &Path, users: i64, latency: Duration) -> Result<Db, sqlx::Error> {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        sqlx::query(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, \
             email TEXT NOT NULL, version INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let mut tx = pool.begin().await?;
        for id in 1..=users {
            sqlx::query("INSERT INTO users (id, name, email, version) VALUES (?, ?, ?, 1)")
                .bind(id)
                .bind(format!("User {id}"))
                .bind(format!("user{id}@example.com"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Db {
            pool,
            writer,
            path: path.to_owned(),
            queries: AtomicU64::new(0),
            latency,
        })
    }

    /// The pool, for one query: counts the query and waits the simulated
    /// network latency first.
    pub async fn pool(&self) -> &SqlitePool {
        self.queries.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        &self.pool
    }

    /// The writer connection, for one write: counted and delayed as
    /// [`Db::pool`].
    pub async fn writer(&self) -> &SqlitePool {
        self.queries.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        &self.writer
    }

    /// The pool, for a check that is not part of the load (not counted,
    /// not delayed).
    pub fn reader(&self) -> &SqlitePool {
        &self.pool
    }

    /// Queries sent so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Every row's current version, read directly (not counted): the truth
    /// the load generator checks the service's answers against.
    pub async fn versions(&self) -> Result<HashMap<i64, i64>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, version FROM users")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("version")?)))
            .collect()
    }

    /// Closes the pool and deletes the database file.
    pub async fn remove(&self) {
        self.pool.close().await;
        self.writer.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}
