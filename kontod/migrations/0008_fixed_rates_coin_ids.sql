-- Fixed parities to the euro are stored like any rate, with their own source; and the coin ids
-- kontod found for crypto symbols outside its shipped map, so that a symbol is looked up once.

ALTER TABLE kontod_rates DROP CONSTRAINT kontod_rates_source_check;
ALTER TABLE kontod_rates ADD CONSTRAINT kontod_rates_source_check
    CHECK (source IN ('ecb', 'crypto', 'manual', 'fixed'));

-- One row per symbol as accounts store it (upper case): the price API's coin id chosen by the
-- rule of kontod/providers/coins.py. KONTOD_CRYPTO_IDS and the shipped map win over this table;
-- deleting a row makes the next snapshot run look the symbol up again.
CREATE TABLE kontod_coin_ids (
    symbol           text PRIMARY KEY,
    coin_id          text NOT NULL,
    market_cap_rank  integer,
    resolved_at      timestamptz NOT NULL DEFAULT now()
);
