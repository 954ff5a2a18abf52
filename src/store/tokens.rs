//! The `qlik_tokens` collection: one document per user with exactly the fields
//! `user_id, access_token, refresh_token, expires_at, created_at, updated_at` (dates as BSON dates).

use chrono::{DateTime, Utc};
use mongodb::Collection;
use mongodb::bson::{self, doc};
use serde::Deserialize;

use super::StoreError;
use crate::secret::Secret;

/// A user's tokens as stored.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub user_id: String,
    pub access_token: Secret<String>,
    pub refresh_token: Secret<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Tokens to store for a user, as an OAuth token response yields them.
#[derive(Debug, Clone)]
pub struct NewTokens {
    pub access_token: Secret<String>,
    pub refresh_token: Secret<String>,
    pub expires_at: DateTime<Utc>,
}

/// The document as MongoDB holds it. Unknown fields are ignored so later schema additions do not
/// break a running older binary.
#[derive(Deserialize)]
struct TokenDocument {
    user_id: String,
    access_token: String,
    refresh_token: String,
    expires_at: bson::DateTime,
    created_at: bson::DateTime,
    updated_at: bson::DateTime,
}

#[derive(Clone)]
pub struct TokenStore {
    collection: Collection<TokenDocument>,
}

fn bson_date(at: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

fn chrono_date(at: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl TokenStore {
    pub(super) fn new(db: &mongodb::Database, name: &str) -> Self {
        Self { collection: db.collection(name) }
    }

    /// Inserts or replaces the user's tokens; `created_at` keeps its first value.
    #[tracing::instrument(skip_all)]
    pub async fn save(&self, user_id: &str, tokens: &NewTokens, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.collection
            .update_one(
                doc! { "user_id": user_id },
                doc! {
                    "$set": {
                        "access_token": tokens.access_token.expose(),
                        "refresh_token": tokens.refresh_token.expose(),
                        "expires_at": bson_date(tokens.expires_at),
                        "updated_at": bson_date(now),
                    },
                    "$setOnInsert": { "created_at": bson_date(now) },
                },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub async fn get(&self, user_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let found = self.collection.find_one(doc! { "user_id": user_id }).await?;
        Ok(found.map(|d| StoredToken {
            user_id: d.user_id,
            access_token: Secret::new(d.access_token),
            refresh_token: Secret::new(d.refresh_token),
            expires_at: chrono_date(d.expires_at),
            created_at: chrono_date(d.created_at),
            updated_at: chrono_date(d.updated_at),
        }))
    }

    /// Deletes the user's tokens; `false` when there were none.
    #[tracing::instrument(skip_all)]
    pub async fn delete(&self, user_id: &str) -> Result<bool, StoreError> {
        let result = self.collection.delete_one(doc! { "user_id": user_id }).await?;
        Ok(result.deleted_count > 0)
    }
}
