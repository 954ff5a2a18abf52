//! The `qlik_tokens` collection: one document per user. This file is the connection store (save,
//! read, delete, re-seal, and marking a token an MCP server refused); the refresher's lease
//! protocol over the same documents is in `leases`.
//!
//! The seed's fields keep their names and meaning: `user_id, access_token, refresh_token,
//! expires_at, created_at, updated_at` (dates as BSON dates), with the two token values sealed by
//! [`TokenCipher`]. Added for the refresher: `status` (`active` or `reauth_required`), `version`
//! (incremented by every write, the fence of compare-and-swap), while a replica holds a lease
//! `lease_owner` and `lease_until`, and after transient refresh failures `refresh_failures`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use mongodb::Collection;
use mongodb::bson::{self, Document, doc};
use serde::Deserialize;

use super::StoreError;
use crate::crypto::TokenCipher;
use crate::provider::Provider;
use crate::secret::Secret;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    Active,
    /// The provider refused the refresh token for good; only a new connect flow helps.
    ReauthRequired,
}

impl TokenStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::ReauthRequired => "reauth_required",
        }
    }
}

/// A user's tokens as stored, decrypted.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub(crate) user_id: String,
    pub access_token: Secret<String>,
    pub refresh_token: Secret<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub status: TokenStatus,
    pub(crate) version: i64,
}

/// Tokens to store for a user, as an OAuth token response yields them.
#[derive(Debug, Clone)]
pub struct NewTokens {
    pub access_token: Secret<String>,
    pub refresh_token: Secret<String>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Deserialize)]
pub(super) struct TokenDocument {
    pub(super) user_id: String,
    pub(super) access_token: String,
    pub(super) refresh_token: String,
    pub(super) expires_at: bson::DateTime,
    pub(super) created_at: bson::DateTime,
    pub(super) updated_at: bson::DateTime,
    #[serde(default)]
    pub(super) status: Option<String>,
    #[serde(default)]
    pub(super) version: i64,
    #[serde(default)]
    pub(super) refresh_failures: u32,
}

#[derive(Clone)]
pub struct TokenStore {
    pub(super) collection: Collection<TokenDocument>,
    pub(super) raw: Collection<Document>,
    cipher: Arc<TokenCipher>,
    name: &'static str,
}

/// A [`TokenStore`] for every provider, built once by a long-lived holder (the worker) instead
/// of one per lookup. The match is exhaustive, so a lookup cannot miss and a new provider cannot
/// be forgotten here.
#[derive(Clone)]
pub(crate) struct TokenStores {
    qlik: TokenStore,
}

impl TokenStores {
    pub(super) fn new(db: &mongodb::Database, cipher: &Arc<TokenCipher>) -> Self {
        Self { qlik: TokenStore::new(db, Provider::Qlik, cipher.clone()) }
    }

    pub(crate) fn get(&self, provider: Provider) -> &TokenStore {
        match provider {
            Provider::Qlik => &self.qlik,
        }
    }
}

/// Reads a stored document. One of the wrong shape (written by older code or by hand: a date
/// stored as a string, a missing field) is `Unreadable`, naming the field, like a value whose
/// seal cannot be opened: no retry will make it readable, only the user reconnecting.
pub(super) fn decode(raw: Document) -> Result<TokenDocument, StoreError> {
    serde_path_to_error::deserialize(bson::Deserializer::new(bson::Bson::Document(raw))).map_err(|e| {
        // serde's message quotes the value it found, which for a token field may be the token
        // itself: only the field's name and the expected type are kept.
        let inner = e.inner().to_string();
        let problem = if inner.starts_with("missing field") {
            inner
        } else {
            let expected = inner.rsplit_once(", expected ").map_or("of another type", |(_, expected)| expected);
            format!("field `{}` is not {expected}", e.path())
        };
        StoreError::Unreadable(format!("a stored token has the wrong shape: {problem}"))
    })
}

