-- What the refresh job needs on Konto's tables. Additive only, so it applies to a database
-- where Konto already created them; the web app's own columns (status, last_sync) stay its own.

-- When kontod last tried a connection's token, and why that try failed (both NULL after a
-- success). The web app owns `status`; these say what kontod saw.
ALTER TABLE bank_connections
    ADD COLUMN IF NOT EXISTS last_refresh_at        timestamptz,
    ADD COLUMN IF NOT EXISTS last_refresh_error     text,
    ADD COLUMN IF NOT EXISTS last_refresh_error_at  timestamptz;

-- The provider's own transaction id. Unique per account, it makes a second import of the
-- same transactions insert nothing; rows imported before (NULL) are left as they are. Led by
-- bank_account_id, the index also answers "has this account any transaction?" quickly.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS provider_transaction_id text;
CREATE UNIQUE INDEX IF NOT EXISTS transactions_account_provider_id
    ON transactions (bank_account_id, provider_transaction_id);
