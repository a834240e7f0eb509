-- kontod's own tables: the jobs it knows and every run of them. This table, not memory, is
-- the source of run history.

CREATE TABLE kontod_jobs (
    name           text PRIMARY KEY,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    -- Finished runs and failed ones since the job was registered, kept up to date by the
    -- statement that ends a run: the counters survive the pruning of old runs and are read
    -- without counting the run table.
    runs           bigint NOT NULL DEFAULT 0,
    errors         bigint NOT NULL DEFAULT 0
);

CREATE TABLE kontod_runs (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job            text NOT NULL,
    trigger        text NOT NULL
                   CHECK (trigger IN ('schedule', 'catchup', 'manual', 'takeover', 'retry')),
    scheduled_for  timestamptz,
    -- 1 for the first run of a tick, then one more for each takeover or retry of it.
    attempt        integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    status         text NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'success', 'error', 'timeout', 'interrupted')),
    error          text,
    counts         jsonb NOT NULL DEFAULT '{}',
    -- The process running it (KONTOD_INSTANCE), and its lease: the owner moves lease_until
    -- forward while it runs, with the database's clock. A running run whose lease has passed
    -- is abandoned, whoever still holds a session.
    instance       text NOT NULL,
    heartbeat_at   timestamptz NOT NULL DEFAULT now(),
    lease_until    timestamptz NOT NULL,
    CHECK ((status = 'running') = (finished_at IS NULL)),
    CHECK ((trigger = 'manual') = (scheduled_for IS NULL)),
    CHECK (trigger IN ('takeover', 'retry') OR attempt = 1)
);

-- Each attempt at a tick runs once, whichever replica claims it first.
CREATE UNIQUE INDEX kontod_runs_one_per_attempt ON kontod_runs (job, scheduled_for, attempt)
    WHERE scheduled_for IS NOT NULL;
-- At most one running run of a job, across every replica.
CREATE UNIQUE INDEX kontod_runs_one_running ON kontod_runs (job) WHERE status = 'running';
-- The history reads: the newest run, the newest finished one, the newest success and the
-- abandoned runs are each one index look-up, however long the table.
CREATE INDEX kontod_runs_job_started ON kontod_runs (job, started_at DESC, id DESC);
CREATE INDEX kontod_runs_job_finished ON kontod_runs (job, finished_at DESC, id DESC)
    WHERE status <> 'running';
CREATE INDEX kontod_runs_job_success ON kontod_runs (job, finished_at DESC)
    WHERE status = 'success';
CREATE INDEX kontod_runs_job_failed ON kontod_runs (job, finished_at DESC, id DESC)
    WHERE status IN ('error', 'timeout', 'interrupted');
CREATE INDEX kontod_runs_lease ON kontod_runs (lease_until) WHERE status = 'running';
