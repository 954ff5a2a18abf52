//! The `pending_connections` collection: the tokens of a finished connect flow, held until the
//! chat session that started the flow confirms it.
//!
//! The callback only proves that *some* browser signed in at the provider. Were its tokens stored
//! at once, a user who finished a flow someone else started would have their provider account
//! linked to the other's chat account (login CSRF, RFC 9700 4.4.1.8). So the callback holds them
//! here under a one-time `connect_code`, and only the chat backend, which knows who is logged in,
//! turns them into a connection by naming the user and the code. A document is keyed by the
//! SHA-256 of the code (a database reader cannot confirm someone else's flow), holds both tokens
//! sealed like `qlik_tokens`, and is taken with `findOneAndDelete`, so a code works once. One not
//! confirmed by `confirm_by` is taken by the sweeper, which revokes its grant; there is no TTL
//! index, since the database would delete it without revoking.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::tokens::{NewTokens, bson_date, chrono_date};
use crate::crypto::{TokenCipher, hex};
use crate::provider::Provider;

const COLLECTION: &str = "pending_connections";

/// The tokens of a finished connect flow, and whom the flow was started for.
#[derive(Debug)]
pub(crate) struct HeldConnection {
    pub(crate) provider: Provider,
    pub(crate) user_id: String,
    pub(crate) tokens: NewTokens,
}

#[derive(Clone)]
pub(crate) struct PendingStore {
    collection: Collection<Document>,
    cipher: Arc<TokenCipher>,
}

fn key(code: &str) -> String {
    hex(&Sha256::digest(code.as_bytes()))
}

impl PendingStore {
    pub(super) fn new(db: &mongodb::Database, cipher: Arc<TokenCipher>) -> Self {
        Self { collection: db.collection(COLLECTION), cipher }
    }

    /// Holds `held` under `code` until `confirm_by`.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn hold(
        &self,
        code: &str,
        held: &HeldConnection,
        confirm_by: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let key = key(code);
        let seal = |value, field: &str| self.cipher.seal(value, &format!("{COLLECTION}/{key}/{field}"));
        let document = doc! {
            "_id": &key,
            "provider": held.provider.as_str(),
            "user_id": &held.user_id,
            "access_token": seal(&held.tokens.access_token, "access_token"),
            "refresh_token": seal(&held.tokens.refresh_token, "refresh_token"),
            "expires_at": bson_date(held.tokens.expires_at),
            "created_at": bson_date(now),
            "confirm_by": bson_date(confirm_by),
        };
        self.collection.insert_one(document).await?;
        Ok(())
    }

    /// Removes and returns the connection held under `code` for `provider`, unless it is past
    /// its `confirm_by`. A second call with the same code finds nothing.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn take(
        &self,
        code: &str,
        provider: Provider,
        now: DateTime<Utc>,
    ) -> Result<Option<HeldConnection>, StoreError> {
        let filter = doc! { "_id": key(code), "provider": provider.as_str(), "confirm_by": { "$gt": bson_date(now) } };
        match self.collection.find_one_and_delete(filter).await? {
            Some(document) => self.read(&document).map(Some),
            None => Ok(None),
        }
    }

    /// Removes and returns one connection whose `confirm_by` has passed, if there is one: the
    /// sweeper revokes its grant.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn take_expired(&self, now: DateTime<Utc>) -> Result<Option<HeldConnection>, StoreError> {
        let filter = doc! { "confirm_by": { "$lte": bson_date(now) } };
        match self.collection.find_one_and_delete(filter).await? {
            Some(document) => self.read(&document).map(Some),
            None => Ok(None),
        }
    }

    fn read(&self, d: &Document) -> Result<HeldConnection, StoreError> {
        let text = |field: &str| d.get_str(field).map_err(|_| StoreError::Unreadable(format!("{COLLECTION}.{field}")));
        let key = text("_id")?;
        let open = |field: &str| {
            self.cipher
                .open(text(field)?, &format!("{COLLECTION}/{key}/{field}"))
                .map_err(|e| StoreError::Unreadable(format!("{COLLECTION}.{field}: {e}")))
        };
        let provider = match text("provider")? {
            "qlik" => Provider::Qlik,
            _ => return Err(StoreError::Unreadable(format!("{COLLECTION}.provider"))),
        };
        let expires_at = d
            .get_datetime("expires_at")
            .map(|at| chrono_date(*at))
            .map_err(|_| StoreError::Unreadable(format!("{COLLECTION}.expires_at")))?;
        Ok(HeldConnection {
            provider,
            user_id: text("user_id")?.to_owned(),
            tokens: NewTokens {
                access_token: open("access_token")?,
                refresh_token: open("refresh_token")?,
                expires_at,
            },
        })
    }
}
