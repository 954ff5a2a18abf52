//! The `qlik_tokens` collection: one document per user.
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
use mongodb::options::ReturnDocument;
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

/// A token the refresher may renew.
#[derive(Debug, Clone)]
pub struct DueToken {
    pub(crate) user_id: String,
    pub(crate) version: i64,
}

/// Active tokens due for refresh, counted (see [`TokenStore::backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueCounts {
    /// Expiring within the lead time, already expired included.
    pub due: u64,
    /// Already expired.
    pub overdue: u64,
    /// The earliest expiry among the due ones.
    pub earliest: Option<DateTime<Utc>>,
}

/// A token this replica holds the lease on. Writes made with it succeed only while the document
/// still has this version and this refresh token (compare-and-swap). Its `Debug` leaves out the
/// stored refresh token, which is plain text when encryption is off.
#[derive(Clone)]
pub struct ClaimedToken {
    pub(crate) user_id: String,
    pub(crate) refresh_token: Secret<String>,
    pub(crate) expires_at: DateTime<Utc>,
    /// Transient failures in a row before this claim, for the backoff.
    pub(crate) failures: u32,
    version: i64,
    sealed_refresh_token: String,
    owner: String,
}

impl std::fmt::Debug for ClaimedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedToken")
            .field("user_id", &self.user_id)
            .field("expires_at", &self.expires_at)
            .field("version", &self.version)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenDocument {
    user_id: String,
    access_token: String,
    refresh_token: String,
    expires_at: bson::DateTime,
    created_at: bson::DateTime,
    updated_at: bson::DateTime,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    version: i64,
    #[serde(default)]
    refresh_failures: u32,
}

#[derive(Clone)]
pub struct TokenStore {
    collection: Collection<TokenDocument>,
    raw: Collection<Document>,
    cipher: Arc<TokenCipher>,
    name: &'static str,
}

