//! The refresher's lease protocol over `qlik_tokens` documents: find the tokens due, take a lease
//! on one (compare-and-swap on `version`), and finish under that lease: store the renewed tokens,
//! mark the grant refused, or give the lease back until a retry time. Every write under a lease is
//! fenced by version, refresh token and owner, so a replica whose lease ran out writes nothing.

use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use mongodb::options::ReturnDocument;

use super::StoreError;
use super::tokens::{NewTokens, TokenStatus, TokenStore, bson_date, chrono_date, decode};
use crate::secret::Secret;

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

/// What a claim took the lease on.
#[derive(Debug)]
pub enum Leased {
    Token(ClaimedToken),
    /// A document this code cannot read: sealed under a key no longer configured, damaged, or of
    /// the wrong shape (written by older code or by hand).
    Unreadable(UnreadableToken),
}

/// A leased token document that cannot be read; `problem` names the field, never a value.
#[derive(Debug)]
pub struct UnreadableToken {
    pub(crate) user_id: String,
    pub(crate) problem: String,
    version: i64,
    owner: String,
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
    /// An earlier lease on this token ran out without a write: its holder stopped mid-refresh
    /// (killed, or lost the database). If the provider had answered it, the refresh token it
    /// rotated was lost, and the one stored is now refused as reused.
    pub(crate) lapsed_lease: bool,
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

impl TokenStore {
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

    /// Takes the lease on a due token, until `lease_until`, if it is still at `version`, active and
    /// unleased at `now`. `None` when another replica got there first or the token changed since
    /// the scan.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn claim(
        &self,
        due: &DueToken,
        owner: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Leased>, StoreError> {
        let filter = doc! {
            "user_id": &due.user_id,
            "version": due.version,
            "status": { "$ne": TokenStatus::ReauthRequired.as_str() },
            "lease_until": { "$not": { "$gt": bson_date(now) } },
        };
        let update = doc! {
            "$set": { "lease_owner": owner, "lease_until": bson_date(lease_until) },
            "$inc": { "version": 1_i64 },
        };
        // Claimed as a plain document, so that one this code cannot read is leased too, and can
        // be retired under the lease rather than retried by every replica at every lease. The
        // document as it was before the claim tells whether an earlier lease lapsed unwritten.
        let before = self.raw.find_one_and_update(filter, update).return_document(ReturnDocument::Before).await?;
        let Some(raw) = before else { return Ok(None) };
        let lapsed_lease = raw.contains_key("lease_owner");
        let version = raw.get_i64("version").unwrap_or(due.version).saturating_add(1);
        let read = decode(raw).and_then(|d| Ok((self.open(&d.user_id, "refresh_token", &d.refresh_token)?, d)));
        match read {
            Ok((refresh_token, d)) => Ok(Some(Leased::Token(ClaimedToken {
                refresh_token,
                expires_at: chrono_date(d.expires_at),
                failures: d.refresh_failures,
                lapsed_lease,
                version,
                sealed_refresh_token: d.refresh_token,
                owner: owner.to_owned(),
                user_id: d.user_id,
            }))),
            Err(StoreError::Unreadable(problem)) => Ok(Some(Leased::Unreadable(UnreadableToken {
                user_id: due.user_id.clone(),
                version,
                owner: owner.to_owned(),
                problem,
            }))),
            Err(e) => Err(e),
        }
    }

    /// Marks a leased token that cannot be read `reauth_required`, if the lease still holds:
    /// no retry makes it readable, only the user connecting again. `false` when it moved on.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn retire_unreadable(
        &self,
        token: &UnreadableToken,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let filter = doc! { "user_id": &token.user_id, "version": token.version, "lease_owner": &token.owner };
        let update = doc! {
            "$set": { "status": TokenStatus::ReauthRequired.as_str(), "updated_at": bson_date(now) },
            "$inc": { "version": 1_i64 },
            "$unset": { "lease_owner": "", "lease_until": "" },
        };
        Ok(self.raw.update_one(filter, update).await?.modified_count == 1)
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

    /// Gives the lease back after a transient failure, keeping others off the token until
    /// `retry_at` (`lease_until` doubles as the backoff, shared by all replicas). The owner goes,
    /// so that only a lease that lapsed unwritten leaves one behind.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn release(&self, claimed: &ClaimedToken, retry_at: DateTime<Utc>) -> Result<bool, StoreError> {
        let update = doc! {
            "$set": { "lease_until": bson_date(retry_at) },
            "$inc": { "version": 1_i64, "refresh_failures": 1_i32 },
            "$unset": { "lease_owner": "" },
        };
        Ok(self.raw.update_one(Self::fenced(claimed), update).await?.modified_count == 1)
    }
}
