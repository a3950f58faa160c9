//! The same repository with caching: `plain.rs` plus attributes, nothing
//! else changed (a test checks it). Single and batch lookups share the
//! entries `user:<id>`, ids that do not exist are cached for 5 s, and a
//! rename deletes the entry after its `UPDATE` commits.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use cache_runtime::{cached_impl, invalidates, redis_cached};

use crate::db::{Db, RepoError, User, UserRepo, user_from_row};

/// `UserRepo` on SQLite.
pub struct SqliteUserRepo {
    /// The database it reads and writes.
    pub db: Arc<Db>,
}

#[cached_impl]
#[async_trait]
impl UserRepo for SqliteUserRepo {
    #[redis_cached(key = "user:<id>", ttl = 60, none_ttl = "5s", single_flight)]
    async fn user(&self, id: i64) -> Result<Option<User>, RepoError> {
        let row = sqlx::query("SELECT id, name, email, version FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(self.db.pool().await)
            .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

    #[redis_cached(key = "user:<ids>", ttl = 60, none_ttl = "5s", batch)]
    async fn users(&self, ids: &[i64]) -> Result<HashMap<i64, User>, RepoError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // SQLite has no array parameters: one `?` per id.
        let marks = vec!["?"; ids.len()].join(", ");
        let sql = format!("SELECT id, name, email, version FROM users WHERE id IN ({marks})");
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id);
        }
        let rows = query.fetch_all(self.db.pool().await).await?;
        let mut users = HashMap::with_capacity(rows.len());
        for row in &rows {
            let user = user_from_row(row)?;
            users.insert(user.id, user);
        }
        Ok(users)
    }

    #[invalidates(Self::user(id))]
    async fn rename(&self, id: i64, name: &str) -> Result<Option<User>, RepoError> {
        let row = sqlx::query(
            "UPDATE users SET name = ?, version = version + 1 WHERE id = ? \
             RETURNING id, name, email, version",
        )
        .bind(name)
        .bind(id)
        .fetch_optional(self.db.writer().await)
        .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }
}
