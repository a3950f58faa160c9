//! Renames written behind: the same `users` rows, changed through the
//! cache and flushed to SQLite in batches ([`flush`]), beside the
//! repository's own write-through of the same change
//! ([`WriteThrough::save`]). `src/bin/write_bench.rs` measures the
//! three ways a rename can reach the database.

use std::sync::Arc;

use cache_runtime::{Cache, Change, WriteBehindError, WriteQueue, cache_put, write_behind};

use crate::cached::SqliteUserRepo;
use crate::db::{Db, RepoError, User, user_from_row};

/// The queue of the users' changes.
pub const USERS: WriteQueue<User> = WriteQueue::new("users");

/// A write the cache could not queue, or a failed query.
#[derive(Debug)]
pub enum WriteError {
    /// The cache could not queue the change.
    Cache(WriteBehindError),
    /// The database failed.
    Db(RepoError),
}

impl From<WriteBehindError> for WriteError {
    fn from(error: WriteBehindError) -> Self {
        WriteError::Cache(error)
    }
}

impl From<RepoError> for WriteError {
    fn from(error: RepoError) -> Self {
        WriteError::Db(error)
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Cache(error) => error.fmt(f),
            WriteError::Db(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for WriteError {}

/// Writes of `users` rows by write-behind, on `cache`.
pub struct WriteBehind {
    /// The cache the changes are queued on.
    pub cache: Cache,
}

impl WriteBehind {
    /// Stores `user` as `user:<id>`'s entry and queues it: no SQL.
    #[write_behind(SqliteUserRepo::user(id), queue = USERS, cache = self.cache)]
    pub async fn save(&self, id: i64, user: User) -> Result<User, WriteError> {
        Ok(User { id, ..user })
    }
}

/// Writes of `users` rows by write-through, on `cache`.
pub struct WriteThrough {
    /// The database.
    pub db: Arc<Db>,
    /// The cache the written row is stored in.
    pub cache: Cache,
}

impl WriteThrough {
    /// `UPDATE`s the row, then stores it as `user:<id>`'s entry.
    #[cache_put(SqliteUserRepo::user(id), cache = self.cache)]
    pub async fn save(&self, id: i64, user: User) -> Result<User, WriteError> {
        Ok(update(&self.db, id, &user).await?)
    }
}

/// The plain `UPDATE` of a rename, as a service writes it without a
/// cache: the row's name and version, if the version is newer.
pub async fn update(db: &Db, id: i64, user: &User) -> Result<User, RepoError> {
    sqlx::query("UPDATE users SET name = ?, version = ? WHERE id = ? AND version < ?")
        .bind(&user.name)
        .bind(user.version)
        .bind(id)
        .bind(user.version)
        .execute(db.writer().await)
        .await?;
    Ok(user.clone())
}

/// The flush of [`USERS`]: one transaction per batch, each row written
/// only if its version is newer (a change seen twice after a crash, or
/// flushed after a newer one by another path, changes nothing).
pub async fn flush(db: &Db, changes: &[Change<User>]) -> Result<(), RepoError> {
    let mut tx = db.writer().await.begin().await?;
    for change in changes {
        let user = &change.value;
        sqlx::query("UPDATE users SET name = ?, version = ? WHERE id = ? AND version < ?")
            .bind(&user.name)
            .bind(user.version)
            .bind(user.id)
            .bind(user.version)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A row as the database has it (not counted as a query).
pub async fn row(db: &Db, id: i64) -> Result<Option<User>, RepoError> {
    let row = sqlx::query("SELECT id, name, email, version FROM users WHERE id = ?")
        .bind(id)
        .fetch_optional(db.reader())
        .await?;
    Ok(row.as_ref().map(user_from_row).transpose()?)
}
