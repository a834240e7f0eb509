-- What operators decide about jobs: pauses, and who asked for a manual run and why.

-- One row per pause. A pause is in force while resumed_at is NULL and its `until` (when set)
-- is still ahead; the row stays afterwards, so the end of the last pause is known (ticks that
-- fell inside it are not reported as missed).
CREATE TABLE kontod_pauses (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text NOT NULL,
    reason      text NOT NULL CHECK (btrim(reason) <> ''),
    paused_by   text NOT NULL,
    paused_at   timestamptz NOT NULL,
    until       timestamptz CHECK (until IS NULL OR until > paused_at),
    resumed_at  timestamptz,
    resumed_by  text
);
-- At most one open pause per job, across every replica.
CREATE UNIQUE INDEX kontod_pauses_one_open ON kontod_pauses (job) WHERE resumed_at IS NULL;
CREATE INDEX kontod_pauses_job ON kontod_pauses (job, paused_at DESC);

-- Manual runs: who asked (cli:<user>@<host>, or http <client address>) and why.
ALTER TABLE kontod_runs ADD COLUMN requested_by text;
ALTER TABLE kontod_runs ADD COLUMN request_reason text;
