"""kontod: runs and watches Konto's scheduled jobs."""

__version__ = "0.1.0"
