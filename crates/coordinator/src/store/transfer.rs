//! Moving every record from one store to another (`blockrep coordinator export` and
//! `import`): from the embedded redb store to etcd when a cluster grows into an HA
//! coordinator, or back.
//!
//! The export is JSON lines, one record per line: `{"table": "pairs", "record": {...}}`,
//! the record exactly as the stores keep it. An import refuses a store that holds records
//! already, or one a coordinator leads on, and commits the records in as few transactions
//! as the target takes (the target is not in use until the import is done).

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use super::{Change, Snapshot, Store, StoreError, Table};

#[derive(Serialize, Deserialize)]
struct Line {
    table: String,
    record: serde_json::Value,
}

/// Writes every record of `store` to `out`; answers how many.
pub fn export(store: &dyn Store, out: &mut dyn Write) -> Result<usize, StoreError> {
    fn write_table<T: Serialize>(
        out: &mut dyn Write,
        table: Table,
        records: &[T],
    ) -> Result<usize, StoreError> {
        for record in records {
            let line = serde_json::to_string(&Line {
                table: table.name().into(),
                record: serde_json::to_value(record).expect("serialisable"),
            })
            .expect("serialisable");
            writeln!(out, "{line}")
                .map_err(|e| StoreError::Backend(format!("write the export: {e}")))?;
        }
        Ok(records.len())
    }
    let snapshot = store.load()?;
    Ok(write_table(out, Table::Pairs, &snapshot.pairs)?
        + write_table(out, Table::Groups, &snapshot.groups)?
        + write_table(out, Table::Jobs, &snapshot.jobs)?
        + write_table(out, Table::Nodes, &snapshot.nodes)?
        + write_table(out, Table::Tokens, &snapshot.tokens)?)
}

/// Reads an export and commits its records into `store`, which must hold none; answers how
/// many. Every line is read and checked before anything is written: a bad line writes
/// nothing.
pub fn import(
    store: &dyn Store,
    input: &mut dyn BufRead,
    max_per_commit: usize,
) -> Result<usize, StoreError> {
    let existing = store.load()?;
    if !existing.is_empty() {
        return Err(StoreError::Backend(format!(
            "the target store holds {} records already: import only into an empty store",
            existing.records()
        )));
    }
    let mut snapshot = Snapshot::default();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| StoreError::Backend(format!("read the export: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| StoreError::Backend(format!("export line {}: {reason}", n + 1));
        let parsed: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let table = Table::from_name(&parsed.table)
            .ok_or_else(|| bad(format!("no table {:?}", parsed.table)))?;
        let bytes = serde_json::to_vec(&parsed.record).expect("serialisable");
        snapshot
            .add(table, &format!("line {}", n + 1), &bytes)
            .map_err(|e| bad(e.to_string()))?;
    }
    let changes = changes_of(snapshot);
    let mut done = 0;
    for chunk in changes.chunks(max_per_commit.max(1)) {
        store.commit(chunk).map_err(|e| {
            StoreError::Backend(format!(
                "the import stopped after {done} of {} records ({e}): the store holds those; remove them before importing again",
                changes.len()
            ))
        })?;
        done += chunk.len();
    }
    Ok(changes.len())
}

/// Every record of a snapshot as the change that puts it.
fn changes_of(snapshot: Snapshot) -> Vec<Change> {
    let Snapshot {
        pairs,
        groups,
        jobs,
        nodes,
        tokens,
    } = snapshot;
    let mut changes = Vec::new();
    changes.extend(pairs.into_iter().map(Change::PutPair));
    changes.extend(groups.into_iter().map(Change::PutGroup));
    changes.extend(jobs.into_iter().map(Change::PutJob));
    changes.extend(nodes.into_iter().map(Change::PutNode));
    changes.extend(tokens.into_iter().map(Change::PutToken));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::job;
    use crate::store::{MemoryStore, RedbStore};

    #[test]
    fn records_go_from_redb_to_another_store_and_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let redb = RedbStore::open(&dir.path().join("coordinator.redb")).unwrap();
        let jobs: Vec<_> = (0..5).map(|i| job(i as f64 / 10.0)).collect();
        redb.commit(&jobs.iter().cloned().map(Change::PutJob).collect::<Vec<_>>())
            .unwrap();

        let mut exported = Vec::new();
        assert_eq!(export(&redb, &mut exported).unwrap(), 5);
        let memory = MemoryStore::new();
        // Two records per commit: three commits.
        assert_eq!(import(&memory, &mut exported.as_slice(), 2).unwrap(), 5);
        assert_eq!(memory.commits(), 3);
        let mut back = memory.load().unwrap().jobs;
        let mut want = jobs.clone();
        back.sort_by(|a, b| a.progress.total_cmp(&b.progress));
        want.sort_by(|a, b| a.progress.total_cmp(&b.progress));
        assert_eq!(back, want);

        // The target holds records now: a second import is refused, and writes nothing.
        let again = import(&memory, &mut exported.as_slice(), 2);
        assert!(
            again
                .as_ref()
                .is_err_and(|e| e.to_string().contains("holds 5 records")),
            "{again:?}"
        );
        assert_eq!(memory.commits(), 3);
    }

    #[test]
    fn a_bad_line_imports_nothing() {
        let good = serde_json::to_string(&Line {
            table: "jobs".into(),
            record: serde_json::to_value(job(0.5)).unwrap(),
        })
        .unwrap();
        for (bad, why) in [
            (r#"{"table": "volumes", "record": {}}"#, "no table"),
            (r#"{"table": "jobs", "record": {"id": 3}}"#, "corrupt"),
            ("not json", "line 2"),
        ] {
            let text = format!("{good}\n{bad}\n");
            let memory = MemoryStore::new();
            let refused = import(&memory, &mut text.as_bytes(), 100);
            assert!(
                refused.as_ref().is_err_and(|e| e.to_string().contains(why)),
                "{bad}: {refused:?}"
            );
            assert_eq!(memory.commits(), 0, "{bad}");
            assert!(memory.load().unwrap().is_empty());
        }
    }
}
