-- Konto's tables as its web app creates them in its own SQLite/libSQL database at every start
-- (kontod/konto/store.py reads them; kontod never runs this file against a real Konto). Written
-- from the facts in the web app's schema: SQLite types (money REAL, times TEXT, flags INTEGER
-- 0/1), CREATE TABLE IF NOT EXISTS, then ALTER TABLE ... ADD COLUMN for the columns the web
-- app added later. The demo and the tests build their Konto file from it.

CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    email TEXT UNIQUE,
    name TEXT,
    role TEXT DEFAULT 'user',
    clerk_id TEXT UNIQUE,
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS companies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER REFERENCES users(id),
    name TEXT NOT NULL,
    siren TEXT,
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS bank_accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    company_id INTEGER REFERENCES companies(id),
    provider TEXT,
    provider_account_id TEXT,
    provider_bank_id TEXT,
    provider_bank_name TEXT,
    name TEXT NOT NULL,
    custom_name TEXT,
    bank_name TEXT,
    account_number TEXT,
    iban TEXT,
    balance REAL DEFAULT 0,
    hidden INTEGER DEFAULT 0,
    last_sync TEXT,
    type TEXT NOT NULL DEFAULT 'checking',
    usage TEXT NOT NULL DEFAULT 'personal',
    blockchain_address TEXT,
    blockchain_network TEXT,
    currency TEXT DEFAULT 'EUR',
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS bank_connections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER REFERENCES users(id),
    company_id INTEGER REFERENCES companies(id),
    powens_connection_id TEXT,
    powens_token TEXT NOT NULL,
    provider_name TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    last_sync TEXT,
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bank_account_id INTEGER NOT NULL REFERENCES bank_accounts(id) ON DELETE CASCADE,
    date TEXT NOT NULL,
    amount REAL NOT NULL,
    label TEXT,
    category TEXT,
    is_pro INTEGER DEFAULT 1,
    invoice_id INTEGER,
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS investments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bank_account_id INTEGER NOT NULL REFERENCES bank_accounts(id) ON DELETE CASCADE,
    provider_investment_id TEXT,
    label TEXT,
    isin_code TEXT,
    quantity REAL,
    unit_price REAL,
    unit_value REAL,
    valuation REAL,
    currency TEXT DEFAULT 'EUR',
    vdate TEXT,
    last_update TEXT,
    UNIQUE (bank_account_id, isin_code)
);

CREATE TABLE IF NOT EXISTS assets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL DEFAULT 1 REFERENCES users(id),
    type TEXT NOT NULL CHECK (type IN ('real_estate', 'vehicle', 'valuable', 'other')),
    name TEXT NOT NULL,
    purchase_price REAL,
    purchase_date TEXT,
    current_value REAL,
    current_value_date TEXT,
    linked_loan_account_id INTEGER REFERENCES bank_accounts(id),
    address TEXT,
    citycode TEXT,
    latitude REAL,
    longitude REAL,
    surface REAL,
    property_type TEXT,
    estimated_value REAL,
    estimated_price_m2 REAL,
    estimation_date TEXT,
    property_usage TEXT DEFAULT 'principal',
    monthly_rent REAL,
    created_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS patrimoine_snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    date TEXT NOT NULL,
    user_id INTEGER NOT NULL DEFAULT 1 REFERENCES users(id),
    category TEXT NOT NULL,
    total_value REAL NOT NULL DEFAULT 0,
    created_at TEXT DEFAULT (datetime('now')),
    UNIQUE (date, user_id, category)
);

CREATE TABLE IF NOT EXISTS loan_details (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bank_account_id INTEGER NOT NULL UNIQUE REFERENCES bank_accounts(id) ON DELETE CASCADE,
    rate REAL,
    monthly_payment REAL,
    start_date TEXT,
    end_date TEXT,
    borrowed_amount REAL,
    remaining_amount REAL,
    updated_at TEXT DEFAULT (datetime('now'))
);

CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp TEXT NOT NULL DEFAULT (datetime('now')),
    user_id INTEGER,
    ip TEXT,
    country TEXT,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    status TEXT,
    details TEXT
);
CREATE INDEX IF NOT EXISTS idx_audit_log_timestamp ON audit_log(timestamp);
CREATE INDEX IF NOT EXISTS idx_audit_log_ip ON audit_log(ip);
CREATE INDEX IF NOT EXISTS idx_audit_log_user ON audit_log(user_id);

CREATE TABLE IF NOT EXISTS user_preferences (
    user_id INTEGER PRIMARY KEY REFERENCES users(id),
    display_currency TEXT DEFAULT 'EUR',
    crypto_display TEXT DEFAULT 'native'
);

-- The columns the web app added later, each by its own ALTER TABLE (guarded by try/catch there).
ALTER TABLE bank_accounts ADD COLUMN user_id INTEGER REFERENCES users(id);
ALTER TABLE bank_accounts ADD COLUMN subtype TEXT;
ALTER TABLE bank_accounts ADD COLUMN sca_required INTEGER NOT NULL DEFAULT 0;
ALTER TABLE bank_connections ADD COLUMN powens_refresh_token TEXT;
ALTER TABLE transactions ADD COLUMN tx_hash TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS idx_transactions_hash ON transactions(bank_account_id, tx_hash);
ALTER TABLE assets ADD COLUMN notary_fees REAL;
ALTER TABLE assets ADD COLUMN usage TEXT DEFAULT 'personal';
ALTER TABLE assets ADD COLUMN company_id INTEGER REFERENCES companies(id);
ALTER TABLE assets ADD COLUMN travaux REAL;
