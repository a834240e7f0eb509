"""``kontod demo`` and the sandboxes of third parties it and the tests use (a bank speaking the
Powens API, the rate sources). Nothing that kontod runs in production imports this package."""
