//! Slot and publication lifecycle over SQL.
//!
//! Invariants:
//! - Creation is idempotent: creating what exists (or losing a creation race) is success.
//! - A slot is created only when the caller says this is the first start
//!   (`create_if_missing`). A slot that was there before and is gone is a fatal
//!   [`SourceError::SlotMissing`]: recreating it would silently skip every change made
//!   while it was missing.
//! - An invalidated slot (`wal_status = 'lost'`) is fatal for the same reason.

use tokio_postgres::Client;

use super::SourceError;
use crate::cluster::ClusterError;
use crate::lsn::Lsn;
use crate::sql::{quote_ident, QualifiedName};

/// What `pg_replication_slots` says about our slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    pub active: bool,
    /// Set when this call created the slot.
    pub created: bool,
}

fn parse_lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, confirmed_flush_lsn::text, \
                    restart_lsn::text, wal_status, active \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(ClusterError::sql("reading pg_replication_slots"))?;
    Ok(row.map(|r| SlotInfo {
        name: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        confirmed_flush: parse_lsn(r.get(3)),
        restart_lsn: parse_lsn(r.get(4)),
        wal_status: r.get(5),
        active: r.get(6),
        created: false,
    }))
}

/// Makes sure the slot exists and is usable; creates it only if `create_if_missing`.
pub async fn ensure_slot(
    client: &Client,
    slot: &str,
    create_if_missing: bool,
) -> Result<SlotInfo, SourceError> {
    let info = match slot_info(client, slot).await? {
        Some(info) => info,
        None if create_if_missing => {
            let created = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await;
            match created {
                Ok(_) => tracing::info!(%slot, "created replication slot"),
                // Another process created it between our look and our create: fine.
                Err(e) if e.code().map(|c| c.code()) == Some("42710") => {}
                Err(e) => {
                    return Err(
                        ClusterError::sql(format!("creating replication slot {slot:?}"))(e).into(),
                    )
                }
            }
            let mut info = slot_info(client, slot)
                .await?
                .ok_or_else(|| SourceError::SlotMissing { slot: slot.into() })?;
            info.created = true;
            info
        }
        None => return Err(SourceError::SlotMissing { slot: slot.into() }),
    };
    validate(client, &info).await?;
    Ok(info)
}

async fn validate(client: &Client, info: &SlotInfo) -> Result<(), SourceError> {
    if info.wal_status.as_deref() == Some("lost") {
        return Err(SourceError::SlotInvalidated {
            slot: info.name.clone(),
            reason: "pg_replication_slots.wal_status = 'lost'".into(),
        });
    }
    match info.plugin.as_deref() {
        Some("pgoutput") => {}
        other => {
            return Err(SourceError::Protocol(format!(
                "replication slot {:?} uses output plugin {other:?}, switchyard needs a logical slot with pgoutput",
                info.name
            )))
        }
    }
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(ClusterError::sql("reading current_database()"))?
        .get(0);
    if info.database.as_deref() != Some(db.as_str()) {
        return Err(SourceError::Protocol(format!(
            "replication slot {:?} belongs to database {:?}, not {db:?}",
            info.name, info.database
        )));
    }
    Ok(())
}

/// Drops `slot` if it exists; whether it did. A slot in use fails with 55006.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, ClusterError> {
    let dropped = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(ClusterError::sql(format!("dropping replication slot {slot:?}")))?;
    Ok(dropped > 0)
}

/// Tables currently in the publication, or `None` when it does not exist.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<QualifiedName>>, ClusterError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(ClusterError::sql("reading pg_publication"))?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
              WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(ClusterError::sql("reading pg_publication_tables"))?;
    Ok(Some(
        rows.iter()
            .map(|r| QualifiedName {
                schema: r.get(0),
                name: r.get(1),
            })
            .collect(),
    ))
}

/// The SQL that creates the publication or adds missing tables to it; empty when nothing
/// is missing. Used both to act and to tell an operator the exact fix.
pub fn publication_fix(
    publication: &str,
    existing: Option<&[QualifiedName]>,
    wanted: &[QualifiedName],
) -> Option<String> {
    let missing: Vec<&QualifiedName> = wanted
        .iter()
        .filter(|t| existing.is_none_or(|e| !e.contains(t)))
        .collect();
    let list = |ts: &[&QualifiedName]| ts.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ");
    match existing {
        None if wanted.is_empty() => Some(format!(
            "CREATE PUBLICATION {} FOR ALL TABLES",
            quote_ident(publication)
        )),
        None => Some(format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(publication),
            list(&missing)
        )),
        Some(_) if missing.is_empty() => None,
        Some(_) => Some(format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            list(&missing)
        )),
    }
}

/// Creates the publication or adds missing configured tables; idempotent.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[QualifiedName],
) -> Result<(), ClusterError> {
    let existing = publication_tables(client, publication).await?;
    if let Some(sql) = publication_fix(publication, existing.as_deref(), tables) {
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(%publication, "publication updated"),
            // Lost a race with a concurrent creator: re-check below.
            Err(e) if e.code().map(|c| c.code()) == Some("42710") => {}
            Err(e) => return Err(ClusterError::sql(format!("running {sql}"))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QualifiedName {
        QualifiedName::parse(s).unwrap()
    }

    #[test]
    fn publication_fix_sql() {
        let wanted = [q("public.orders"), q("public.\"Odd\"")];
        assert_eq!(
            publication_fix("p", None, &wanted).unwrap(),
            "CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"orders\", \"public\".\"Odd\""
        );
        assert_eq!(
            publication_fix("p", Some(&[q("public.orders")]), &wanted).unwrap(),
            "ALTER PUBLICATION \"p\" ADD TABLE \"public\".\"Odd\""
        );
        assert!(publication_fix("p", Some(&wanted), &wanted).is_none());
        assert_eq!(
            publication_fix("x\"y", None, &[]).unwrap(),
            "CREATE PUBLICATION \"x\"\"y\" FOR ALL TABLES"
        );
    }
}
