"""Scope fetcher plugins (stevedore namespace ``cloudkitty_proc.fetchers``)."""
