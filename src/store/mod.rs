//! MongoDB: the only module that imports the `mongodb` crate.
//!
//! [`Store`] is one driver client (a connection pool) and one database. It hands out the typed
//! stores the rest of the program uses ([`TokenStore`]) and runs the migrations; callers never see
//! a BSON document or a driver error type.

mod batch;
mod leases;
mod migrations;
mod pending;
mod results;
mod states;
mod tokens;

use std::sync::Arc;
use std::time::Duration;

use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

pub use leases::{ClaimedToken, DueCounts, DueToken, Leased, UnreadableToken};
pub use migrations::{Migration, MigrationError, MigrationStatus, embedded_migrations};
pub(crate) use pending::{HeldConnection, PendingStore};
pub(crate) use results::{Claim, ResultStore};
pub(crate) use states::{PendingConnect, StateStore};
pub(crate) use tokens::TokenStores;
pub use tokens::{NewTokens, StoredToken, TokenStatus, TokenStore};

use crate::config::MongoSettings;
use crate::crypto::TokenCipher;
use crate::provider::Provider;

/// How long the driver looks for a usable server before an operation fails. Short, so a job
/// fails fast while the database is away instead of holding a worker slot.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the MongoDB connection string is invalid: {0}")]
    InvalidUri(String),
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(String),
    #[error("MongoDB rejected the operation: {0}")]
    Rejected(String),
    #[error("a stored value cannot be read: {0}")]
    Unreadable(String),
}

impl From<mongodb::error::Error> for StoreError {
    fn from(error: mongodb::error::Error) -> Self {
        // Network, selection and pool errors clear up by themselves; anything else is the
        // server refusing what we asked, which repeating will not change.
        use mongodb::error::ErrorKind;
        let transient_kind = match &*error.kind {
            ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::ServerSelection { .. } => true,
            // Commands sent with `run_command` carry no retryable label, so the server's own
            // "not now" codes are recognised by number.
            ErrorKind::Command(e) => TRANSIENT_CODES.contains(&e.code),
            _ => false,
        };
        if transient_kind
            || error.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
            || error.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
        {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Rejected(error.to_string())
        }
    }
}

/// Server error codes that mean "try again": the retryable-error codes of MongoDB's retryable
/// writes specification (a primary stepping down or shutting down, a network or host error, a
/// time limit).
const TRANSIENT_CODES: [i32; 12] = [6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436];

/// MongoDB's code for a write that broke a unique index.
const DUPLICATE_KEY: i32 = 11000;

/// Whether a write failed on a unique index (the document exists already).
fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match &*error.kind {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}

#[derive(Clone)]
pub struct Store {
    db: Database,
    results: ResultStore,
}

impl Store {
    /// Builds the driver's pool. It does not wait for the server; call [`Store::ping`] for that.
    pub async fn connect(settings: &MongoSettings) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(settings.uri.expose())
            .await
            .map_err(|e| StoreError::InvalidUri(e.kind.to_string()))?;
        // An `appName` in the URI wins, so replicas can be told apart in the server's logs.
        options.app_name.get_or_insert_with(|| "mcp-worker".to_owned());
        options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
        let client = Client::with_options(options).map_err(|e| StoreError::InvalidUri(e.kind.to_string()))?;
        let db = client.database(&settings.database);
        Ok(Self { results: ResultStore::new(&db), db })
    }

    #[tracing::instrument(skip_all)]
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(mongodb::bson::doc! { "ping": 1 }).await?;
        Ok(())
    }

    pub fn tokens(&self, provider: Provider, cipher: &Arc<TokenCipher>) -> TokenStore {
        TokenStore::new(&self.db, provider, cipher.clone())
    }

    /// Every provider's token store at once, for a holder that looks tokens up all the time.
    pub(crate) fn token_stores(&self, cipher: &Arc<TokenCipher>) -> TokenStores {
        TokenStores::new(&self.db, cipher)
    }

    pub(crate) fn results(&self) -> ResultStore {
        self.results.clone()
    }

    pub(crate) fn pending(&self, cipher: &Arc<TokenCipher>) -> PendingStore {
        PendingStore::new(&self.db, cipher.clone())
    }

    pub(crate) fn states(&self, cipher: &Arc<TokenCipher>) -> StateStore {
        StateStore::new(&self.db, cipher.clone())
    }

    /// Applies the given migrations in order; see [`migrations`] for the rules.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<(String, MigrationStatus)>, MigrationError> {
        migrations::apply(&self.db, migrations, false).await
    }

    /// Which migrations are applied and which are pending; changes nothing.
    pub async fn migration_status(
        &self,
        migrations: &[Migration],
    ) -> Result<Vec<(String, MigrationStatus)>, MigrationError> {
        migrations::apply(&self.db, migrations, true).await
    }
}
