-- The keyed transactions whose unkeyed twin `kontod reconcile transactions` removed, so that
-- a later run never pairs them again (the unkeyed rows a run leaves are genuine).
-- konto_location names Konto's database: 'postgresql' for Konto's tables in this very
-- database, 'sqlite:' and the absolute file path, or 'libsql:' and the server's URL; one
-- kontod database serving two Konto files keeps their records apart.
-- twin_id is the removed row's id (Konto's ids are never reused). A row is 'pending' from
-- just before the delete in Konto (SQLite/libSQL) until the run learns its outcome.
CREATE TABLE kontod_reconciled (
    konto_location   text NOT NULL,
    bank_account_id  bigint NOT NULL,
    tx_hash          text NOT NULL,
    twin_id          bigint NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'done')),
    removed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (konto_location, bank_account_id, tx_hash)
);
