//! The embedded store: a redb database file, one redb table per [`Table`].

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::{Change, Snapshot, Store, StoreError, Table, backend};

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        // Create the tables so that reads find them.
        let txn = db.begin_write().map_err(backend)?;
        for table in Table::ALL {
            txn.open_table(definition(table)).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut snapshot = Snapshot::default();
        for table in Table::ALL {
            let records = txn.open_table(definition(table)).map_err(backend)?;
            for entry in records.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                snapshot.add(table, key.value(), value.value())?;
            }
        }
        Ok(snapshot)
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        for change in changes {
            let entry = change.entry();
            let mut table = txn.open_table(definition(entry.table)).map_err(backend)?;
            match &entry.value {
                Some(value) => {
                    table
                        .insert(entry.key.as_str(), value.as_slice())
                        .map_err(backend)?;
                }
                None => {
                    table.remove(entry.key.as_str()).map_err(backend)?;
                }
            }
        }
        txn.commit().map_err(backend)
    }
}
