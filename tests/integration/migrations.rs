//! `mcp-worker migrate`: ordered, recorded with checksums, idempotent, and guarded.

use mcp_worker::store::{Migration, MigrationError, MigrationStatus, Store, embedded_migrations};
use mongodb::bson::{Document, doc};

use crate::support::test_settings;

async fn fresh_store() -> (Store, mongodb::Database) {
    let settings = test_settings("http://127.0.0.1:9/mcp", &[]);
    let store = Store::connect(&settings.mongodb).await.unwrap();
    let db = mongodb::Client::with_uri_str(settings.mongodb.uri.expose())
        .await
        .unwrap()
        .database(&settings.mongodb.database);
    (store, db)
}

async fn index_names(db: &mongodb::Database) -> Vec<Document> {
    let mut cursor = db.collection::<Document>("qlik_tokens").list_indexes().await.unwrap();
    let mut out = Vec::new();
    while cursor.advance().await.unwrap() {
        let model = cursor.deserialize_current().unwrap();
        let mut index = doc! { "key": model.keys };
        if let Some(options) = model.options {
            index.insert("name", options.name.unwrap_or_default());
            index.insert("unique", options.unique.unwrap_or(false));
        }
        out.push(index);
    }
    out
}

#[tokio::test]
async fn migrate_is_idempotent_and_records_each_file_with_its_checksum() {
    let (store, db) = fresh_store().await;
    let migrations = embedded_migrations().unwrap();

    let first = store.migrate(&migrations).await.unwrap();
    assert!(first.iter().all(|(_, status)| *status == MigrationStatus::Applied), "{first:?}");
    let second = store.migrate(&migrations).await.unwrap();
    assert!(second.iter().all(|(_, status)| *status == MigrationStatus::AlreadyApplied), "{second:?}");

    let records: Vec<Document> = {
        let mut cursor = db.collection::<Document>("_migrations").find(doc! {}).await.unwrap();
        let mut out = Vec::new();
        while cursor.advance().await.unwrap() {
            out.push(cursor.deserialize_current().unwrap());
        }
        out
    };
    assert_eq!(records.len(), migrations.len());
    let record = records.iter().find(|r| r.get_str("_id").unwrap() == "0001_qlik_tokens_indexes").unwrap();
    assert_eq!(record.get_str("checksum").unwrap(), migrations[0].checksum);

    let indexes = index_names(&db).await;
    let user = indexes.iter().find(|i| i.get_str("name") == Ok("user_id_unique")).expect("user_id index");
    assert_eq!(user.get_bool("unique"), Ok(true));
    assert_eq!(user.get_document("key").unwrap().keys().collect::<Vec<_>>(), ["user_id"]);
    let expires = indexes.iter().find(|i| i.get_str("name") == Ok("expires_at")).expect("expires_at index");
    assert_eq!(expires.get_document("key").unwrap().keys().collect::<Vec<_>>(), ["expires_at"]);
}

#[tokio::test]
async fn migrate_refuses_to_run_when_an_applied_file_changed() {
    let (store, db) = fresh_store().await;
    let original =
        Migration::parse("0001_test.json", r#"{"description":"a","commands":[{"create":"things"}]}"#).unwrap();
    store.migrate(&[original]).await.unwrap();

    let changed =
        Migration::parse("0001_test.json", r#"{"description":"a, edited","commands":[{"create":"things"}]}"#).unwrap();
    let next = Migration::parse("0002_next.json", r#"{"description":"b","commands":[{"create":"others"}]}"#).unwrap();
    let err = store.migrate(&[changed, next]).await.unwrap_err();
    assert!(matches!(err, MigrationError::ChecksumMismatch { ref id, .. } if id == "0001_test"), "{err}");

    // Nothing after the guard ran: the pending migration was neither applied nor recorded.
    let names = db.list_collection_names().await.unwrap();
    assert!(!names.contains(&"others".to_owned()), "{names:?}");
    assert_eq!(db.collection::<Document>("_migrations").count_documents(doc! {}).await.unwrap(), 1);
}

#[tokio::test]
async fn migrate_refuses_a_database_with_migrations_this_binary_does_not_know() {
    let (store, _db) = fresh_store().await;
    let newer =
        Migration::parse("0009_future.json", r#"{"description":"f","commands":[{"create":"future"}]}"#).unwrap();
    store.migrate(&[newer]).await.unwrap();
    let err = store.migrate(&embedded_migrations().unwrap()).await.unwrap_err();
    assert!(matches!(err, MigrationError::UnknownApplied { ref id } if id == "0009_future"), "{err}");
}

#[tokio::test]
async fn a_check_reports_pending_migrations_and_applies_nothing() {
    let (store, db) = fresh_store().await;
    let migrations = embedded_migrations().unwrap();

    let before = store.migration_status(&migrations).await.unwrap();
    assert!(before.iter().all(|(_, status)| *status == MigrationStatus::Pending), "{before:?}");
    assert!(db.list_collection_names().await.unwrap().is_empty(), "the check created something");

    store.migrate(&migrations[..1]).await.unwrap();
    let after = store.migration_status(&migrations).await.unwrap();
    assert_eq!(after[0].1, MigrationStatus::AlreadyApplied);
    assert!(after[1..].iter().all(|(_, status)| *status == MigrationStatus::Pending), "{after:?}");
}
