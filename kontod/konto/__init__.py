"""Konto's own tables as kontod reads and writes them: the schema check, the web app's bank
tokens and the classification of accounts."""