/// Reads a stored document. One of the wrong shape (written by older code or by hand: a date
/// stored as a string, a missing field) is `Unreadable`, naming the field, like a value whose
/// seal cannot be opened: no retry will make it readable, only the user reconnecting.
fn decode(raw: Document) -> Result<TokenDocument, StoreError> {
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

    fn seal_tokens(&self, user_id: &str, tokens: &NewTokens) -> (String, String) {
        (
            self.cipher.seal(&tokens.access_token, &self.context(user_id, "access_token")),
            self.cipher.seal(&tokens.refresh_token, &self.context(user_id, "refresh_token")),
        )
    }

    fn open(&self, user_id: &str, field: &str, stored: &str) -> Result<Secret<String>, StoreError> {
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

    /// Active tokens expiring before `until` that nobody holds a lease on, soonest first. Runs
    /// on the `expires_at` index, so its cost follows the number of due tokens.
    #[tracing::instrument(skip_all)]
    pub async fn due(&self, now: DateTime<Utc>, until: DateTime<Utc>, limit: i64) -> Result<Vec<DueToken>, StoreError> {
        let filter = doc! {
            "expires_at": { "$lte": bson_date(until) },
            "status": { "$ne": TokenStatus::ReauthRequired.as_str() },
            // Not leased, or the lease ran out. Written without `$or`, which some MongoDB-wire
            // servers (SecantusDB) answer with a collection scan.
            "lease_until": { "$not": { "$gt": bson_date(now) } },
        };
        let mut cursor = self
            .raw
            .find(filter)
            .sort(doc! { "expires_at": 1 })
            .limit(limit)
            .projection(doc! { "user_id": 1, "version": 1 })
            .await?;
        let mut due = Vec::new();
        while cursor.advance().await? {
            let d = cursor.current();
            let Ok(user_id) = d.get_str("user_id") else { continue };
            due.push(DueToken { user_id: user_id.to_owned(), version: d.get_i64("version").unwrap_or(0) });
        }
        Ok(due)
    }

    /// How many active tokens expire before `until` and before `now`, and the earliest expiry
    /// among them: the refresher's backlog, for the metrics. Leased tokens count, since they
    /// are not renewed yet. Three queries on the `expires_at` index.
    #[tracing::instrument(skip_all)]
    pub async fn backlog(&self, now: DateTime<Utc>, until: DateTime<Utc>) -> Result<DueCounts, StoreError> {
        let active = |before: DateTime<Utc>| {
            doc! {
                "expires_at": { "$lte": bson_date(before) },
                "status": { "$ne": TokenStatus::ReauthRequired.as_str() },
            }
        };
        let due = self.raw.count_documents(active(until)).await?;
        let overdue = self.raw.count_documents(active(now)).await?;
        let earliest = self
            .raw
            .find_one(active(until))
            .sort(doc! { "expires_at": 1 })
            .projection(doc! { "expires_at": 1 })
            .await?
            .and_then(|d| d.get_datetime("expires_at").ok().map(|at| chrono_date(*at)));
        Ok(DueCounts { due, overdue, earliest })
    }

    /// Takes the lease on a due token if it is still at `version`, active and unleased. `None`
    /// when another replica got there first or the token changed since the scan.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn claim(
        &self,
        due: &DueToken,
        owner: &str,
        now: DateTime<Utc>,
        lease: chrono::Duration,
    ) -> Result<Option<ClaimedToken>, StoreError> {
        let filter = doc! {
            "user_id": &due.user_id,
            "version": due.version,
            "status": { "$ne": TokenStatus::ReauthRequired.as_str() },
            "lease_until": { "$not": { "$gt": bson_date(now) } },
        };
        let update = doc! {
            "$set": { "lease_owner": owner, "lease_until": bson_date(now.checked_add_signed(lease).unwrap_or(DateTime::<Utc>::MAX_UTC)) },
            "$inc": { "version": 1_i64 },
        };
        let claimed =
            self.collection.find_one_and_update(filter, update).return_document(ReturnDocument::After).await?;
        let Some(d) = claimed else { return Ok(None) };
        Ok(Some(ClaimedToken {
            refresh_token: self.open(&d.user_id, "refresh_token", &d.refresh_token)?,
            expires_at: chrono_date(d.expires_at),
            failures: d.refresh_failures,
            version: d.version,
            sealed_refresh_token: d.refresh_token,
            owner: owner.to_owned(),
            user_id: d.user_id,
        }))
    }

    /// The filter of every write made under a lease: same version, same refresh token, same owner.
    fn fenced(claimed: &ClaimedToken) -> Document {
        doc! {
            "user_id": &claimed.user_id,
            "version": claimed.version,
            "refresh_token": &claimed.sealed_refresh_token,
            "lease_owner": &claimed.owner,
        }
    }

    /// Stores refreshed tokens if the lease still holds. `false` means the document moved on
    /// (reconnected, deleted, or taken over after the lease ran out) and nothing was written.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn complete_refresh(
        &self,
        claimed: &ClaimedToken,
        tokens: &NewTokens,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (access, refresh) = self.seal_tokens(&claimed.user_id, tokens);
        let update = doc! {
            "$set": {
                "access_token": access,
                "refresh_token": refresh,
                "expires_at": bson_date(tokens.expires_at),
                "updated_at": bson_date(now),
            },
            "$inc": { "version": 1_i64 },
            "$unset": { "lease_owner": "", "lease_until": "", "refresh_failures": "" },
        };
        Ok(self.raw.update_one(Self::fenced(claimed), update).await?.modified_count == 1)
    }

    /// Marks the token as needing a new connect flow, if the lease still holds.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn mark_reauth_required(
        &self,
        claimed: &ClaimedToken,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let update = doc! {
            "$set": { "status": TokenStatus::ReauthRequired.as_str(), "updated_at": bson_date(now) },
            "$inc": { "version": 1_i64 },
            "$unset": { "lease_owner": "", "lease_until": "" },
        };
        Ok(self.raw.update_one(Self::fenced(claimed), update).await?.modified_count == 1)
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

    /// Gives the lease back after a transient failure, keeping others off the token until
    /// `retry_at` (the lease doubles as the backoff, shared by all replicas).
    #[tracing::instrument(skip_all)]
    pub(crate) async fn release(&self, claimed: &ClaimedToken, retry_at: DateTime<Utc>) -> Result<bool, StoreError> {
        let update = doc! {
            "$set": { "lease_until": bson_date(retry_at) },
            "$inc": { "version": 1_i64, "refresh_failures": 1_i32 },
        };
        Ok(self.raw.update_one(Self::fenced(claimed), update).await?.modified_count == 1)
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
