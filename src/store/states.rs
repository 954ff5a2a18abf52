//! The `oauth_states` collection: connect flows between authorize and callback.
//!
//! A document is keyed by the SHA-256 of the state (so a database reader cannot complete someone
//! else's flow), holds the user, the PKCE verifier (sealed like tokens) and `return_to`, and is
//! taken with `findOneAndDelete`, which makes each state single-use even under concurrent
//! callbacks. A TTL index removes abandoned ones; the read also refuses expired ones, since the TTL
//! monitor runs only once a minute.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::tokens::{bson_date, chrono_date};
use crate::crypto::{TokenCipher, hex};
use crate::provider::Provider;
use crate::secret::Secret;

const COLLECTION: &str = "oauth_states";

/// A connect flow waiting for its callback.
#[derive(Debug, Clone)]
pub(crate) struct PendingConnect {
    pub(crate) provider: Provider,
    pub(crate) user_id: String,
    pub(crate) pkce_verifier: Secret<String>,
    pub(crate) return_to: Option<String>,
    pub(crate) expires_at: DateTime<Utc>,
}

#[derive(Clone)]
pub(crate) struct StateStore {
    collection: Collection<Document>,
    cipher: Arc<TokenCipher>,
}

fn key(state: &str) -> String {
    hex(&Sha256::digest(state.as_bytes()))
}

impl StateStore {
    pub(super) fn new(db: &mongodb::Database, cipher: Arc<TokenCipher>) -> Self {
        Self { collection: db.collection(COLLECTION), cipher }
    }

    #[tracing::instrument(skip_all)]
    pub(crate) async fn save(
        &self,
        state: &str,
        pending: &PendingConnect,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let key = key(state);
        let verifier = self.cipher.seal(&pending.pkce_verifier, &format!("{COLLECTION}/{key}/pkce_verifier"));
        self.collection
            .insert_one(doc! {
                "_id": &key,
                "provider": pending.provider.as_str(),
                "user_id": &pending.user_id,
                "pkce_verifier": verifier,
                "return_to": pending.return_to.as_deref(),
                "created_at": bson_date(now),
                "expires_at": bson_date(pending.expires_at),
            })
            .await?;
        Ok(())
    }

    /// Removes and returns the flow for `state` if it exists, is for `provider` and has not
    /// expired. A second call with the same state finds nothing.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn take(
        &self,
        state: &str,
        provider: Provider,
        now: DateTime<Utc>,
    ) -> Result<Option<PendingConnect>, StoreError> {
        let key = key(state);
        let filter = doc! { "_id": &key, "provider": provider.as_str(), "expires_at": { "$gt": bson_date(now) } };
        let Some(d) = self.collection.find_one_and_delete(filter).await? else { return Ok(None) };
        let read = |field: &str| {
            d.get_str(field).map(str::to_owned).map_err(|_| StoreError::Unreadable(format!("{COLLECTION}.{field}")))
        };
        let sealed = read("pkce_verifier")?;
        let pkce_verifier = self
            .cipher
            .open(&sealed, &format!("{COLLECTION}/{key}/pkce_verifier"))
            .map_err(|e| StoreError::Unreadable(format!("{COLLECTION}.pkce_verifier: {e}")))?;
        Ok(Some(PendingConnect {
            provider,
            user_id: read("user_id")?,
            pkce_verifier,
            return_to: d.get_str("return_to").ok().map(str::to_owned),
            expires_at: d.get_datetime("expires_at").map(|t| chrono_date(*t)).unwrap_or(now),
        }))
    }
}
