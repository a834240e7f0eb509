"""The third-party HTTP APIs kontod calls (the Powens bank API, rate sources), their shared
retry rules and the bounded reading of their answers."""
