// kontod under PM2, for machines where PM2 already runs the other services.
//
//   pm2 start deploy/pm2/ecosystem.config.cjs     # start (or: pm2 startOrReload …)
//   pm2 save && pm2 startup                        # and again after a reboot
//
// kontod is a Python program: PM2 runs the venv's `kontod run` as it is (interpreter "none"),
// the same command line as the systemd unit. Where things are is read from the environment of
// `pm2 start`, with the unit's places as defaults:
//   KONTOD_PM2_VENV         kontod's virtual environment (/opt/kontod)
//   KONTOD_PM2_ENV_FILE     settings file, one VAR=value a line, read with systemd's
//                           EnvironmentFile= rules (/etc/kontod/kontod.env; optional unless set)
//   KONTOD_PM2_CREDENTIALS  folder of secret files, database_url, admin_token, …, each readable
//                           by the user kontod runs as only (/etc/kontod/credentials)
//   KONTOD_PM2_LOG_DIR      where kontod.out.log and kontod.err.log go (/var/log/kontod)
//
// PM2 has no env-file option of its own, so this file reads the settings file when PM2 loads it:
// after an edit, `pm2 startOrReload deploy/pm2/ecosystem.config.cjs --update-env` (a bare
// `pm2 restart kontod` keeps the old values). Whatever PM2 passes to a process it also shows
// (`pm2 env`, `pm2 jlist`) and stores (`pm2 save`): keep secrets out of the settings file and in
// the credentials folder, which kontod reads itself through CREDENTIALS_DIRECTORY.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const venv = process.env.KONTOD_PM2_VENV || "/opt/kontod";
const envFile = process.env.KONTOD_PM2_ENV_FILE || "/etc/kontod/kontod.env";
const credentials = process.env.KONTOD_PM2_CREDENTIALS || "/etc/kontod/credentials";
const logDir = process.env.KONTOD_PM2_LOG_DIR || "/var/log/kontod";

// One value of a settings file from `text` at `at`, as systemd reads it: 'single quotes' keep
// everything, "double quotes" and bare text take a backslash as escaping the next character, a
// quote may run over several lines, a bare value loses its trailing blanks, and a backslash at
// the end of a line joins the next one. Returns [value, index after it].
function readValue(text, at, where) {
  let value = "";
  let quote = null;
  let bareEnd = 0; // length of `value` up to its last character that was not a bare blank
  let i = at;
  while (i < text.length) {
    const c = text[i];
    if (quote === "'") {
      if (c === "'") quote = null;
      else value += c;
    } else if (c === "\\") {
      const next = text[i + 1];
      if (next === "\n") {
        i += 2;
        continue;
      }
      if (next === undefined) break;
      // Inside double quotes only \" \\ \` \$ are escapes; elsewhere any character is.
      if (quote === '"' && !'"\\`$'.includes(next)) value += c;
      value += next;
      i += 1;
    } else if (quote === '"') {
      if (c === '"') quote = null;
      else value += c;
    } else if (c === "\n") {
      break;
    } else if (c === '"' || c === "'") {
      quote = c;
    } else {
      value += c;
      if (c !== " " && c !== "\t") bareEnd = value.length;
      i += 1;
      continue;
    }
    bareEnd = value.length;
    i += 1;
  }
  if (quote !== null) throw new Error(`${where}: the ${quote} quote is never closed`);
  return [value.slice(0, bareEnd), i + 1];
}

// The variables of a settings file; throws naming the file and line of anything it cannot read,
// where systemd would skip the line with only a warning in its journal.
function readEnvFile(file) {
  const text = fs.readFileSync(file, "utf8");
  const env = {};
  let i = 0;
  let line = 1;
  while (i < text.length) {
    const start = i;
    while (text[i] === " " || text[i] === "\t") i += 1;
    if (text[i] === "\n" || text[i] === "#" || text[i] === ";" || i >= text.length) {
      const end = text.indexOf("\n", i);
      i = end < 0 ? text.length : end + 1;
      line += 1;
      continue;
    }
    const where = `${file}, line ${line}`;
    const eq = text.indexOf("=", i);
    const eol = text.indexOf("\n", i);
    if (eq < 0 || (eol >= 0 && eol < eq)) throw new Error(`${where}: no "=" (VAR=value)`);
    const name = text.slice(i, eq).trim();
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
      throw new Error(`${where}: ${JSON.stringify(name)} is not a variable name`);
    }
    i = eq + 1;
    while (text[i] === " " || text[i] === "\t") i += 1;
    const [value, next] = readValue(text, i, where);
    env[name] = value;
    line += text.slice(start, next).split("\n").length - 1;
    i = next;
  }
  return env;
}

function settings() {
  if (!fs.existsSync(envFile)) {
    if (process.env.KONTOD_PM2_ENV_FILE) throw new Error(`${envFile}: no such settings file`);
    return {}; // like the unit's EnvironmentFile=-…: no file, no settings
  }
  return readEnvFile(envFile);
}

module.exports = {
  apps: [
    {
      name: "kontod",
      script: path.join(venv, "bin", "kontod"),
      args: ["run"],
      interpreter: "none",
      exec_mode: "fork",
      instances: 1,
      // The settings file is the only source of settings: a KONTOD_* or DATABASE_URL left in the
      // shell that ran `pm2 start` does not reach kontod.
      filter_env: ["KONTOD_", "DATABASE_URL", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"],
      env: {
        ...settings(),
        CREDENTIALS_DIRECTORY: credentials,
        // When a hang ends in SIGABRT, Python prints every thread's stack to the error log.
        PYTHONFAULTHANDLER: "1",
      },
      // Restart after a crash, waiting 1 s, then 1.5 times longer each time up to PM2's cap of
      // 15 s; the wait starts again at 1 s once kontod has been up for 30 s. Exit status 2 is a
      // bad setting (the error log names it): restarting cannot fix it, so PM2 leaves kontod
      // stopped, as the unit's RestartPreventExitStatus=2 does (`pm2 ls` may still call it
      // "waiting restart": PM2 names the state before it reads stop_exit_codes).
      autorestart: true,
      exp_backoff_restart_delay: 1000,
      stop_exit_codes: [2],
      // PM2 stops with SIGINT (or $PM2_KILL_SIGNAL of the PM2 daemon), which kontod takes as
      // SIGTERM: it finishes or interrupts the running job within KONTOD_SHUTDOWN_TIMEOUT (25 s),
      // stops its embedded PostgreSQL and exits 0. The signal goes to kontod alone (treekill off):
      // kontod stops what it started, in order. PM2 sends SIGKILL to kontod after 45 s.
      treekill: false,
      kill_timeout: 45000,
      // kontod writes its log lines (JSON when not on a terminal) with their own time stamps.
      out_file: path.join(logDir, "kontod.out.log"),
      error_file: path.join(logDir, "kontod.err.log"),
      time: false,
      merge_logs: true,
      // Not a Node program: no file watching, no source map, no PM2 probes inside it.
      watch: false,
      source_map_support: false,
      pmx: false,
      automation: false,
    },
  ],
};
