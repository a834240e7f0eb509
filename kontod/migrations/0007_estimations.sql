-- The refresh-property-estimations job's own tables (Konto's assets table is the web app's).
--
-- kontod_dvf_files: the copy of each DVF file (commune, year) the job last read, reduced to the
-- dwelling sales it keeps, with the validators the source gave, so that the next run asks
-- conditionally (If-None-Match / If-Modified-Since) and an unchanged file costs a 304.
CREATE TABLE kontod_dvf_files (
    commune        text NOT NULL,
    year           integer NOT NULL,
    url            text NOT NULL,       -- where it was read: a copy of another source is not used
    etag           text,
    last_modified  text,
    -- [[type_local, price, surface, latitude, longitude], ...] of the one-dwelling sales.
    sales          jsonb NOT NULL,
    fetched_at     timestamptz NOT NULL DEFAULT now(),   -- when the body was last read
    checked_at     timestamptz NOT NULL DEFAULT now(),   -- when the source was last asked
    PRIMARY KEY (commune, year)
);

-- kontod_estimations: per asset, what its last estimate was made of (the web app's assets
-- table keeps only the estimate itself).
CREATE TABLE kontod_estimations (
    asset_id       bigint PRIMARY KEY,
    commune        text NOT NULL,
    run_id         bigint NOT NULL,
    estimated_at   timestamptz NOT NULL,
    sales_used     integer NOT NULL,
    same_type      boolean NOT NULL,     -- false: fewer than 5 sales of its type, all types used
    nearest        boolean NOT NULL,     -- false: the asset has no coordinates, all sales used
    price_m2       numeric NOT NULL,
    low_m2         numeric NOT NULL,     -- first quartile of the price per m² of the sales used
    high_m2        numeric NOT NULL,     -- third quartile
    value          numeric NOT NULL
);
CREATE INDEX kontod_estimations_at ON kontod_estimations (estimated_at);
