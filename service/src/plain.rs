//! The repository as the team wrote it, before caching. `cached.rs` is this
//! file with attributes added and nothing else changed (a test checks it).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::db::{Db, RepoError, User, UserRepo, user_from_row};

/// `UserRepo` on SQLite.
pub struct SqliteUserRepo {
    /// The database it reads and writes.
    pub db: Arc<Db>,
}

#[async_trait]
impl UserRepo for SqliteUserRepo {
    async fn user(&self, id: i64) -> Result<Option<User>, RepoError> {
        let row = sqlx::query("SELECT id, name, email, version FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(self.db.pool().await)
            .await?;
        Ok(row.as_ref().map(user_from_row).transpose()?)
    }

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
