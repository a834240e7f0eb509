-- A hold on a connection is tied to what it was decided under: besides the stored token (its
-- fingerprint, already kept), the key that read it and the Powens connection the row named.
-- A change of either lifts the hold. Rows from before have NULL in both: with a key
-- configured, or a Powens connection id stored, their hold lifts once.
ALTER TABLE kontod_connections
    ADD COLUMN key_fingerprint text,          -- keyed hash of the key used, never the key
    ADD COLUMN powens_connection_id text;     -- bank_connections.powens_connection_id
