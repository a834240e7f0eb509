-- What the refresh job remembers about connections and accounts, in kontod's own tables.
-- Konto's tables get no column, index, constraint or trigger from kontod; the rows here refer
-- to them by id without a foreign key (a foreign key would put a trigger on the web app's
-- table), and rows whose Konto row is gone are ignored by every join.

-- One row per bank_connections row kontod has tried.
CREATE TABLE kontod_connections (
    connection_id         bigint PRIMARY KEY,            -- bank_connections.id
    last_attempt_at       timestamptz NOT NULL,
    last_success_at       timestamptz,                    -- last time Powens answered
    error_kind            text,                           -- NULL after a success
    error                 text,
    error_code            text,                           -- Powens error body `code`
    powens_state          text,                           -- connection `state` (NULL: fine)
    powens_error_message  text,
    powens_last_update    timestamptz,                    -- connection `last_update`
    powens_next_try       timestamptz,
    -- SHA-256 of the stored powens_token of the last attempt: never the token itself.
    token_fingerprint     text,
    -- Not called again before held_until, unless the stored token changes (a new
    -- fingerprint): 'infinity' after a 401, a back-off while the bank needs the user.
    held_until            timestamptz,
    needs_user_streak     integer NOT NULL DEFAULT 0
);

-- One row per Konto bank account kontod has matched with a Powens account.
CREATE TABLE kontod_accounts (
    bank_account_id        bigint PRIMARY KEY,            -- bank_accounts.id
    connection_id          bigint,                        -- the bank_connections row that sees it
    powens_last_update     timestamptz,                   -- account `last_update`
    deleted_at             timestamptz,                   -- Powens `deleted`
    disabled_at            timestamptz,                   -- Powens `disabled`
    -- The newest `last_update` among the transactions imported: the next import asks for
    -- what changed since then.
    transactions_last_update  timestamptz,
    transactions_imported_at  timestamptz,
    null_balance_at        timestamptz                    -- last time Powens gave no balance
);

-- Konto's web app may keep last_sync as ISO text: read it as a time, NULL when unreadable
-- (kontod then treats the account as never synced).
CREATE FUNCTION kontod_try_timestamptz(value text) RETURNS timestamptz
    LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN nullif(btrim(value), '')::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
