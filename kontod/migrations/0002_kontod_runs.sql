-- kontod's own tables: the jobs it knows and every run of them. This table, not memory, is
-- the source of run history.

CREATE TABLE kontod_jobs (
    name           text PRIMARY KEY,
    registered_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kontod_runs (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job            text NOT NULL,
    trigger        text NOT NULL CHECK (trigger IN ('schedule', 'catchup', 'manual')),
    scheduled_for  timestamptz,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    status         text NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'success', 'error', 'timeout', 'interrupted')),
    error          text,
    counts         jsonb NOT NULL DEFAULT '{}',
    -- application_name of the process running it: a run whose owner has no session left in
    -- pg_stat_activity belongs to a process that died.
    owner          text NOT NULL,
    CHECK ((status = 'running') = (finished_at IS NULL)),
    CHECK (trigger = 'manual' OR scheduled_for IS NOT NULL)
);

-- One run per scheduled tick, whichever replica claims it first; an interrupted run does not
-- count, so the tick can be made up.
CREATE UNIQUE INDEX kontod_runs_one_per_tick ON kontod_runs (job, scheduled_for)
    WHERE status <> 'interrupted';
-- At most one running run of a job, across every replica.
CREATE UNIQUE INDEX kontod_runs_one_running ON kontod_runs (job) WHERE status = 'running';
CREATE INDEX kontod_runs_job_started ON kontod_runs (job, started_at DESC);
