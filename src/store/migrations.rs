//! Schema migrations: the files of `migrations/`, applied in file-name order, each recorded in
//! `_migrations` with its checksum.
//!
//! A migration file is JSON: `{"description": "…", "commands": [<MongoDB command>, …]}`; each
//! command goes to `runCommand` as written. Commands must be idempotent (index creation is), since
//! a run that dies between a command and its record repeats it. Before applying anything, every
//! recorded migration is compared with the file of the same id: a changed file, or a recorded id
//! this binary does not know, stops the run without touching the database.

use chrono::Utc;
use mongodb::bson::{self, Document, doc};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::is_duplicate_key;
use crate::crypto::hex;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

const MIGRATIONS_COLLECTION: &str = "_migrations";

#[derive(Debug, Clone)]
pub struct Migration {
    /// The file name without `.json`, e.g. `0001_qlik_tokens_indexes`.
    pub(crate) id: String,
    /// Hex SHA-256 of the file's bytes.
    pub checksum: String,
    pub(crate) description: String,
    commands: Vec<Document>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationFile {
    description: String,
    commands: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize, Deserialize)]
struct MigrationRecord {
    #[serde(rename = "_id")]
    id: String,
    checksum: String,
    description: String,
    applied_at: bson::DateTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationStatus {
    Applied,
    AlreadyApplied,
    /// Not applied yet (reported by a check, which applies nothing).
    Pending,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration file {file} is invalid: {problem}")]
    InvalidFile { file: String, problem: String },
    #[error(
        "migration {id} was applied with checksum {applied} but its file now has checksum {current}; \
             applied migrations must never change, add a new one instead"
    )]
    ChecksumMismatch { id: String, applied: String, current: String },
    #[error("migration {id} is recorded as applied but this binary does not have it; is it older than the database?")]
    UnknownApplied { id: String },
    #[error("migration {id} failed: {problem}")]
    Failed { id: String, problem: String },
    #[error(transparent)]
    Store(#[from] super::StoreError),
}

impl Migration {
    pub fn parse(file_name: &str, contents: &str) -> Result<Self, MigrationError> {
        let invalid = |problem: String| MigrationError::InvalidFile { file: file_name.to_owned(), problem };
        let id = file_name.strip_suffix(".json").ok_or_else(|| invalid("name must end in .json".into()))?;
        let file: MigrationFile = serde_json::from_str(contents).map_err(|e| invalid(e.to_string()))?;
        if file.commands.is_empty() {
            return Err(invalid("it has no commands".into()));
        }
        let commands = file
            .commands
            .into_iter()
            .map(|command| bson::to_document(&command).map_err(|e| invalid(e.to_string())))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id: id.to_owned(),
            checksum: hex(&Sha256::digest(contents.as_bytes())),
            description: file.description,
            commands,
        })
    }
}

/// The migrations compiled into this binary, in order.
pub fn embedded_migrations() -> Result<Vec<Migration>, MigrationError> {
    embedded::EMBEDDED.iter().map(|(name, contents)| Migration::parse(name, contents)).collect()
}

/// Applies the migrations not applied yet, in order; with `check_only`, applies nothing and
/// reports those as pending. Either way a recorded migration that changed or vanished is an error.
pub(super) async fn apply(
    db: &Database,
    migrations: &[Migration],
    check_only: bool,
) -> Result<Vec<(String, MigrationStatus)>, MigrationError> {
    let records: Collection<MigrationRecord> = db.collection(MIGRATIONS_COLLECTION);
    let mut applied = Vec::new();
    let mut cursor = records.find(doc! {}).await.map_err(super::StoreError::from)?;
    while cursor.advance().await.map_err(super::StoreError::from)? {
        applied.push(cursor.deserialize_current().map_err(super::StoreError::from)?);
    }
    check_applied(&applied, migrations)?;

    let mut report = Vec::with_capacity(migrations.len());
    for migration in migrations {
        if applied.iter().any(|r| r.id == migration.id) {
            report.push((migration.id.clone(), MigrationStatus::AlreadyApplied));
            continue;
        }
        if check_only {
            report.push((migration.id.clone(), MigrationStatus::Pending));
            continue;
        }
        for command in &migration.commands {
            db.run_command(command.clone())
                .await
                .map_err(|e| MigrationError::Failed { id: migration.id.clone(), problem: e.to_string() })?;
        }
        let record = MigrationRecord {
            id: migration.id.clone(),
            checksum: migration.checksum.clone(),
            description: migration.description.clone(),
            applied_at: bson::DateTime::from_millis(Utc::now().timestamp_millis()),
        };
        match records.insert_one(&record).await {
            Ok(_) => {}
            // Another migrate process got there first with the same file: nothing to do.
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => return Err(super::StoreError::from(e).into()),
        }
        tracing::info!(migration = %migration.id, "migration applied");
        report.push((migration.id.clone(), MigrationStatus::Applied));
    }
    Ok(report)
}

/// Every recorded migration must still be in the list, with the checksum it was applied with.
fn check_applied(applied: &[MigrationRecord], migrations: &[Migration]) -> Result<(), MigrationError> {
    for record in applied {
        match migrations.iter().find(|m| m.id == record.id) {
            None => return Err(MigrationError::UnknownApplied { id: record.id.clone() }),
            Some(m) if m.checksum != record.checksum => {
                return Err(MigrationError::ChecksumMismatch {
                    id: record.id.clone(),
                    applied: record.checksum.clone(),
                    current: m.checksum.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_migrations_parse_and_start_with_the_unique_user_index() {
        let migrations = embedded_migrations().unwrap();
        let first = &migrations[0];
        assert_eq!(first.id, "0001_qlik_tokens_indexes");
        let index = first.commands[0].get_array("indexes").unwrap()[0].as_document().unwrap();
        assert_eq!(first.commands[0].get_str("createIndexes").unwrap(), "qlik_tokens");
        assert!(index.get_bool("unique").unwrap());
        assert!(index.get_document("key").unwrap().contains_key("user_id"));
    }

    #[test]
    fn checksums_change_with_any_byte() {
        let a = Migration::parse("0001_x.json", r#"{"description":"d","commands":[{"ping":1}]}"#).unwrap();
        let b = Migration::parse("0001_x.json", r#"{"description":"d","commands":[{"ping":2}]}"#).unwrap();
        assert_ne!(a.checksum, b.checksum);
        assert_eq!(a.checksum.len(), 64);
    }

    #[test]
    fn invalid_files_are_named() {
        for (name, body) in
            [("0002.txt", "{}"), ("0002_x.json", "{"), ("0002_x.json", r#"{"description":"d","commands":[]}"#)]
        {
            let err = Migration::parse(name, body).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