pub(super) fn bson_date(at: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

pub(super) fn chrono_date(at: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl TokenStore {
    pub(super) fn new(db: &mongodb::Database, provider: Provider, cipher: Arc<TokenCipher>) -> Self {
        let name = provider.token_collection();
        Self { collection: db.collection(name), raw: db.collection(name), cipher, name }
    }

    /// Associated data binding a sealed value to its collection, user and field.
    fn context(&self, user_id: &str, field: &str) -> String {
        format!("{}/{user_id}/{field}", self.name)
    }

    pub(super) fn seal_tokens(&self, user_id: &str, tokens: &NewTokens) -> (String, String) {
        (
            self.cipher.seal(&tokens.access_token, &self.context(user_id, "access_token")),
            self.cipher.seal(&tokens.refresh_token, &self.context(user_id, "refresh_token")),
        )
    }

    pub(super) fn open(&self, user_id: &str, field: &str, stored: &str) -> Result<Secret<String>, StoreError> {
        self.cipher
            .open(stored, &self.context(user_id, field))
            .map_err(|e| StoreError::Unreadable(format!("{field} of a stored token: {e}")))
    }

    /// Inserts or replaces the user's tokens (a new connection): status active, lease dropped,
    /// version bumped; `created_at` keeps its first value.
    #[tracing::instrument(skip_all)]
    pub async fn save(&self, user_id: &str, tokens: &NewTokens, now: DateTime<Utc>) -> Result<(), StoreError> {
        let (access, refresh) = self.seal_tokens(user_id, tokens);
        self.raw
            .update_one(
                doc! { "user_id": user_id },
                doc! {
                    "$set": {
                        "access_token": access,
                        "refresh_token": refresh,
                        "expires_at": bson_date(tokens.expires_at),
                        "updated_at": bson_date(now),
                        "status": TokenStatus::Active.as_str(),
                    },
                    "$setOnInsert": { "created_at": bson_date(now) },
                    "$inc": { "version": 1_i64 },
                    "$unset": { "lease_owner": "", "lease_until": "", "refresh_failures": "" },
                },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all)]
    pub async fn get(&self, user_id: &str) -> Result<Option<StoredToken>, StoreError> {
        let Some(raw) = self.raw.find_one(doc! { "user_id": user_id }).await? else {
            return Ok(None);
        };
        let d = decode(raw)?;
        Ok(Some(StoredToken {
            access_token: self.open(&d.user_id, "access_token", &d.access_token)?,
            refresh_token: self.open(&d.user_id, "refresh_token", &d.refresh_token)?,
            expires_at: chrono_date(d.expires_at),
            created_at: chrono_date(d.created_at),
            updated_at: chrono_date(d.updated_at),
            status: match d.status.as_deref() {
                Some("reauth_required") => TokenStatus::ReauthRequired,
                _ => TokenStatus::Active,
            },
            version: d.version,
            user_id: d.user_id,
        }))
    }

    /// Deletes the user's tokens; `false` when there were none.
    #[tracing::instrument(skip_all)]
    pub async fn delete(&self, user_id: &str) -> Result<bool, StoreError> {
        let result = self.raw.delete_one(doc! { "user_id": user_id }).await?;
        Ok(result.deleted_count > 0)
    }

    /// Marks the user's token `reauth_required` because an MCP server refused it, if the stored
    /// token is still at `version` (not renewed or replaced since). `false` when it moved on.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn mark_refused(
        &self,
        user_id: &str,
        version: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let update = doc! {
            "$set": { "status": TokenStatus::ReauthRequired.as_str(), "updated_at": bson_date(now) },
            "$inc": { "version": 1_i64 },
        };
        let filter = doc! { "user_id": user_id, "version": version };
        Ok(self.raw.update_one(filter, update).await?.modified_count == 1)
    }

    /// Re-seals every value not sealed with the active key. Each document is rewritten only if it
    /// did not change meanwhile (by version), so a concurrent refresh is never undone. Returns how
    /// many documents were re-sealed.
    pub async fn reencrypt(&self) -> Result<u64, StoreError> {
        let TokenCipher::Sealed(ring) = self.cipher.as_ref() else {
            return Err(StoreError::Unreadable("no encryption key is configured".into()));
        };
        let mut cursor = self.collection.find(doc! {}).await?;
        let mut rewritten = 0;
        while cursor.advance().await? {
            let d = cursor.deserialize_current()?;
            if ring.is_current(&d.access_token) && ring.is_current(&d.refresh_token) {
                continue;
            }
            let tokens = NewTokens {
                access_token: self.open(&d.user_id, "access_token", &d.access_token)?,
                refresh_token: self.open(&d.user_id, "refresh_token", &d.refresh_token)?,
                expires_at: chrono_date(d.expires_at),
            };
            let (access, refresh) = self.seal_tokens(&d.user_id, &tokens);
            let result = self
                .raw
                .update_one(
                    doc! { "user_id": &d.user_id, "version": d.version },
                    doc! { "$set": { "access_token": access, "refresh_token": refresh }, "$inc": { "version": 1_i64 } },
                )
                .await?;
            rewritten += result.modified_count;
        }
        Ok(rewritten)
    }
}
